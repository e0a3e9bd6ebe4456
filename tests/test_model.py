"""CharLSTM against a float64 NumPy LSTM: logits (float32 and bfloat16), gradients, unrolling,
causality, initialisation, the step API.

Each test names, in its docstring, a plausible bug it catches; tolerances beyond the defaults of
`assert_trees_close` (rtol 1e-5, atol 1e-8) are justified by the error observed.
"""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from asserts import assert_trees_close
from lstm_jax.model import CharLSTM, ModelConfig


def _no_rounding(a):
    return a


def _bf16_rounding(a):
    """What a bfloat16 matmul operand holds: the float64 value rounded to bfloat16."""
    return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)


def numpy_forward(params, tokens_BxT, round_operand=_no_rounding):
    """Reference logits in float64: explicit per-step gates (i, f, g, o), one-hot first-layer
    input. `round_operand` is applied to both operands of every matmul that runs in the compute
    dtype (the recurrent and later input projections and the head; the embedding is a gather)."""
    sig = lambda x: 1 / (1 + np.exp(-x))
    r = round_operand
    B, T = tokens_BxT.shape
    V = params["head_kernel"].shape[1]
    x = np.eye(V)[tokens_BxT]                       # one-hot (B, T, V)
    for i_layer, layer in enumerate(params["layers"]):
        H = layer["kernel_rec"].shape[0]
        h, c, outs = np.zeros((B, H)), np.zeros((B, H)), []
        for t in range(T):
            x_in = x[:, t] @ layer["kernel_in"] if i_layer == 0 else r(x[:, t]) @ r(layer["kernel_in"])
            z = x_in + r(h) @ r(layer["kernel_rec"]) + layer["bias"]
            i, f, g, o = np.split(z, 4, axis=-1)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    return r(x) @ r(params["head_kernel"]) + params["head_bias"]


def numpy_loss(params, tokens_BxT1):
    logits = numpy_forward(params, tokens_BxT1[:, :-1])
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = tokens_BxT1[:, 1:]
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def pure_params(model):
    """The model's parameters as a nested dict of float32 NumPy arrays (nnx.to_pure_dict layout:
    layers keyed 0, 1, ...)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def as_numpy_params(model):
    """Float64 copies, layers as a list in order (the NumPy reference's layout)."""
    pure = jax.tree.map(lambda x: np.asarray(x, np.float64), pure_params(model))
    pure["layers"] = [pure["layers"][i] for i in sorted(pure["layers"])]
    return pure


def make_model(num_layers=2, backward="autodiff", keras_init=False, V=11, H=8, dtype="float32"):
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=num_layers, keras_init=keras_init,
                      backward=backward, dtype=dtype)
    return CharLSTM(cfg, rngs=nnx.Rngs(0))


def randomize_biases(model, seed=0):
    """Gives every bias random values (init has them all 0 but the forget gate's 1), so a forward
    pass that ignores one differs from the reference."""
    rng = np.random.default_rng(seed)
    for bias in [layer.bias for layer in model.layers] + [model.head_bias]:
        bias[...] = jnp.asarray(rng.normal(0.0, 0.5, bias.shape), bias.dtype)
    return model


def test_assert_trees_close_is_strict():
    """The comparison every test here relies on fails on each kind of mismatch (fails if the
    helper skips structure, shape, dtype or value checks), and names the leaf."""
    good = {"a": [np.ones(3, np.float32)], "b": np.arange(2)}
    assert_trees_close(good, {"a": [np.ones(3, np.float32)], "b": np.arange(2)})
    bad_cases = [
        ({"a": (np.ones(3, np.float32),), "b": np.arange(2)}, "structures differ"),
        ({"a": [np.ones(4, np.float32)], "b": np.arange(2)}, "shape"),
        ({"a": [np.ones(3, np.float64)], "b": np.arange(2)}, "dtype"),
        ({"a": [np.float32([1, 1, 1 + 2e-5])], "b": np.arange(2)}, r"\['a'\]\[0\]"),
        ({"a": [np.ones(3, np.float32)], "b": np.array([0, 2])}, r"\['b'\]"),
    ]
    for expected, message in bad_cases:
        with pytest.raises(AssertionError, match=message):
            assert_trees_close(good, expected)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("keras_init", [False, True])
