"""Accelerator readiness without an accelerator: the train step (every objective, both backward
passes, accumulation), the eval step and the sampler lower for CUDA and TPU, and their programs
call no custom target outside a small allow-list (no CPU-only kernel slips in)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from lstm_jax import CharLSTM, ModelConfig, Vocab, export, parallel
from lstm_jax import steps as steps_lib

PLATFORMS = ("cuda", "tpu")
# Custom calls XLA understands on every platform (sharding annotations); anything else in a
# program lowered for a GPU or TPU is a platform kernel, which must be asked for on purpose.
PORTABLE_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
VOCAB = 20


def custom_call_targets(text: str) -> set:
    return set(re.findall(r"stablehlo\.custom_call @(\w+)", text)) | \
        set(re.findall(r'call_target_name = "(\w+)"', text))


def assert_lowers(jitted, *args):
    lowered = jitted.trace(*args).lower(lowering_platforms=PLATFORMS)
    text = lowered.as_text()
    assert "func.func public @main" in text
    assert custom_call_targets(text) <= PORTABLE_TARGETS, custom_call_targets(text)
    return text


@pytest.mark.parametrize("objective,backward,accum", [
    ("sequence", "custom", 1), ("window", "autodiff", 1), ("stream", "custom", 2)])
def test_train_step_lowers_for_cuda_and_tpu(objective, backward, accum):
    config = tiny_config(objective=objective, grad_accum_steps=accum, **{"model.backward": backward,
                                                                          "model.num_layers": 2})
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx = steps_lib.make_optimizer(config, 100)
    graphdef, state = steps_lib.init_state(config, steps_lib.model_config(config, VOCAB), tx, mesh)
    step = steps_lib.make_train_step(graphdef, tx, config, steps_per_epoch=10)
    batch = jnp.zeros((config.batch_size, config.seq_len + 1), jnp.int32)
    text = assert_lowers(step, state, batch, jax.random.key(0))
    assert "stablehlo.while" in text       # the recurrence is a loop, not unrolled


def test_eval_step_lowers_for_cuda_and_tpu():
    config = tiny_config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx = steps_lib.make_optimizer(config, 100)
    graphdef, state = steps_lib.init_state(config, steps_lib.model_config(config, VOCAB), tx, mesh)
    assert_lowers(steps_lib.make_eval_step(graphdef), state.params,
                  jnp.zeros((8, config.seq_len + 1), jnp.int32))


def test_sampler_block_lowers_for_cuda_and_tpu_with_cumsum_draw():
    vocab = Vocab.from_text("abcdefghij \n")
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), hidden_size=16), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    block, holder = export.sampler_block(graphdef, len(vocab), filters=True)
    holder["treedef"] = treedef
    rows, steps = 8, 4
    carry = (model.initial_carry(rows), jnp.zeros((rows,), jnp.int32))
    args = (leaves, carry, np.zeros((rows, steps), np.int32), np.ones((rows,), np.int32),
            np.ones((rows,), np.float32), np.int32(0), np.uint32(0), np.int32(3), np.float32(0.9),
            np.int32(0))
    text = assert_lowers(jax.jit(block), *args)
    # The non-CPU branch is the cumsum kernel: a cumulative sum appears (reduce_window or a
    # scan), and the unrolled kernel's V-way chain of selects does not.
    cpu = jax.jit(block).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert cpu != text
