"""`lstm-jax plot` and `lstm-jax bench`."""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from lstm_jax.commands import common


def plot(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("workdir", None, "run directories to plot (repeat for several)", flag_values=fv)
    flags.DEFINE_string("out", "loss.png", "PNG to write", flag_values=fv)
    flags.DEFINE_bool("keras_reference", True, "draw the Keras reference figures as points", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    common.define_common(fv)
    common.parse(fv, argv, "plot")
    from lstm_jax import plot as plot_lib
    out = common.path(fv["out"].value)
    if os.path.isdir(out):
        raise SystemExit(f"lstm-jax: error: --out {out} is a directory; name a PNG file, such as "
                         f"{os.path.join(out, 'loss.png')}")
    if not os.path.splitext(out)[1]:   # matplotlib would write OUT.png
        raise SystemExit(f"lstm-jax: error: --out {out} has no file extension; name a PNG file, "
                         f"such as {out}.png")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise SystemExit(f"lstm-jax: error: the directory of --out {out} does not exist; create it first")
    common.friendly(lambda: plot_lib.plot_runs([common.path(w) for w in fv["workdir"].value], out,
                                               keras_reference=fv["keras_reference"].value),
              fv["debug"].value)
    print(f"wrote {out}")
    return 0


def bench(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("out", "bench.json", "JSON report to write ('' for none)", flag_values=fv)
    flags.DEFINE_string("plot", None, "also draw the report to this PNG (needs matplotlib)", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 0, "vocabulary size (default: the config corpus's)", flag_values=fv)
    flags.DEFINE_enum("torch", "auto", ["auto", "on", "off"], "PyTorch nn.LSTM in the same interleaved rounds (auto: if installed)", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "interleaved timed rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("min_time", 1.0, "seconds per timed round and side (at least 2 steps)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_list("sample_rows", ["1", "1024", "4096"], "sampler rows to time", flag_values=fv)
    flags.DEFINE_integer("sample_length", 200, "characters per sampled row", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("quick", False, "seconds-long smoke run: 1 short round, sampler at 1 and 64 rows of 16 chars", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    common.define_common(fv)
    argv = common.define_config(fv, argv)
    common.parse(fv, argv, "bench", common.config_help())
    config, debug = fv["config"].value, fv["debug"].value
    from lstm_jax import config as config_lib
    from lstm_jax import recipe
    try:
        config_lib.validate(config)
        if recipe.is_auto(config):
            raise ValueError("bench times one model, and the recipe chooses it from a run's time "
                             "budget: set model.hidden_size, model.num_layers, model.dropout and "
                             "model.dtype (e.g. --config.model.hidden_size=256 ...)")
        rows = tuple(int(r) if r.strip().isdigit() else 0 for r in fv["sample_rows"].value)
        if not rows or min(rows) < 1:
            raise ValueError(f"--sample_rows must be positive row counts, got "
                             f"{','.join(fv['sample_rows'].value) or 'none'}")
    except ValueError as e:
        raise SystemExit(f"lstm-jax: error: {e}")
    vocab_size = fv["vocab_size"].value
    if not vocab_size:
        from lstm_jax import data as data_lib
        vocab_size = len(common.friendly(lambda: data_lib.load_corpus(config), debug).vocab)
    host = common.host_setup(config, vocab_size=vocab_size)
    print(host.summary())
    import json
    from lstm_jax import bench as bench_lib
    opts = dict(torch=fv["torch"].value, progress=fv["progress"].value)
    options = bench_lib.Options.quick(**opts) if fv["quick"].value else bench_lib.Options(
        repeats=fv["repeats"].value, min_time=fv["min_time"].value, sample_rows=rows,
        sample_length=fv["sample_length"].value, **opts)
    report = common.friendly(lambda: bench_lib.run(config, vocab_size, options), debug)
    print(bench_lib.table(report))
    if fv["out"].value:
        with open(fv["out"].value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {fv['out'].value}")
    if fv["plot"].value:
        common.friendly(lambda: bench_lib.plot(report, fv["plot"].value), debug)
        print(f"wrote {fv['plot'].value}")
    return 0