def test_forward_matches_numpy_float64(num_layers, keras_init):
    """Fails if a gate is misplaced (i/f/g/o order), a layer is skipped, or a layer or the head
    ignores its bias (all biases random here)."""
    model = randomize_biases(make_model(num_layers, keras_init=keras_init))
    tokens = np.random.default_rng(0).integers(0, 11, (3, 7))
    got = model(jnp.asarray(tokens))
    want = numpy_forward(as_numpy_params(model), tokens).astype(np.float32)
    # Observed max |error| 1.0e-7 (float32 rounding of logits up to 1.0); atol = 3x that.
    assert_trees_close(got, want, atol=3e-7)


@pytest.mark.parametrize("backward", ["autodiff", "custom"])
def test_gradients_match_numpy_finite_differences(backward):
    """Analytic gradients vs central differences of the float64 NumPy loss, every parameter.
    Fails if a parameter gets no (or a wrong) gradient, e.g. the custom backward drops d c_0 or
    transposes dW_hh."""
    model = make_model(2, backward=backward, V=7, H=4)
    tokens = np.random.default_rng(1).integers(0, 7, (2, 6))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(tokens[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens[:, 1:])).mean()
    grads = jax.tree.map(np.asarray, nnx.to_pure_dict(jax.grad(loss)(params)))
    ref = as_numpy_params(model)
    eps = 1e-6

    def central_differences(ref_leaf):
        num = np.zeros_like(ref_leaf)
        for idx in np.ndindex(ref_leaf.shape):
            old = ref_leaf[idx]
            ref_leaf[idx] = old + eps
            up = numpy_loss(ref, tokens)
            ref_leaf[idx] = old - eps
            down = numpy_loss(ref, tokens)
            ref_leaf[idx] = old
            num[idx] = (up - down) / (2 * eps)
        return num.astype(np.float32)

    want = {"head_kernel": central_differences(ref["head_kernel"]),
            "head_bias": central_differences(ref["head_bias"]),
            "layers": {i: {name: central_differences(ref["layers"][i][name])
                           for name in ("bias", "kernel_in", "kernel_rec")} for i in range(2)}}
    # Observed max |error| 1.0e-8 (gradients up to 0.16); atol = 3x that.
    assert_trees_close(grads, want, atol=3e-8)


def test_scan_equals_unrolled_step_loop():
    """`model(tokens)` equals T calls of `model.step` (the sampler's path). Fails if the two paths
    diverge, e.g. `step` skips a bias or uses another gate order."""
    model = randomize_biases(make_model(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (4, 9)))
    full = model(tokens)
    carry = model.initial_carry(4)
    steps = []
    for t in range(tokens.shape[1]):
        logits, carry = model.step(tokens[:, t], carry)
        steps.append(logits)
    # Observed max |error| 6.0e-8 (fused vs per-step matmuls, logits up to 1); atol = 3x that.
    assert_trees_close(full, jnp.stack(steps, axis=1), atol=1.8e-7)


def test_carry_continues_a_sequence():
    """Running 5 then 4 chars with the carry handed over equals running all 9 at once. Fails if
    the returned carry is not the last step's (h, c) or a given carry is ignored."""
    model = make_model(2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 9)))
    first, carry = model(tokens[:, :5], return_carry=True)
    second = model(tokens[:, 5:], carry)
    assert_trees_close(jnp.concatenate([first, second], 1), model(tokens))   # observed: equal


@pytest.mark.parametrize("backward", ["autodiff", "custom"])
def test_causality_through_gradients(backward):
    """d logits[b, t] / d input[b', s] is zero unless b' == b and s <= t, and non-zero then.

    Differentiates `CharLSTM.__call__` itself: layer 0 reads each input as a row of
    `layers[0].kernel_in` (the embedding), so with every token of the batch distinct, the gradient
    w.r.t. row tokens[b', s] is the gradient w.r.t. the input at (b', s). Fails if a layer or the
    head sees the future (a reversed or shifted scan, logits at t read from h_{t+1}), if the
    custom backward writes d gates to the wrong time step, if batch rows mix, or if the carry is
    cut between steps (stop_gradient on h and c)."""
    B, T, V = 2, 8, 16
    model = make_model(2, backward=backward, V=V)
    tokens = np.random.default_rng(4).permutation(V).reshape(B, T)
    graphdef, params = nnx.split(model, nnx.Param)
    probe = jnp.asarray(np.random.default_rng(5).normal(size=V), jnp.float32)

    def probed_logits(params):
        """(B, T): each position's logits projected on a fixed random vector."""
        return nnx.merge(graphdef, params)(jnp.asarray(tokens)) @ probe

    jac = jax.jacrev(probed_logits)(params)["layers"][0]["kernel_in"][...]   # (B, T, V, 4H)
    influence = np.abs(np.asarray(jac)).sum(-1)[:, :, tokens]                # (B, T, B', S)
    b, t, b2, s = np.meshgrid(*map(np.arange, influence.shape), indexing="ij")
    allowed = (b == b2) & (s <= t)
    assert np.all(influence[~allowed] == 0), "an output depends on a later input or another row"
    assert np.all(influence[allowed] > 0), "an earlier input of the same row has no influence"


