"""The FLOP count per character against a hand count and against the dot products that the
train step's own program contains; the peak table and the measured CPU GEMM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lstm_jax import flops
from lstm_jax import steps as steps_lib
from lstm_jax.model import ModelConfig


def test_count_equals_a_hand_count():
    # LSTM(2 layers, H=8), V=5: layer 0 gathers (0) + recurrence 2*8*32; layer 1 input 2*8*32 +
    # recurrence 2*8*32; head 2*8*5. Forward = 3*512 + 80 = 1616; train = 3 x forward.
    c = flops.count(ModelConfig(vocab_size=5, hidden_size=8, num_layers=2))
    assert (c.embedding, c.input_projection, c.recurrence, c.head) == (0, 512, 1024, 80)
    assert c.forward == 1616 and c.train == 4848
    # The DESIGN.md formula: 3 x 2 x (4H(H + E) + HV), E = 0 for the first layer.
    assert flops.count(ModelConfig(vocab_size=100, hidden_size=256)).train == 3 * 2 * (4 * 256 * 256 + 256 * 100)
    w = flops.count(ModelConfig(vocab_size=5, hidden_size=8), objective="window", seq_len=10)
    assert w.head == 8 and w.recurrence == 512
    assert flops.train_flops_per_step(ModelConfig(vocab_size=5, hidden_size=8, num_layers=2), 4, 10) == 4848 * 40
    with pytest.raises(ValueError, match="seq_len"):
        flops.count(ModelConfig(vocab_size=5, hidden_size=8), objective="window")


def dot_flops(jaxpr, scale=1) -> float:
    """2 x M x N x K of every dot_general in a jaxpr, loops multiplied by their trip counts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            k = np.prod([a[i] for i in lc])
            total += scale * 2 * np.prod(a) * np.prod(b) / k / np.prod([a[i] for i in lb])
        inner = scale * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += dot_flops(sub.jaxpr, inner)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += dot_flops(sub, inner)
    return total


@pytest.mark.parametrize("objective,layers,backward", [
    ("sequence", 2, "custom"), ("sequence", 1, "autodiff"), ("window", 2, "custom")])
def test_count_equals_the_train_steps_dot_products(objective, layers, backward):
    """Fails if the count forgets a product the step computes (or counts one it does not)."""
    config = tiny_config(objective=objective, **{"model.num_layers": layers, "model.backward": backward})
    vocab = 40
    mcfg = steps_lib.model_config(config, vocab)
    from flax import nnx
    from lstm_jax import CharLSTM
    model = CharLSTM(mcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = jnp.zeros((config.batch_size, config.seq_len + 1), jnp.int32)
    grad = jax.grad(lambda p: steps_lib.loss_fn(p, graphdef, batch, None, objective)[0])
    counted = dot_flops(jax.make_jaxpr(grad)(params).jaxpr)
    # Boundary timesteps may differ by one recurrent product per layer: the weight gradient at
    # t = 0 (h = 0) may be skipped, the gradient into the initial state may be computed.
    want = flops.train_flops_per_step(mcfg, config.batch_size, config.seq_len, objective)
    one_step = 2 * 2 * config.batch_size * mcfg.hidden_size * 4 * mcfg.hidden_size * layers
    assert abs(counted - want) <= one_step, (counted, want)


def test_table_peaks_by_device_kind():
    assert flops.table_peak("NVIDIA H100 80GB HBM3") == 494.7e12
    assert flops.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.table_peak("NVIDIA L40S") == 183e12
    assert flops.table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert flops.table_peak("TPU v5p") == 459e12
    assert flops.table_peak("Some New Chip") is None


def test_cpu_peak_is_a_measured_gemm():
    peak = flops.device_peak(jax.devices()[:1])
    assert peak.source.startswith("measured") and 1e8 < peak.flops_per_s < 1e14
    assert flops.mfu(peak.flops_per_s / 4, peak) == pytest.approx(0.25)
