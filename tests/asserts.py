"""The one strict comparison for test results: `assert_trees_close(actual, expected)`.

In the spirit of equinox's `tree_allclose`, but failing loudly: the two pytrees must have the same
structure (a list is not a tuple, dict keys must agree), and every pair of leaves the same shape and
dtype (a float64 NumPy reference is compared only after the test casts it, on purpose); values must
satisfy |actual - expected| <= atol + rtol * |expected| (np.testing.assert_allclose), integer and
boolean leaves must be equal. The message names the failing leaf by its path, e.g.
`leaf ['layers'][0]['kernel_rec']`.

The defaults (rtol=1e-5, atol=1e-8) are float32 rounding; a test that needs more says, next to the
call, what error it observed (tolerances about 3x that, not 100x).
"""
from __future__ import annotations

import jax
import numpy as np

__all__ = ["assert_trees_close"]


def _as_numpy(leaf) -> np.ndarray:
    return np.asarray(jax.device_get(leaf))


def assert_trees_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-8) -> None:
    """Raises AssertionError unless `actual` and `expected` match in structure, shapes, dtypes and
    (within rtol/atol) values; the message names the first failing leaf's path."""
    paths_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    paths_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    if tree_a != tree_e:
        raise AssertionError(f"tree structures differ:\n  actual:   {tree_a}\n  expected: {tree_e}")
    for (path, a), (_, e) in zip(paths_a, paths_e):
        name = f"leaf {jax.tree_util.keystr(path)}" if path else "leaf <root>"
        a, e = _as_numpy(a), _as_numpy(e)
        if a.shape != e.shape:
            raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
        if a.dtype != e.dtype:
            raise AssertionError(f"{name}: dtype {a.dtype} != expected {e.dtype}")
        if a.dtype.kind == "c" or "float" in a.dtype.name:
            # Compared in double precision, so bfloat16 (an ml_dtypes type) works like float32.
            wide = np.complex128 if a.dtype.kind == "c" else np.float64
            np.testing.assert_allclose(a.astype(wide), e.astype(wide), rtol=rtol, atol=atol,
                                       err_msg=name)
        else:  # integers, booleans, strings: exactly equal
            np.testing.assert_array_equal(a, e, err_msg=name)