@pytest.mark.parametrize("V, H", [(5, 8), (11, 8)])
def test_both_head_layouts_match_numpy_float64(V, H):
    """The head runs on the (T, B, H) array when V <= H and on batch-major (B*T, H) rows when
    V > H; both give the float64 reference's (B, T, V) logits. Fails if the row layout mixes rows
    and steps (e.g. reshapes the time-major array) or drops the head's bias."""
    model = randomize_biases(make_model(2, V=V, H=H))
    tokens = np.random.default_rng(V).integers(0, V, (3, 7))
    got = model(jnp.asarray(tokens))
    want = numpy_forward(as_numpy_params(model), tokens).astype(np.float32)
    assert_trees_close(got, want, atol=3e-7)   # observed max |error| 1.0e-7, as above


def test_window_last_only_equals_last_position():
    """Fails if `last_only` picks another time step (e.g. the first) or skips the head's bias."""
    model = randomize_biases(make_model(1))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 6)))
    assert_trees_close(model(tokens, last_only=True), model(tokens)[:, -1])   # observed: equal


def _assert_uniform(w, bound, name):
    """`w` looks like i.i.d. U(-bound, bound): the largest |w| is within a sliver of the bound
    (for n draws it is below bound * (1 - 10/n) with probability e^-10), the mean |w| is
    bound / 2 and the standard deviation bound / sqrt(3), both within 5%."""
    a = np.abs(np.asarray(w, np.float64)).ravel()
    assert bound * (1 - 10 / a.size) < a.max() <= bound, (name, a.max(), bound)
    assert a.mean() == pytest.approx(bound / 2, rel=0.05), name
    assert np.asarray(w).std() == pytest.approx(bound / np.sqrt(3), rel=0.05), name


@pytest.mark.parametrize("keras_init", [False, True])
def test_initialisation_follows_keras_or_pytorch_conventions(keras_init):
    """keras_init: glorot_uniform input kernels and head, orthogonal recurrent kernels (Keras
    LSTM and Dense defaults); otherwise U(-1/sqrt(H), 1/sqrt(H)) everywhere (PyTorch nn.LSTM
    and nn.Linear). Both: zero biases but the forget gate's, which is 1.

    The bounds differ enough to tell the inits apart (layer 0 input, V=57, H=128: glorot 0.1027
    vs 0.0884; head: 0.180 vs 0.0884). Fails if an init is swapped for the other, the head keeps
    the default init under keras_init, the forget bias is dropped or lands on another gate, the
    head bias is not zero, or two parameters are drawn from the same key."""
    V, H = 57, 128
    model = make_model(2, keras_init=keras_init, V=V, H=H)
    glorot = lambda fan_in, fan_out: np.sqrt(6 / (fan_in + fan_out))
    for i, layer in enumerate(model.layers):
        fan_in = V if i == 0 else H
        bias = np.zeros(4 * H, np.float32)
        bias[H:2 * H] = 1.0                                      # gates i, f, g, o: f is 1
        assert_trees_close(layer.bias[...], jnp.asarray(bias))
        rec = np.asarray(layer.kernel_rec[...], np.float64)
        if keras_init:
            _assert_uniform(layer.kernel_in[...], glorot(fan_in, 4 * H), f"layers[{i}].kernel_in")
            # Orthogonal (H, 4H): orthonormal rows (observed max |W W^T - I| 4.1e-7; atol 3x),
            # spread over all four gates (fails for e.g. [Q, 0, 0, 0]): each block holds ~H/4.
            assert_trees_close(rec @ rec.T, np.eye(H), atol=1.2e-6)
            for gate in range(4):
                block = rec[:, gate * H:(gate + 1) * H]
                assert (block ** 2).sum() == pytest.approx(H / 4, rel=0.1), (i, gate)
        else:
            _assert_uniform(layer.kernel_in[...], H ** -0.5, f"layers[{i}].kernel_in")
            _assert_uniform(rec, H ** -0.5, f"layers[{i}].kernel_rec")
    head_bound = glorot(H, V) if keras_init else H ** -0.5
    _assert_uniform(model.head_kernel[...], head_bound, "head_kernel")
    assert_trees_close(model.head_bias[...], jnp.zeros(V, jnp.float32))
    # Every (H, 4H) kernel is its own draw.
    kernels = [np.asarray(k[...]) for k in
               (model.layers[0].kernel_rec, model.layers[1].kernel_rec, model.layers[1].kernel_in)]
    for a in range(len(kernels)):
        for b in range(a):
            assert not np.allclose(kernels[a], kernels[b]), "two kernels share their draw"



