"""The recipe: a good character model of any corpus in a fixed training time.

Command:  lstm-jax train --config configs/recipe.py --config.corpus=PATH_OR_NAME \
              --config.time_budget_s=600 --workdir runs/mine

What it picks, and why (measured on Nietzsche, pydoc and the standard library's source:
benchmarks/README.md, "Recipe"):
- LSTM(512), one layer, dropout 0.25 on its output (before the softmax head): at 10 minutes on a 2-core
  CPU, LSTM(256) without dropout (configs/nietzsche.py) overfits a 600k-char corpus after about
  2 minutes, and its whole-text val_bpc then climbs;
- the sequence objective (loss at every position) over shuffled 100-char chunks, batch 32: the
  stateful `stream` objective carries the state across steps but ends worse at the same time;
- RMSprop 0.01 with clipping 5 and a cosine decay whose horizon is the number of steps that fit
  the budget (`time_budget_s`: measured once after warm-up, saved with the run);
- the checkpoint kept as best is the one with the lowest whole-text val_text_bpc, which is what
  `sample` and `eval --step` should use when the run ends past its best point.

Change `time_budget_s` for your machine and patience; the run length follows it.

Measured here (2-core CPU, time_budget_s=600, whole-text val_text_bpc at the end): Nietzsche
1.853 (configs/nietzsche.py under the same budget: 2.185), pydoc (builtin) 1.428, the standard
library's source (12 MB) 1.849; with objective=stream 1.927, 1.464 and 1.902. Below ~4 minutes of
training configs/nietzsche.py's smaller model is ahead.
"""
from lstm_jax.config import get_config as _base


def get_config():
    c = _base()
    c.objective = "sequence"
    c.seq_len = 100
    c.batch_size = 32
    c.model.hidden_size = 512
    c.model.num_layers = 1
    c.model.dropout = 0.25
    c.optimizer.learning_rate = 0.01
    c.optimizer.clip_norm = 5.0
    c.optimizer.schedule = "cosine"
    c.time_budget_s = 600.0
    c.num_epochs = 1000          # an upper bound; the time budget decides the length
    c.eval_every = 250           # whole-text val_text_bpc every 250 steps (~45 s here)
    c.eval_max_windows = 4096
    c.checkpoint.every_steps = 1000
    c.checkpoint.best_metric = "val_text_bpc"
    c.sample.every_epochs = 0    # samples once, at the end
    c.log_every = 100
    return c
