"""`lstm-jax export`: the sampler as a serialised `jax.export` program (StableHLO) for CPU, CUDA and
TPU at once, with the weights and the vocabulary, in one file that `lstm_jax/exported_sampler.py`
(jax + numpy only, no lstm_jax) loads and runs.

The exported function is one block of the sampler (`sample._block` with the state carried,
window=0): `rows` rows advance `steps` characters in one `lax.scan`; the loader calls it block
after block, exactly as `Sampler.run` does, so row i's text depends only on (seed, i, its prime,
temperature, top-k, top-p) and equals `lstm-jax sample`'s rows for the same arguments (on the same
platform: the draw kernel is picked per platform inside the program with
`lax.platform_dependent`, as `draw.draw_kernel` picks it; bit equality also needs the same rows
per call, see `sample.MIN_ROWS`). Two programs are stored: unfiltered, and with top-k and top-p
(top_k = 0 and top_p = 1 mean off there too). The layers run through `model.step` (jnp.dot and the
gate math), never the cuDNN custom call, which is not stable across versions.

File layout (a NumPy .npz, i.e. a zip): "meta" (UTF-8 JSON: format, vocabulary, shapes, the
parameter list), "program_plain" / "program_filtered" (`jax.export` serialisations) and
"param_<i>" (each weight's raw bytes; dtype and shape in meta).
"""
from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_jax import draw as draw_lib
from lstm_jax import sample as sample_lib

FORMAT = "lstm_jax.exported_sampler/1"
PLATFORMS = ("cpu", "cuda", "tpu")


def sampler_block(graphdef, vocab_size: int, filters: bool):
    """The pure block function that is exported: (params_list, carry, prime_BxS, prime_len_B,
    temperature_B, first_row, seed, top_k, top_p, t0) -> (carry, drawn_BxS); carry = (LSTM state,
    previous token). The same arithmetic as `sample._block` with window=0."""
    treedef_holder = {}

    def block(params_list, carry, prime_BxS, prime_len_B, temperature_B, first_row, seed, top_k,
              top_p, t0):
        params = jax.tree.unflatten(treedef_holder["treedef"], params_list)
        model = nnx.merge(graphdef, params)
        batch, num_steps = prime_BxS.shape
        steps_S = t0 + jnp.arange(num_steps)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed),
                                                           first_row + jnp.arange(batch))
        step_keys = jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (None, 0))(row_keys, steps_S)
        u_SxB = 1.0 - jax.vmap(jax.vmap(jax.random.uniform))(step_keys)
        k = jnp.where(top_k <= 0, vocab_size, top_k) if filters else top_k

        def draw(logits_BxV, u_B, kernel):
            return draw_lib.draw_tokens(logits_BxV, u_B, temperature_B, k, top_p, kernel=kernel,
                                        filters=(filters, filters))

        def body(carry, xs):
            state, prev_B = carry
            t, prime_B, u_B = xs
            tok_B = jnp.where(t < prime_len_B, prime_B, prev_B)
            logits_BxV, state = model.step(tok_B, state)
            logits_BxV = logits_BxV.astype(jnp.float32)
            drawn_B = jax.lax.platform_dependent(
                logits_BxV, u_B,
                cpu=functools.partial(draw, kernel=draw_lib.draw_kernel(vocab_size, "cpu")),
                default=functools.partial(draw, kernel="cumsum"))
            return (state, drawn_B), drawn_B

        carry, drawn_SxB = jax.lax.scan(body, carry, (steps_S, prime_BxS.T, u_SxB))
        return carry, drawn_SxB.T

    return block, treedef_holder


def export_sampler(model: nnx.Module, vocab, out: str | os.PathLike, *, rows: int = sample_lib.MIN_ROWS,
                   steps: int = sample_lib.STEP_BUCKET, platforms: Sequence[str] = PLATFORMS) -> dict:
    """Writes the exported sampler of `model` (with `vocab`) to `out` atomically; returns its meta.

    rows: rows per call (the loader pads a request up to a multiple); steps: characters per call.
    """
    if rows < 1 or steps < 1:
        raise ValueError(f"rows and steps must be positive, got rows={rows}, steps={steps}")
    bad = sorted(set(platforms) - set(PLATFORMS))
    if bad or not platforms:
        raise ValueError(f"platforms must be some of {', '.join(PLATFORMS)}; got {list(platforms)}")
    chars = list(vocab.chars)
    cfg = model.config
    if len(chars) != cfg.vocab_size:
        raise ValueError(f"the vocabulary has {len(chars)} chars but the model {cfg.vocab_size}")
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [np.asarray(jax.device_get(x)) for x in leaves]
    carry_shapes = jax.eval_shape(lambda: model.initial_carry(rows))
    sds = jax.ShapeDtypeStruct
    i32 = np.int32
    args = ([sds(x.shape, x.dtype) for x in leaves],
            (jax.tree.map(lambda a: sds(a.shape, a.dtype), carry_shapes), sds((rows,), i32)),
            sds((rows, steps), i32), sds((rows,), i32), sds((rows,), np.float32),
            sds((), i32), sds((), np.uint32), sds((), i32), sds((), np.float32), sds((), i32))
    programs = {}
    for name, filters in (("plain", False), ("filtered", True)):
        block, holder = sampler_block(graphdef, cfg.vocab_size, filters)
        holder["treedef"] = treedef
        exp = jax.export.export(jax.jit(block), platforms=tuple(platforms))(*args)
        programs[name] = np.frombuffer(exp.serialize(), np.uint8)
    start = chars.index("\n") if "\n" in chars else chars.index(" ") if " " in chars else 0
    meta = {"format": FORMAT, "chars": chars, "is_bytes": bool(getattr(vocab, "is_bytes", False)),
            "start": start, "rows": rows, "steps": steps, "platforms": list(platforms),
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "params": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in leaves],
            "jax_version": jax.__version__}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
              **{f"program_{k}": v for k, v in programs.items()},
              **{f"param_{i}": np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8)
                 for i, x in enumerate(leaves)}}
    out = pathlib.Path(out)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, out)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def loader_source() -> str:
    """The text of the standalone loader (lstm_jax/exported_sampler.py: jax + numpy only)."""
    return (pathlib.Path(__file__).with_name("exported_sampler.py")).read_text(encoding="utf-8")
