"""The recipe: a good character model of any corpus in a fixed wall time.

Command:  lstm-jax train --config configs/recipe.py --config.corpus=PATH_OR_NAME \
              --config.time_budget_s=600 --workdir runs/mine

Fixed here: at most 20 epochs (a small corpus read more often than that overfits, so a long
budget on it ends early with the better model; a large corpus never gets there); the sequence
objective (loss at every position) over shuffled 100-char chunks, batch 32; RMSprop 0.01 with
clipping 5 and a cosine decay whose horizon is the number of steps that fit the budget
(`time_budget_s`, the run's wall time, evaluations included: measured once after warm-up, saved
with the run); the kept best checkpoint is the one with the lowest whole-text val_text_bpc, which
`sample` and `eval --step` should use when the run ends past its best point.

Chosen per run from the corpus size, the budget and the host (lstm_jax.recipe; the start-up line
says what and why): the model (on a CPU the last of LSTM(256), LSTM(384) and two layers of 256
that the budget reads the text at least 14 times at: LSTM(256) reads it ~2.8x as often as two
layers; accelerators LSTM(512)), the dropout (between layers and before the head: none
for a corpus read about once, 0.25 for one read about twelve times, more beyond) and the matmul
dtype (bfloat16 on CPUs with AVX512-BF16). Set any of them on the command line to override (a
hidden size set alone keeps one layer). The measurements behind the rule, against the previous
fixed recipe (LSTM(512), dropout 0.25, float32): benchmarks/README.md, "Recipe".
"""
from lstm_jax.config import get_config as _base


def get_config():
    c = _base()
    c.objective = "sequence"
    c.seq_len = 100
    c.batch_size = 32
    c.model.hidden_size = 0      # the recipe chooses (lstm_jax.recipe)
    c.model.num_layers = 0       # the recipe chooses
    c.model.dropout = -1.0       # the recipe chooses
    c.model.dtype = "auto"       # the recipe chooses
    c.model.embed_scale = 1.0    # unit-scale character embeddings: models leave the unigram
                                 # plateau in tens of steps, not hundreds (benchmarks/README.md,
                                 # "Embedding scale")
    c.optimizer.learning_rate = 0.01
    c.optimizer.clip_norm = 5.0
    c.optimizer.schedule = "cosine"
    c.time_budget_s = 600.0
    c.num_epochs = 20            # at most: past ~20 epochs a small corpus overfits LSTM(512)
                                 # (the run then ends before its budget); else the budget decides
    c.eval_every = 250           # on a fixed held-out subset (~5% of the budget), whole at the end
    c.eval_stride = c.eval_window  # windows tile the held-out text, each char scored once (ones
    c.eval_max_windows = 4096      # every 3 chars scored each up to 20 times: most of the cost of
                                   # the two whole evaluations that end a run)
    c.checkpoint.every_steps = 1000
    c.checkpoint.best_metric = "val_text_bpc"
    c.sample.every_epochs = 0    # samples once, at the end
    c.log_every = 100
    return c
