"""Held-out evaluation: windowed metrics and the whole text read with the state carried
(`Evaluator`, run by the training loop), and `evaluate_text` for a trained workdir (`lstm-jax eval`).

Rows stay sharded and the host reduces them: the programs have no collectives.
"""
from __future__ import annotations

import math
import pathlib
from typing import Optional

import jax
import numpy as np
from flax import nnx

from lstm_jax import checkpoint, data, parallel, steps
from lstm_jax.model import ModelConfig

LN2 = math.log(2.0)


class Evaluator:
    """Held-out metrics of params. On windows (the Keras reference's yardstick, from a zero state):
    val_loss (nats/char over every position), val_bpc, and val_last_loss (the loss on the char
    after each window). On the whole held-out text with the state carried (`TextEval`, as many
    long streams as one eval batch has rows, fewer for a short text): val_text_loss and
    val_text_bpc. Rows stay sharded and the host reduces them: no collectives.

    `max_chars`: a fixed subset of about that many held-out chars (the same every time: evenly
    spaced windows for half of it, the held-out text's first chars for the other half), for the
    periodic evaluations of a time-budgeted run. Each result names its size in `val_chars`
    (positions scored by the windows + chars of the text)."""
    MIN_STREAM = 1024    # chars per stream at least: less of a short text read from a cold state

    def __init__(self, plan, graphdef, max_chars: Optional[int] = None):
        self.plan, self.eval_step = plan, steps.make_eval_step(graphdef, plan.mesh)
        self.rows_per_call = plan.batch   # the training batch: a multiple of the devices
        windows, val = plan.windows, plan.corpus.val_tokens
        with_text = plan.config.eval_text and len(val) > 1
        if max_chars is not None:
            share = max_chars // 2 if with_text and windows is not None else max_chars
            if windows is not None:
                k = min(len(windows), max(1, share // plan.config.eval_window))
                windows = windows[np.linspace(0, len(windows) - 1, k).round().astype(int)]
            val = val[:max(share, 2) + 1]
        self.windows, self.text, self.chars = windows, None, 0
        if windows is not None:
            self.padded, self.weight = data.pad_rows(windows, self.rows_per_call)
            self.chars += len(windows) * plan.config.eval_window
        if with_text:
            self.text = TextEval(graphdef, plan.model_cfg, val, plan.mesh,
                                 min(self.rows_per_call, (len(val) - 1) // self.MIN_STREAM))
            self.chars += self.text.chars

    def __call__(self, params) -> dict:
        out = {"val_chars": self.chars} if self.chars else {}
        if self.windows is not None:
            k, mesh = self.rows_per_call, self.plan.mesh
            rows = parallel.process_rows(k)
            parts = [self.eval_step(params, parallel.to_global(self.padded[i:i + k][rows], mesh))
                     for i in range(0, len(self.padded), k)]
            loss_sum = np.concatenate([np.asarray(parallel.gather(p[0])) for p in parts])
            last = np.concatenate([np.asarray(parallel.gather(p[1])) for p in parts])
            w = self.weight
            val_loss = float((loss_sum * w).sum() / (w.sum() * self.plan.config.eval_window))
            out.update(val_loss=val_loss, val_bpc=val_loss / LN2,
                       val_last_loss=float((last * w).sum() / w.sum()))
        if self.text is not None:
            loss = self.text(params)
            out.update(val_text_loss=loss, val_text_bpc=loss / LN2)
        return out


class TextEval:
    """Loss of a model on a whole text with the LSTM state carried: the text cut into `streams`
    long contiguous streams (each read from a zero state), run `CHUNK` chars per call (one
    compiled shape), per-row sums reduced on the host (no collectives). The bits-per-char that
    papers report (enwik8, text8, PTB-char)."""
    CHUNK = 256

    def __init__(self, graphdef, model_cfg: ModelConfig, tokens: np.ndarray, mesh, streams: int):
        n = mesh.devices.size
        streams = max(n, streams // n * n)
        tokens, weight = data.text_streams(np.asarray(tokens), streams)
        tokens, weight = data.pad_rows(tokens, n)[0], data.pad_rows(weight, n)[0]
        pad = -weight.shape[1] % self.CHUNK
        self.tokens = np.pad(tokens, ((0, 0), (0, pad)), mode="edge")
        self.weight = np.pad(weight, ((0, 0), (0, pad)))
        self.chars, self.streams = int(self.weight.sum()), len(self.tokens)
        self.mesh, self.model_cfg = mesh, model_cfg
        self.step = steps.make_text_eval_step(graphdef, mesh)

    def __call__(self, params) -> float:
        """Mean next-char loss (nats) over every char of the text after the first."""
        mesh, rows = self.mesh, parallel.process_rows(self.streams)
        local = np.zeros((rows.stop - rows.start, self.model_cfg.hidden_size), np.float32)
        carry = tuple((parallel.to_global(local, mesh), parallel.to_global(local, mesh))
                      for _ in range(self.model_cfg.num_layers))   # separate buffers: donated
        sums = []
        for i in range(0, self.weight.shape[1], self.CHUNK):
            chunk = parallel.to_global(self.tokens[rows, i:i + self.CHUNK + 1], mesh)
            w = parallel.to_global(self.weight[rows, i:i + self.CHUNK], mesh)
            loss_sum, carry = self.step(params, chunk, w, carry)
            sums.append(loss_sum)
        return float(sum(parallel.gather(x).astype(np.float64).sum() for x in sums)) / self.chars


def evaluate_text(workdir: str | pathlib.Path, text: Optional[str] = None, *,
                  step: Optional[int] = None, drop_unknown: bool = False,
                  streams: int = 64) -> dict:
    """Whole-text loss and bits per char of a trained workdir's model on `text` (default: the
    run's own held-out split), encoded with the run's vocabulary: characters outside it are an
    error naming them, or dropped and counted with `drop_unknown`."""
    model, vocab, config, at = checkpoint.restore_model_at(workdir, step)
    dropped = 0
    if text is None:
        tokens = data.load_corpus(config, vocab).val_tokens
        source = "the run's held-out split"
    else:
        unknown = set(vocab.unknown_chars(text))
        dropped = sum(1 for c in text if c in unknown) if unknown else 0
        tokens = vocab.encode(text, unknown="drop" if drop_unknown else "error")
        source = "the given text"
    graphdef, params = nnx.split(model)
    mesh = parallel.make_mesh()
    params = jax.device_put(params, parallel.replicated(mesh))
    n_streams = max(1, min(streams, (len(tokens) - 1) // Evaluator.MIN_STREAM))
    evaluator = TextEval(graphdef, model.config, tokens, mesh, n_streams)
    loss = evaluator(params)
    return {"step": at, "source": source, "chars": evaluator.chars, "streams": evaluator.streams,
            "dropped_unknown": dropped, "text_loss": loss, "text_bpc": loss / LN2}