@pytest.mark.parametrize("keras_init", [False, True])
def test_embed_scale_sets_only_the_first_layers_input_kernel(keras_init):
    """model.embed_scale s > 0: layer 0's input kernel (one row per character) is U(-s*sqrt(3),
    s*sqrt(3)), standard deviation s, under either init; every other parameter keeps its own
    init. Fails if the scale is read as a bound rather than a standard deviation, reaches a deeper
    layer's input kernel or a recurrent kernel, or is ignored under keras_init."""
    V, H, s = 57, 128, 1.0
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=2, keras_init=keras_init,
                      embed_scale=s)
    model = CharLSTM(cfg, rngs=nnx.Rngs(0))
    _assert_uniform(model.layers[0].kernel_in[...], s * np.sqrt(3), "layers[0].kernel_in")
    glorot = np.sqrt(6 / (H + 4 * H))
    deep = glorot if keras_init else H ** -0.5
    _assert_uniform(model.layers[1].kernel_in[...], deep, "layers[1].kernel_in")
    if not keras_init:
        _assert_uniform(model.layers[0].kernel_rec[...], H ** -0.5, "layers[0].kernel_rec")
    with pytest.raises(ValueError, match="embed_scale"):
        ModelConfig(vocab_size=V, embed_scale=-1.0)


_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\)"
                  r" -> tensor<[0-9x]*x(\w+)>")


def _dot_dtypes(fn, *args) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot_general in fn's lowered program."""
    return _DOT.findall(jax.jit(fn).lower(*args).as_text())


@pytest.mark.parametrize("backward", ["autodiff", "custom"])
def test_bfloat16_compute_matches_a_bfloat16_reference(backward):
    """dtype="bfloat16": every matmul takes bfloat16 operands and accumulates in float32, and
    nothing else is rounded (carries, gates, bias and embedding stay float32).

    Proven two ways: the lowered program's dot_generals are (bf16, bf16) -> f32 (2 per layer:
    recurrent + input projection or head; the float32 model's are all f32); and the logits equal
    a float64 NumPy model that rounds exactly the matmul operands to bfloat16 (observed max error
    7.5e-8), while they differ from the unrounded float64 model by 1.6e-3 (20,000x more). Fails if
    the dtype is ignored anywhere (a float32 head or recurrence), if a carry or the cell state is
    kept in bfloat16, or if the logits come out in bfloat16."""
    V, H, L = 11, 16, 2
    f32 = randomize_biases(make_model(L, backward=backward, keras_init=True, V=V, H=H))
    bf16 = randomize_biases(make_model(L, backward=backward, keras_init=True, V=V, H=H,
                                       dtype="bfloat16"))
    tokens = np.random.default_rng(6).integers(0, V, (4, 12))

    graphdef, params = nnx.split(bf16)
    dots = _dot_dtypes(lambda p, t: nnx.merge(graphdef, p)(t), params, jnp.asarray(tokens))
    # A lax loop body may be printed once per layer, so count at least 2 per layer.
    assert len(dots) >= 2 * L and set(dots) == {("bf16", "bf16", "f32")}, dots
    graphdef32, params32 = nnx.split(f32)
    dots32 = _dot_dtypes(lambda p, t: nnx.merge(graphdef32, p)(t), params32, jnp.asarray(tokens))
    assert len(dots32) == len(dots) and set(dots32) == {("f32", "f32", "f32")}, dots32

    ref = as_numpy_params(f32)                      # same seed: the same parameters
    got = bf16(jnp.asarray(tokens))
    want = numpy_forward(ref, tokens, _bf16_rounding)
    # Observed max |error| 7.5e-8 (logits up to 1.3; bf16 products are exact in float32);
    # atol = 3x that.
    assert_trees_close(got, want.astype(np.float32), atol=2.2e-7)
    unrounded = numpy_forward(ref, tokens)
    assert np.abs(want - unrounded).max() > 1e-4, "the reference cannot tell bf16 from f32"


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(num_layers=-1), dict(dropout=1.0),
                                 dict(dtype="float8"), dict(backward="magic")])
def test_bad_model_config_is_a_clear_error(bad):
    """Fails if a bad field is accepted, or the error does not name the field."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        ModelConfig(vocab_size=5, **bad)
