"""CharLSTM against a float64 NumPy LSTM: logits, gradients, unrolling, causality, the step API."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lstm_jax.model import CharLSTM, ModelConfig


def numpy_forward(params, tokens_BxT):
    """Reference: one-hot inputs, explicit per-step gates (i, f, g, o), float64."""
    sig = lambda x: 1 / (1 + np.exp(-x))
    B, T = tokens_BxT.shape
    V = params["head_kernel"].shape[1]
    x = np.eye(V)[tokens_BxT]                       # one-hot (B, T, V)
    for layer in params["layers"]:
        H = layer["kernel_rec"].shape[0]
        h, c, outs = np.zeros((B, H)), np.zeros((B, H)), []
        for t in range(T):
            z = x[:, t] @ layer["kernel_in"] + h @ layer["kernel_rec"] + layer["bias"]
            i, f, g, o = np.split(z, 4, axis=-1)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    return x @ params["head_kernel"] + params["head_bias"]


def numpy_loss(params, tokens_BxT1):
    logits = numpy_forward(params, tokens_BxT1[:, :-1])
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = tokens_BxT1[:, 1:]
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def as_numpy_params(model):
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state))
    pure["layers"] = [pure["layers"][i] for i in sorted(pure["layers"])]
    return pure


def make_model(num_layers=2, backward="autodiff", keras_init=False, V=11, H=8):
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=num_layers, keras_init=keras_init,
                      backward=backward)
    return CharLSTM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("keras_init", [False, True])
def test_forward_matches_numpy_float64(num_layers, keras_init):
    model = make_model(num_layers, keras_init=keras_init)
    tokens = np.random.default_rng(0).integers(0, 11, (3, 7))
    got = np.asarray(model(jnp.asarray(tokens)))
    want = numpy_forward(as_numpy_params(model), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward", ["autodiff", "custom"])
def test_gradients_match_numpy_finite_differences(backward):
    """Analytic gradients vs central differences of the float64 NumPy loss, every parameter."""
    model = make_model(2, backward=backward, V=7, H=4)
    tokens = np.random.default_rng(1).integers(0, 7, (2, 6))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(tokens[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens[:, 1:])).mean()
    grads = nnx.to_pure_dict(jax.grad(loss)(params))
    ref = as_numpy_params(model)
    eps = 1e-6

    def check(got, ref_leaf, path):
        num = np.zeros_like(ref_leaf)
        for idx in np.ndindex(ref_leaf.shape):
            old = ref_leaf[idx]
            ref_leaf[idx] = old + eps
            up = numpy_loss(ref, tokens)
            ref_leaf[idx] = old - eps
            down = numpy_loss(ref, tokens)
            ref_leaf[idx] = old
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(np.asarray(got), num, rtol=1e-5, atol=2e-7, err_msg=path)

    check(grads["head_kernel"], ref["head_kernel"], "head_kernel")
    check(grads["head_bias"], ref["head_bias"], "head_bias")
    for i in range(2):
        for name in ("kernel_in", "kernel_rec", "bias"):
            check(grads["layers"][i][name], ref["layers"][i][name], f"layers.{i}.{name}")


def test_scan_equals_unrolled_step_loop():
    model = make_model(2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (4, 9)))
    full = model(tokens)
    carry = model.initial_carry(4)
    steps = []
    for t in range(tokens.shape[1]):
        logits, carry = model.step(tokens[:, t], carry)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(full), np.stack(steps, axis=1), rtol=1e-6, atol=1e-6)


def test_carry_continues_a_sequence():
    """Running 5 then 4 chars with the carry handed over equals running all 9 at once."""
    model = make_model(2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 9)))
    first, carry = model(tokens[:, :5], return_carry=True)
    second = model(tokens[:, 5:], carry)
    np.testing.assert_allclose(np.concatenate([first, second], 1), model(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backward", ["autodiff", "custom"])
def test_causality_through_gradients(backward):
    """The loss at position t has zero gradient with respect to inputs after t."""
    model = make_model(2, backward=backward)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 11, (2, 8)))
    t = 3

    def loss_with_delta(delta_TxBx4H):
        """Differentiates w.r.t. a per-position perturbation of layer 0's input projection."""
        logits = _forward_with_input_delta(nnx.merge(graphdef, params), tokens, delta_TxBx4H)
        return logits[:, t].sum()

    delta = jnp.zeros((8, 2, 4 * 8))
    g = jax.grad(loss_with_delta)(delta)
    assert np.all(np.asarray(g[t + 1:]) == 0), "future inputs influence the past"
    assert np.any(np.asarray(g[: t + 1]) != 0)


def _forward_with_input_delta(model, tokens_BxT, delta_TxBx4H):
    from lstm_jax import recurrence
    layer = model.layers[0]
    xproj = layer.kernel_in[...][tokens_BxT.T] + layer.bias[...] + delta_TxBx4H
    carry = model.initial_carry(tokens_BxT.shape[0])
    _, x = recurrence.lstm_layer(xproj, layer.kernel_rec[...], carry[0], jnp.float32,
                                 backward=model.config.backward)
    for i, layer in enumerate(model.layers[1:], start=1):
        xproj = x @ layer.kernel_in[...] + layer.bias[...]
        _, x = recurrence.lstm_layer(xproj, layer.kernel_rec[...], carry[i], jnp.float32,
                                     backward=model.config.backward)
    return jnp.swapaxes(model.head(x), 0, 1)


def test_window_last_only_equals_last_position():
    model = make_model(1)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 6)))
    np.testing.assert_allclose(model(tokens, last_only=True), model(tokens)[:, -1], rtol=1e-6)


def test_keras_init_matches_keras_conventions():
    model = make_model(1, keras_init=True, V=57, H=128)
    layer = model.layers[0]
    bias = np.asarray(layer.bias[...])
    assert np.all(bias[128:256] == 1) and np.all(bias[:128] == 0) and np.all(bias[256:] == 0)
    rec = np.asarray(layer.kernel_rec[...])           # orthogonal (H, 4H): rows orthonormal
    np.testing.assert_allclose(rec @ rec.T, np.eye(128), atol=1e-5)
    limit = np.sqrt(6 / (57 + 512))                   # glorot_uniform
    assert np.abs(np.asarray(layer.kernel_in[...])).max() <= limit


def test_bfloat16_compute_is_close_to_float32():
    f32 = make_model(1, V=11, H=16)
    cfg = ModelConfig(vocab_size=11, hidden_size=16, num_layers=1, dtype="bfloat16")
    bf16 = CharLSTM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 11, (2, 10)))
    out = bf16(tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, f32(tokens), atol=5e-2)


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(num_layers=-1), dict(dropout=1.0),
                                 dict(dtype="float8"), dict(backward="magic")])
def test_bad_model_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ModelConfig(vocab_size=5, **bad)
