"""The LSTM recurrence as pure functions over arrays: one layer, one loop over time.

Gate layout along the last axis is Keras's and PyTorch's: input, forget, cell, output (i, f, g, o).
Input projections for all timesteps are computed before the loop by the caller, so the loop body is
one (B, H) x (H, 4H) matmul plus elementwise work.

Three implementations with the same signature and results:
  lstm_scan             `lax.scan`, differentiated by JAX (the reference)
  lstm_scan_custom_vjp  hand-written backward pass (BPTT by hand) in JAX
  native.lstm_native    the whole layer as one native CPU call each way (lstm_jax/native)
and `lstm_layer(..., backward=...)` to choose by name ("auto": native where it runs and was
measured faster, else the custom scan; `backend_name` says which runs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Carry = tuple[jax.Array, jax.Array]  # (h_BxH, c_BxH), both float32


def lstm_cell(gates_Bx4H: jax.Array, c_BxH: jax.Array) -> Carry:
    """Applies the gate nonlinearities; returns the new (h, c) in float32."""
    i, f, g, o = jnp.split(gates_Bx4H.astype(jnp.float32), 4, axis=-1)
    c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
    return h_BxH, c_BxH


def recurrent_gates(h_BxH: jax.Array, kernel_rec_Hx4H: jax.Array, dtype) -> jax.Array:
    """h @ W_hh in the compute dtype, accumulated in float32."""
    return jnp.dot(h_BxH.astype(dtype), kernel_rec_Hx4H.astype(dtype),
                   preferred_element_type=jnp.float32)


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes `x` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)           # jax <= 0.9
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def _vary_like(arrays, *refs):
    """Inside `shard_map`, marks device-invariant arrays (replicated weights, zero initial carries)
    as varying over the mesh axes that `refs` or any of `arrays` vary over, so `lax.scan` sees equal
    carry types in and out and a custom VJP's cotangents match its inputs' types; JAX transposes
    this cast to a psum of the cotangent, i.e. the gradient all-reduce lands after the backward
    loop, outside it. A no-op outside shard_map."""
    vma = frozenset().union(*(_varying_axes(a) for a in (*arrays, *refs)))
    if not vma:
        return tuple(arrays)
    out = []
    for a in arrays:
        missing = tuple(sorted(vma - _varying_axes(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


def lstm_scan(xproj_TxBx4H: jax.Array, kernel_rec_Hx4H: jax.Array, carry: Carry,
              dtype=jnp.float32) -> tuple[Carry, jax.Array]:
    """Runs one LSTM layer over time. Returns the final carry and h for every step (T, B, H)."""
    carry = _vary_like(carry, xproj_TxBx4H, kernel_rec_Hx4H)

    def step(carry: Carry, xproj_Bx4H: jax.Array) -> tuple[Carry, jax.Array]:
        h, c = carry
        gates = xproj_Bx4H.astype(jnp.float32) + recurrent_gates(h, kernel_rec_Hx4H, dtype)
        h, c = lstm_cell(gates, c)
        return (h, c), h

    return jax.lax.scan(step, carry, xproj_TxBx4H)


# --------------------------------------------------------------------------------------------------
# Hand-written backward pass (BPTT by hand).
#
# Why: `jax.grad` of `lstm_scan` transposes the scan body, so the backward loop carries the weight
# gradient dW_hh as a loop-carried accumulator and does one small (H, B) x (B, 4H) GEMM per step,
# plus the `dgates @ W_hh.T` it needs anyway. Here the backward loop only does `dgates @ W_hh.T`
# and the elementwise gate derivatives; the weight gradient is one (H, T*B) x (T*B, 4H) GEMM after
# the loop, which runs near GEMM peak and keeps the loop short. The forward pass saves the gate
# activations (T, B, 4H) and cell states (T, B, H), so the backward pass recomputes only tanh(c).
# --------------------------------------------------------------------------------------------------


def _gate_scale(hidden: int) -> jax.Array:
    """0.5 on the sigmoid gates (i, f, o), 1 on the cell candidate (g): (4H,) float32.

    sigmoid(x) = 0.5 * tanh(x / 2) + 0.5, so with the pre-activations of i, f, o halved (exact in
    floating point) one `tanh` over the whole contiguous (B, 4H) block gives all four gates. XLA:CPU
    vectorises that single transcendental; sigmoid/tanh on the four strided (B, H) slices
    inside the loop compile to scalar code and cost ~6x more than the matmul (measured).
    """
    half = jnp.full((hidden,), 0.5, jnp.float32)
    return jnp.concatenate([half, half, jnp.ones((hidden,), jnp.float32), half])


def _split4(a_Bx4H: jax.Array):
    hidden = a_Bx4H.shape[-1] // 4
    return (a_Bx4H[..., :hidden], a_Bx4H[..., hidden:2 * hidden],
            a_Bx4H[..., 2 * hidden:3 * hidden], a_Bx4H[..., 3 * hidden:])


def _forward_saving(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype, unroll):
    """Forward recurrence that also returns what the backward pass needs.

    Returns ((h_T, c_T), hs, saved) with hs (T, B, H) the layer output and saved =
    (h_all, c_all, t): h_all, c_all (T + 1, B, H) hold h_0..h_T and c_0..c_T (so h_{t-1}, c_{t-1}
    are plain slices, no shifted copies), t = tanh(scale * gates) (T, B, 4H), from which the gate
    activations are i = (t_i + 1) / 2 (same for f, o) and g = t_g.

    The loop writes t over the scaled input projections in place (one (T, B, 4H) buffer, no
    zero-filled scan output and no copy of it), and h, c into the (T + 1)-row buffers.
    """
    T, B, H4 = xproj_TxBx4H.shape
    hidden = H4 // 4
    scale = _gate_scale(hidden)
    # Scale once outside the loop (exact: powers of two), cast the kernel once.
    kernel = (kernel_rec_Hx4H.astype(jnp.float32) * scale).astype(dtype)
    buf = xproj_TxBx4H.astype(jnp.float32) * scale
    h0, c0 = (a.astype(jnp.float32) for a in carry)
    h_all = jnp.zeros((T + 1, B, hidden), jnp.float32).at[0].set(h0)
    c_all = jnp.zeros((T + 1, B, hidden), jnp.float32).at[0].set(c0)

    def body(i, state):
        h_prev, c_prev, buf, h_all, c_all = state
        x = jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)
        t = jnp.tanh(x + jnp.dot(h_prev.astype(dtype), kernel, preferred_element_type=jnp.float32))
        ti, tf, g, to = _split4(t)
        c = (0.5 * tf + 0.5) * c_prev + (0.5 * ti + 0.5) * g
        h = (0.5 * to + 0.5) * jnp.tanh(c)
        buf = jax.lax.dynamic_update_index_in_dim(buf, t, i, 0)
        h_all = jax.lax.dynamic_update_index_in_dim(h_all, h, i + 1, 0)
        c_all = jax.lax.dynamic_update_index_in_dim(c_all, c, i + 1, 0)
        return h, c, buf, h_all, c_all

    h, c, ts, h_all, c_all = jax.lax.fori_loop(0, T, body, (h0, c0, buf, h_all, c_all),
                                               unroll=unroll)
    return (h, c), h_all[1:], (h_all, c_all, ts)


def _backward(kernel_rec_Hx4H, saved, d_carry, d_hs_TxBxH, dtype, unroll):
    """Reverse-time loop over the saved activations; returns (dxproj, dkernel_rec, dcarry0).

    The loop carries c_t next to the cotangents and recomputes tanh(c_t) (cheaper than storing
    it), and writes d gates over the saved t in place, so the (T, B, 4H) buffer becomes dxproj
    with no new buffer to fill. Writing row 0 after the loop instead made XLA:CPU copy the whole
    buffer three times; a separate zero-filled d-gates buffer was slower on 2 CPU devices
    (benchmarks/README.md).
    """
    h_all, c_all, ts = saved
    T = ts.shape[0]
    hidden = kernel_rec_Hx4H.shape[0]
    # d gate / d pre-activation = q * (1 - t^2): q = 1/4 for sigmoid gates, 1 for g.
    q = _gate_scale(hidden) ** 2
    kernel_t = kernel_rec_Hx4H.astype(dtype).T  # (4H, H), transposed once outside the loop
    d_hs = d_hs_TxBxH.astype(jnp.float32)

    def body(j, state):
        dh_next, dc_next, c, buf, pending = state
        i = T - 1 - j                      # j = T is a write-only step (i = -1)
        # d gates go over the saved t in place, one step late: write row i + 1 first, then read
        # row i, so every read of the buffer follows the write (reading and writing the same row
        # in one step made XLA copy the buffer every step). The extra last step writes row 0.
        buf = jax.lax.dynamic_update_index_in_dim(buf, pending, jnp.minimum(i + 1, T - 1), 0)
        row = jnp.maximum(i, 0)
        t = jax.lax.dynamic_index_in_dim(buf, row, 0, keepdims=False)
        c_prev = jax.lax.dynamic_index_in_dim(c_all, row, 0, keepdims=False)
        dh_out = jax.lax.dynamic_index_in_dim(d_hs, row, 0, keepdims=False)
        ti, tf, g, to = _split4(t)
        i_g, f_g, o_g = 0.5 * ti + 0.5, 0.5 * tf + 0.5, 0.5 * to + 0.5
        tc = jnp.tanh(c)
        dh = dh_out + dh_next
        dc = dc_next + dh * o_g * (1.0 - tc * tc)
        # d loss / d activation for (i, f, g, o), then through the nonlinearity in one pass:
        # [dc, dc, dc, dh] * [g, c_prev, i, tanh(c)]. As the product of two concatenates XLA:CPU
        # computes dc once; concatenating the four products instead made it recompute dc in four
        # fusions (slower, as was a select over the gate axis).
        d_act = (jnp.concatenate([dc, dc, dc, dh], axis=-1)
                 * jnp.concatenate([g, c_prev, i_g, tc], axis=-1))
        dgates = d_act * (q * (1.0 - t * t))
        dh_prev = jnp.dot(dgates.astype(dtype), kernel_t, preferred_element_type=jnp.float32)
        live = i >= 0
        return (jnp.where(live, dh_prev, dh_next), jnp.where(live, dc * f_g, dc_next),
                jnp.where(live, c_prev, c), buf, dgates)

    dh_T, dc_T = d_carry
    dh0, dc0, _, dgates_TxBx4H, _ = jax.lax.fori_loop(
        0, T + 1, body,
        (dh_T.astype(jnp.float32), dc_T.astype(jnp.float32), c_all[T], ts, ts[T - 1]),
        unroll=unroll)

    # Weight gradient: one GEMM over all timesteps, (H, T*B) x (T*B, 4H). Written as a contraction
    # over (t, b) rather than a reshape to (T*B, .): with the batch sharded over devices the
    # reshape would make GSPMD all-gather both operands and run the whole GEMM on every device;
    # the contraction runs locally and all-reduces the (H, 4H) result.
    # Contracting dims in (t, b) order: jnp.einsum orders them (b, t), which makes XLA copy both
    # operands into (b, t)-major layouts first (6.3 vs 4.0 ms at T=60, B=64, H=128).
    dkernel = jax.lax.dot_general(h_all[:-1].astype(dtype), dgates_TxBx4H.astype(dtype),
                                  (((0, 1), (0, 1)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dgates_TxBx4H, dkernel, (dh0, dc0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lstm_scan_cvjp(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype, unroll):
    (h, c), hs, _ = _forward_saving(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype, unroll)
    return (h, c), hs


def _cvjp_fwd(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype, unroll):
    (h, c), hs, saved = _forward_saving(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype, unroll)
    # Empty arrays stand for the primal dtypes (residuals must be arrays).
    likes = tuple(jnp.zeros((0,), a.dtype) for a in (xproj_TxBx4H, carry[0], carry[1]))
    return ((h, c), hs), (kernel_rec_Hx4H, saved, likes)


def _cvjp_bwd(dtype, unroll, residuals, cotangents):
    kernel_rec_Hx4H, saved, (x_like, h_like, c_like) = residuals
    d_carry, d_hs = cotangents
    dxproj, dkernel, (dh0, dc0) = _backward(kernel_rec_Hx4H, saved, d_carry, d_hs, dtype, unroll)
    return (dxproj.astype(x_like.dtype), dkernel.astype(kernel_rec_Hx4H.dtype),
            (dh0.astype(h_like.dtype), dc0.astype(c_like.dtype)))


_lstm_scan_cvjp.defvjp(_cvjp_fwd, _cvjp_bwd)


def lstm_scan_custom_vjp(xproj_TxBx4H: jax.Array, kernel_rec_Hx4H: jax.Array, carry: Carry,
                         dtype=jnp.float32, *, unroll: int = 1) -> tuple[Carry, jax.Array]:
    """`lstm_scan` with a hand-written backward pass; same signature, outputs and numerics.

    Forward: the same recurrence (all four gates from one tanh over the contiguous (B, 4H) block,
    sigmoid(x) = (tanh(x/2) + 1) / 2), saving t = tanh(gates'), h_0..h_T and c_0..c_T. Backward:
    one reverse loop doing only `dgates @ W_hh.T` and the elementwise gate derivatives, writing
    d gates over t in place; then the weight gradient as one (H, T*B) x (T*B, 4H) GEMM after the
    loop (jax.grad of the scan instead accumulates dW_hh with one small GEMM per step inside the
    loop). Gradients flow to `xproj`, `kernel_rec` and the initial carry, so stacked layers and
    stateful (carried-over) training work. `dtype` is the compute dtype of the three matmuls,
    always accumulated in float32; carries and gate math stay float32.

    Works under jit, GSPMD meshes (batch-sharded: the dW contraction runs locally and XLA
    all-reduces the (H, 4H) result after the loop), shard_map (replicated weights and invariant
    initial carries are cast to varying before the custom VJP, so JAX's psum of their cotangents
    lands after the backward loop) and pmap. Memory: (T, B, 4H) + 2 x (T + 1, B, H) float32 per
    layer, as autodiff keeps. Matches `jax.grad(lstm_scan)` to float32 rounding
    (tests/test_recurrence.py). `unroll` > 1 is supported but measured ~2x slower on XLA:CPU
    (the unrolled body no longer updates the saved buffers in place); keep 1.

    Reverse mode only: forward-mode autodiff of this function (`jax.jvp`, `jax.jacfwd`) is not
    supported and raises JAX's TypeError ("can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"); use `lstm_scan` (`backward="autodiff"`) for forward mode.
    """
    xproj_TxBx4H, kernel_rec_Hx4H, h0, c0 = _vary_like(
        (xproj_TxBx4H, kernel_rec_Hx4H, carry[0], carry[1]))
    return _lstm_scan_cvjp(xproj_TxBx4H, kernel_rec_Hx4H, (h0, c0), dtype, int(unroll))


BACKWARDS = ("autodiff", "custom", "native", "auto")


def _native_runs(backward: str, hidden_size: int, dtype) -> bool:
    """Whether `backward` runs the native kernel for this layer on a CPU (trace-time, host-only)."""
    if backward not in ("native", "auto") or jax.default_backend() != "cpu":
        return False   # (GPU/TPU processes never build the kernel)
    from lstm_jax import native
    if backward == "auto":
        return native.fast(hidden_size, dtype)
    try:
        native.check_supported(hidden_size, jnp.dtype(dtype).name)
        return True
    except native.NativeUnavailable:
        return False


def backend_name(backward: str, hidden_size: int, dtype, platform: str, devices: int = 1) -> str:
    """What `lstm_layer(backward=...)` runs on `platform` ('cpu', 'gpu', 'tpu') with `devices`
    devices calling it at once, for the start-up line: e.g. "native (AVX-512, float32, 1
    thread/device)" or "custom scan"."""
    if platform == "cpu" and _native_runs(backward, hidden_size, dtype):
        from lstm_jax import native
        n = native.threads_per_call(devices)
        return (f"native ({native.kind(hidden_size)}, {jnp.dtype(dtype).name}, {n} thread{'s' if n > 1 else ''}"
                f"/device)")
    if backward in ("native", "auto") and platform == "cpu":
        from lstm_jax import native
        ok, why = native.available()
        if not ok:   # the one line that says why the kernel does not run here
            return f"custom scan (native unavailable: {why})"
        if backward == "native":
            return f"custom scan (native does not run {jnp.dtype(dtype).name} at hidden {hidden_size})"
    return "autodiff scan" if backward == "autodiff" else "custom scan"


