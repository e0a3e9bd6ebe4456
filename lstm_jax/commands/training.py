"""`lstm-jax train` and `lstm-jax prepare`."""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from lstm_jax import signals
from lstm_jax.commands import common


def train(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", "runs/default", "run directory (checkpoints, metrics, samples)", flag_values=fv)
    flags.DEFINE_bool("new_run", False, "move an existing run in --workdir aside and start afresh", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step to resume from (default: the newest readable)", flag_values=fv)
    common.define_common(fv)
    argv = common.define_config(fv, argv)
    common.parse(fv, argv, "train", common.config_help())
    config, workdir = fv["config"].value, common.path(fv["workdir"].value)
    from lstm_jax import config as config_lib
    try:
        config_lib.validate(config)
    except ValueError as e:
        raise SystemExit(f"lstm-jax: error: {e}")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise SystemExit(f"lstm-jax: error: --workdir {workdir} is a file, not a directory; "
                         f"choose another --workdir")
    signals.stop_if_signalled()
    from lstm_jax import data, train as train_lib   # imports JAX, computes nothing
    signals.stop_if_signalled()
    corpus = common.friendly(lambda: data.load_corpus(config), fv["debug"].value)
    signals.stop_if_signalled()
    if missing := corpus.vocab.unknown_chars(config.sample.prime):
        raise SystemExit(f"lstm-jax: error: sample.prime {config.sample.prime!r} has characters "
                         f"outside the corpus's vocabulary: {''.join(missing)!r}; choose a prime "
                         f"made of the corpus's characters (or '' for a held-out window)")
    from lstm_jax import recipe
    config, chosen = common.friendly(lambda: recipe.apply(config, corpus, workdir, fv["new_run"].value),
                                     fv["debug"].value)
    host = common.host_setup(config, vocab_size=len(corpus.vocab))
    import jax
    signals.stop_if_signalled()
    if jax.process_index() == 0:
        print(host.summary())
        if chosen:
            print(chosen)
        if note := host.confirm(jax.default_backend()):
            print(note)
    result = common.friendly(lambda: train_lib.train_and_evaluate(
        config, workdir, new_run=fv["new_run"].value, progress=fv["progress"].value,
        step=fv["step"].value, corpus=corpus), fv["debug"].value)
    if result.preempted:
        return 130 if result.preempted_by == "SIGINT" else 143
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("train_loss", "val_loss", "val_last_loss") if k in m)
    if jax.process_index() == 0:
        print(f"done: step {result.step}" + (f", {shown}" if shown else "") + f"; workdir {workdir}")
    return 0


def prepare(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory for train.bin, val.bin, vocab.json", flag_values=fv)
    flags.DEFINE_bool("replace", False, "overwrite a corpus already prepared in --out (runs trained from it then refuse to eval on it)", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    common.define_common(fv)
    argv = common.define_config(fv, argv)
    common.parse(fv, argv, "prepare", common.config_help())
    config, out = fv["config"].value, common.path(fv["out"].value)
    from lstm_jax import config as config_lib, corpora, data
    signals.stop_if_signalled(then_raise=True)
    debug = fv["debug"].value
    try:
        config_lib.validate(config)
        data.check_prepare_out(out, fv["replace"].value)
    except ValueError as e:
        raise SystemExit(f"lstm-jax: error: {e}")
    text = common.friendly(lambda: corpora.load_text(config.corpus, lowercase=config.lowercase,
                                                     errors=config.encoding_errors), debug)
    vocab = common.friendly(lambda: data.prepare(text, out, config.val_fraction, replace=fv["replace"].value,
                                                 vocab=data.Vocab.from_text(text, kind=config.vocab)), debug)
    print(f"prepared {len(text):,} chars, vocab {len(vocab)}, in {out}; "
          f"train with --config.corpus=prepared:{out}")
    return 0
