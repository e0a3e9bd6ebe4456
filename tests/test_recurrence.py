"""The hand-written LSTM backward pass against jax.grad of the plain scan, alone, stacked, under
jit, and data-parallel over two CPU devices (GSPMD mesh, shard_map and pmap with gradient
all-reduces; run in a subprocess that has two host devices)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import recurrence

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _inputs(key, T, B, H, scale=1.0):
    k = jax.random.split(key, 7)
    xproj = jax.random.normal(k[0], (T, B, 4 * H)) * scale
    kernel = jax.random.normal(k[1], (H, 4 * H)) * (scale / np.sqrt(H))
    h0 = jax.random.normal(k[2], (B, H)) * 0.5
    c0 = jax.random.normal(k[3], (B, H))
    w_hs = jax.random.normal(k[4], (T, B, H))   # cotangent on every output step
    w_h = jax.random.normal(k[5], (B, H))       # ... on the final h
    w_c = jax.random.normal(k[6], (B, H))       # ... and on the final c
    return (xproj, kernel, h0, c0), (w_hs, w_h, w_c)


def _loss(scan_fn, weights, dtype=jnp.float32):
    w_hs, w_h, w_c = weights

    def loss(xproj, kernel, h0, c0):
        (h, c), hs = scan_fn(xproj, kernel, (h0, c0), dtype)
        return jnp.sum(hs * w_hs) + jnp.sum(h * w_h) + jnp.sum(c * w_c)
    return loss


@pytest.mark.parametrize("T,B,H,seed,scale,tol", [
    (1, 1, 1, 0, 1.0, 1e-5),
    (5, 3, 4, 1, 1.0, 1e-5),
    (7, 2, 8, 2, 1.0, 1e-5),
    (6, 3, 5, 7, 8.0, 1e-4),   # large pre-activations: saturated sigmoid / tanh
])
def test_custom_vjp_matches_autodiff(T, B, H, seed, scale, tol):
    args, weights = _inputs(jax.random.key(seed), T, B, H, scale)
    ref_out = recurrence.lstm_scan(*args[:2], args[2:])
    out = recurrence.lstm_scan_custom_vjp(*args[:2], args[2:])
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    argnums = (0, 1, 2, 3)  # xproj, kernel_rec, h0, c0
    ref = jax.grad(_loss(recurrence.lstm_scan, weights), argnums)(*args)
    got = jax.jit(jax.grad(_loss(recurrence.lstm_scan_custom_vjp, weights), argnums))(*args)
    for name, g, r in zip(("xproj", "kernel_rec", "h0", "c0"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol, err_msg=name)


def test_unroll_matches():
    args, weights = _inputs(jax.random.key(3), 5, 2, 4)
    f1 = jax.grad(_loss(lambda *a: recurrence.lstm_scan_custom_vjp(*a), weights), (0, 1))
    f3 = jax.grad(_loss(lambda *a: recurrence.lstm_scan_custom_vjp(*a, unroll=2), weights), (0, 1))
    for a, b in zip(f1(*args), f3(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_dtype():
    """bf16 matmul inputs, f32 carries: same outputs/grads as autodiff with bf16, dtypes kept."""
    args, weights = _inputs(jax.random.key(4), 8, 4, 16)
    out = jax.eval_shape(lambda *a: recurrence.lstm_scan_custom_vjp(*a[:2], a[2:], jnp.bfloat16),
                         *args)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    ref = jax.grad(_loss(recurrence.lstm_scan, weights, jnp.bfloat16), (0, 1))(*args)
    got = jax.grad(_loss(recurrence.lstm_scan_custom_vjp, weights, jnp.bfloat16), (0, 1))(*args)
    for g, r in zip(got, ref):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=5e-2, atol=5e-2 * float(jnp.abs(r).max()))


def test_stacked_layers_and_dispatcher():
    """Two stacked layers: gradients reach the lower layer's kernel through xproj."""
    T, B, H = 6, 3, 8
    k = jax.random.split(jax.random.key(5), 5)
    x0 = jax.random.normal(k[0], (T, B, 4 * H))
    w_in2 = jax.random.normal(k[1], (H, 4 * H)) / np.sqrt(H)
    kr1 = jax.random.normal(k[2], (H, 4 * H)) / np.sqrt(H)
    kr2 = jax.random.normal(k[3], (H, 4 * H)) / np.sqrt(H)
    carry = (jnp.zeros((B, H)), jnp.zeros((B, H)))
    target = jax.random.normal(k[4], (T, B, H))

    def loss(params, backward):
        x0, kr1, w_in2, kr2 = params
        (_, c1), hs1 = recurrence.lstm_layer(x0, kr1, carry, backward=backward)
        (h2, _), hs2 = recurrence.lstm_layer(hs1 @ w_in2, kr2, carry, backward=backward)
        return jnp.mean((hs2 - target) ** 2) + jnp.sum(c1) * 1e-2 + jnp.sum(h2) * 1e-2

    params = (x0, kr1, w_in2, kr2)
    ref = jax.grad(loss)(params, "autodiff")
    got = jax.jit(jax.grad(loss), static_argnums=1)(params, "custom")
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backward"):
        recurrence.lstm_layer(x0, kr1, carry, backward="cudnn")


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lstm_jax import recurrence
    assert jax.device_count() == 2, jax.devices()
    T, B, H, V = 7, 8, 16, 11
    k = jax.random.split(jax.random.key(0), 6)
    params = {"emb": jax.random.normal(k[0], (V, 4 * H)) * 0.3,
              "rec": jax.random.normal(k[1], (H, 4 * H)) / np.sqrt(H),
              "head": jax.random.normal(k[2], (H, V)) / np.sqrt(H)}
    tokens = jax.random.randint(k[3], (B, T), 0, V)
    targets = jax.random.randint(k[4], (B, T), 0, V)

    def loss(params, tokens, targets, backward):
        xproj = params["emb"][tokens.T]
        zeros = jnp.zeros((tokens.shape[0], H))
        _, hs = recurrence.lstm_layer(xproj, params["rec"], (zeros, zeros), backward=backward)
        logits = hs @ params["head"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets.T[..., None], -1))

    ref = jax.jit(jax.grad(loss), static_argnums=3)(params, tokens, targets, "autodiff")
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    p_rep = jax.device_put(params, rep)
    t_dat, y_dat = jax.device_put(tokens, dat), jax.device_put(targets, dat)
    results, refs = {}, {}

    # 1. GSPMD: jit over the mesh, XLA inserts the all-reduce of the gradients.
    def sgd_step(params, tokens, targets):
        g = jax.grad(loss)(params, tokens, targets, "custom")
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), g
    step = jax.jit(sgd_step, out_shardings=(rep, rep), donate_argnums=0)
    new, g = step(jax.tree.map(jnp.copy, p_rep), t_dat, y_dat)
    results["gspmd"] = g

    # 2. shard_map: per-device gradients; with replicated (invariant) params JAX itself inserts
    #    the cross-device sum of their cotangents (after the backward loop); pmean of the result
    #    is then a no-op, so the reference is the autodiff version of the same function.
    def local(params, tokens, targets, backward):
        g = jax.grad(loss)(params, tokens, targets, backward)
        return jax.lax.pmean(g, "data")
    def smap(fn, backward):
        return jax.jit(jax.shard_map(lambda p, x, y: fn(p, x, y, backward), mesh=mesh,
                                     in_specs=(P(), P("data"), P("data")), out_specs=P()))
    results["shard_map"] = smap(local, "custom")(p_rep, t_dat, y_dat)
    refs["shard_map"] = smap(local, "autodiff")(p_rep, t_dat, y_dat)

    # 3. A collective inside a scan over micro-batches (gradient accumulation), the pattern that
    #    aborted in XLA's CPU collectives: pmean per micro-batch inside lax.scan.
    def local_accum(params, tokens, targets, backward):
        mb = tokens.reshape(2, -1, T), targets.reshape(2, -1, T)
        def body(acc, xs):
            g = jax.lax.pmean(jax.grad(loss)(params, xs[0], xs[1], backward), "data")
            return jax.tree.map(jnp.add, acc, g), None
        acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), mb)
        return jax.tree.map(lambda a: a / 2, acc)
    results["shard_map_scan_collective"] = smap(local_accum, "custom")(p_rep, t_dat, y_dat)
    refs["shard_map_scan_collective"] = refs["shard_map"]  # equal micro-batches: same gradient

    # 4. pmap with pmean (the lead's pmap path).
    pm = jax.pmap(lambda p, x, y: jax.lax.pmean(jax.grad(loss)(p, x, y, "custom"), "d"),
                  axis_name="d", in_axes=(None, 0, 0))
    results["pmap"] = jax.tree.map(lambda a: a[0], pm(params, tokens.reshape(2, -1, T),
                                                        targets.reshape(2, -1, T)))
    errs = {name: max(float(jnp.max(jnp.abs(a - b))) for a, b in
                      zip(jax.tree.leaves(g), jax.tree.leaves(refs.get(name, ref))))
            for name, g in results.items()}
    print(json.dumps(errs))
""")


def _run_two_device_script(extra_env: dict) -> dict:
    import json
    env = dict(os.environ)
    env.update(extra_env)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_cpu_devices_data_parallel():
    """Custom VJP under GSPMD, shard_map (collective after / inside an outer scan) and pmap on two
    host devices, with the settings hostenv.configure_cpu_devices applies for several devices."""
    errs = _run_two_device_script({
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false",
        "PJRT_NPROC": "4"})
    assert set(errs) == {"gspmd", "shard_map", "shard_map_scan_collective", "pmap"}
    for name, err in errs.items():
        assert err < 1e-5, (name, errs)