def lstm_layer(xproj_TxBx4H: jax.Array, kernel_rec_Hx4H: jax.Array, carry: Carry,
               dtype=jnp.float32, *, backward: str = "autodiff") -> tuple[Carry, jax.Array]:
    """One LSTM layer over time, with the backward pass chosen by name.

    backward="autodiff": `lstm_scan`, differentiated by JAX (the reference).
    backward="custom":   `lstm_scan_custom_vjp`, hand-written BPTT; faster to train on CPU.
    backward="native":   the native CPU kernel where it can run (`native.available()`), else
                         the custom scan; on GPU/TPU the custom scan.
    backward="auto":     native where `native.fast` (float32 on AVX-512 or AVX2; bfloat16 on
                         AVX512-BF16 without AMX), else the custom scan.
    Both return ((h_T, c_T), hs_TxBxH). In float32 they agree to rounding, forward and backward;
    with a bfloat16 `dtype` the forwards agree, but jax.grad runs the transposed matmuls in
    float32 where the custom backward runs them in bfloat16, so gradients differ by bfloat16
    rounding (~1e-3 relative).
    """
    if backward == "autodiff":
        return lstm_scan(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype)
    if backward == "custom":
        return lstm_scan_custom_vjp(xproj_TxBx4H, kernel_rec_Hx4H, carry, dtype)
    if backward in ("native", "auto"):
        scan = functools.partial(lstm_scan_custom_vjp, dtype=dtype)
        if not _native_runs(backward, kernel_rec_Hx4H.shape[0], dtype):
            return scan(xproj_TxBx4H, kernel_rec_Hx4H, carry)
        from lstm_jax import native
        # Chosen when lowering: the native call on CPU; the scan for GPU/TPU (an exported or
        # cross-compiled step carries no CPU custom call).
        return jax.lax.platform_dependent(
            xproj_TxBx4H, kernel_rec_Hx4H, carry,
            cpu=functools.partial(native.lstm_native, dtype=dtype), default=scan)
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
