"""The `lstm-jax` command line: train | sample | eval | prepare | plot. Nothing else parses flags.

Flags use absl; `--config` takes a configs/*.py file (default: the built-in default config) and
`--config.FIELD=VALUE` overrides any field, as in the Flax examples.
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from lstm_jax import hostenv, signals  # light: import no JAX

COMMANDS = {
    "train": "train a model (resumes from the workdir's latest checkpoint)",
    "sample": "generate text from a trained workdir",
    "eval": "bits per char of a trained model on a whole text (default: its held-out split)",
    "prepare": "encode a corpus once into memory-mappable train/val arrays",
    "plot": "draw a run's loss curves (metrics.jsonl) to a PNG",
    "bench": "measure a config's train step (chars/s, FLOP/s, MFU, vs PyTorch) and the sampler here",
    "export": "write the sampler as a jax.export program (cpu, cuda, tpu) with a jax+numpy loader",
}


def _usage() -> str:
    lines = ["usage: lstm-jax COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`lstm-jax COMMAND --help` lists that command's flags (and, for train, every "
              "config field)."]
    return "\n".join(lines)


def _config_help() -> str:
    """Every config field with its default and the comment from lstm_jax/config.py."""
    from lstm_jax import config as config_lib
    comments = {}
    for line in inspect.getsource(config_lib.get_config).splitlines():
        m = re.match(r"\s*c\.([\w.]+)\s*=\s*(.+?)\s*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(3)
    rows = [f"  --config.{name}={value!r}  {comments.get(name, '')}"
            for name, value in config_lib.flat_items(config_lib.get_config())]
    return "config fields (override with --config.FIELD=VALUE):\n" + "\n".join(rows)


def _define_config(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Defines --config (the default config, or the file `--config FILE` names, loaded here so
    a missing or broken file is a one-line error); --config.FIELD=VALUE overrides either.
    Returns argv without `--config FILE` (absl sees only the overrides)."""
    from lstm_jax import config as config_lib
    argv, path = list(argv), None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if a.startswith("--config="):
            path, argv = a.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    try:
        config = config_lib.load_config_file(path) if path else config_lib.get_config()
    except ValueError as e:
        raise SystemExit(f"lstm-jax: error: {e}") from None
    try:   # sys_argv: absl defines a flag for each --config.FIELD override it finds there
        config_flags.DEFINE_config_dict("config", config, f"config ({path or 'the default'})",
                                        flag_values=fv, sys_argv=argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"lstm-jax: {_explain_flag_error(e, argv)}") from None
    return argv


def _parse(fv: flags.FlagValues, argv: Sequence[str], command: str, extra_help: str = "") -> None:
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: lstm-jax {command} [flags]\n\n{COMMANDS[command]}\n")
        print(fv.get_help())
        if extra_help:
            print("\n" + extra_help)
        raise SystemExit(0)
    try:
        fv(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"lstm-jax {command}: {_explain_flag_error(e, argv)}")
    if command in ("train", "sample", "eval", "bench", "export") and fv["compile_cache"].value:
        from lstm_jax import compile_cache
        if compile_cache.enabled_by_env():
            compile_cache.enable()


def _explain_flag_error(e: Exception, argv: Sequence[str]) -> str:
    """Names a misspelt --config.FIELD and the closest valid fields; else absl's message."""
    from lstm_jax import config as config_lib
    known = {name for name, _ in config_lib.flat_items(config_lib.get_config())}
    for arg in argv[1:]:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and m.group(1) not in known:
            hint = config_lib.closest_fields(m.group(1))
            return (f"unknown config field --config.{m.group(1)}"
                    + (f"; did you mean {' or '.join('--config.' + h for h in hint)}?" if hint else "")
                    + "\n  (lstm-jax train --help lists every config field)")
    return f"{e}\n  (lstm-jax COMMAND --help lists every flag)"


def _host_setup(config, vocab_size: int = 0) -> "hostenv.HostPlan":
    """Host settings (CPU runs only: allocator, CPU device count, XLA:CPU pool) and multi-host
    start-up; must run before JAX computes anything."""
    batch = (config.per_device_batch_size * hostenv.cpu_count() if config.per_device_batch_size
             else config.batch_size) // max(config.grad_accum_steps, 1)
    try:
        plan = hostenv.setup_host(hidden_size=config.model.hidden_size, batch_size=batch,
                                  cpu_devices=config.parallel.cpu_devices,
                                  tune_allocator=config.parallel.tune_allocator,
                                  vocab_size=vocab_size,
                                  mesh_devices=0 if config.parallel.distributed
                                  else config.parallel.num_devices)
    except ValueError as e:   # hostenv.UnsafeHostSetting: a PJRT_NPROC XLA:CPU would abort with
        raise SystemExit(f"lstm-jax train: {e}")
    if config.parallel.distributed:
        from lstm_jax import parallel
        parallel.initialize_distributed(config.parallel.coordinator_address,
                                        config.parallel.num_processes, config.parallel.process_id)
    return plan


def _path(value: Optional[str]) -> Optional[str]:
    """A path flag as the user meant it: `~` expanded (a shell leaves a quoted '~/wd' alone)."""
    return os.path.expanduser(value) if value else value


def _define_common(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("debug", False, "show the full traceback of an error", flag_values=fv)
    flags.DEFINE_bool("compile_cache", True, "keep compiled programs in the user cache directory "
                      "(lstm_jax/compile_cache.py); --nocompile_cache or LSTM_JAX_COMPILE_CACHE=0: off", flag_values=fv)


def train(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", "runs/default", "run directory (checkpoints, metrics, samples)", flag_values=fv)
    flags.DEFINE_bool("new_run", False, "move an existing run in --workdir aside and start afresh", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step to resume from (default: the newest readable)", flag_values=fv)
    _define_common(fv)
    argv = _define_config(fv, argv)
    _parse(fv, argv, "train", _config_help())
    config, workdir = fv["config"].value, _path(fv["workdir"].value)
    from lstm_jax import config as config_lib
    try:
        config_lib.validate(config)
    except ValueError as e:
        raise SystemExit(f"lstm-jax train: {e}")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise SystemExit(f"lstm-jax train: --workdir {workdir} is a file, not a directory; "
                         f"choose another --workdir")
    signals.stop_if_signalled()
    from lstm_jax import data, train as train_lib   # imports JAX, computes nothing
    signals.stop_if_signalled()
    corpus = _friendly(lambda: data.load_corpus(config), fv["debug"].value)
    signals.stop_if_signalled()
    if missing := corpus.vocab.unknown_chars(config.sample.prime):
        raise SystemExit(f"lstm-jax train: sample.prime {config.sample.prime!r} has characters "
                         f"outside the corpus's vocabulary: {''.join(missing)!r}; choose a prime "
                         f"made of the corpus's characters (or '' for a held-out window)")
    host = _host_setup(config, vocab_size=len(corpus.vocab))
    import jax
    signals.stop_if_signalled()
    if jax.process_index() == 0:
        print(host.summary())
        if note := host.confirm(jax.default_backend()):
            print(note)
    result = _friendly(lambda: train_lib.train_and_evaluate(
        config, workdir, new_run=fv["new_run"].value, progress=fv["progress"].value,
        step=fv["step"].value, corpus=corpus), fv["debug"].value)
    if result.preempted:
        return 130 if result.preempted_by == "SIGINT" else 143
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("train_loss", "val_loss", "val_last_loss") if k in m)
    if jax.process_index() == 0:
        print(f"done: step {result.step}" + (f", {shown}" if shown else "") + f"; workdir {workdir}")
    return 0


def sample(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "trained run directory", flag_values=fv)
    flags.DEFINE_integer("num_samples", 4, "rows to generate", flag_values=fv)
    flags.DEFINE_integer("length", 400, "characters per sample (after the prime)", flag_values=fv)
    flags.DEFINE_list("temperature", ["0.2", "0.5", "1.0", "1.2"], "temperatures cycled over rows; 0 = greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "keep only the k most likely chars (0 = off)", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)", flag_values=fv)
    flags.DEFINE_string("prime", "", "text every row starts from", flag_values=fv)
    flags.DEFINE_string("prime_file", None, "file with one prime per line, cycled over rows", flag_values=fv)
    flags.DEFINE_bool("drop_unknown", False, "drop prime chars outside the vocabulary instead of failing", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "row i's text depends only on (seed, i, its prime/temperature)", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 1024, "rows per compiled call; bounds memory", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar (several chunks only)", flag_values=fv)
    flags.DEFINE_string("out", None, "JSONL output ({index, temperature, prime, text}); stdout text if absent", flag_values=fv)
    flags.DEFINE_string("context", "state", "state (O(1) per char) | window (the Keras reference's rolling window)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    _define_common(fv)
    _parse(fv, argv, "sample")
    try:
        temperatures = [float(t) for t in fv["temperature"].value]
    except ValueError:
        raise SystemExit(f"lstm-jax sample: --temperature must be numbers separated by commas, "
                         f"got {','.join(fv['temperature'].value)!r}")
    workdir, out, prime_file = (_path(fv[name].value) for name in ("workdir", "out", "prime_file"))
    if prime_file and fv["prime"].value:
        raise SystemExit("lstm-jax sample: pass --prime or --prime_file, not both")
    if prime_file:
        try:
            with open(prime_file, encoding="utf-8") as f:
                prime = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"lstm-jax sample: cannot read --prime_file: {e}")
        if not prime:
            raise SystemExit(f"lstm-jax sample: --prime_file {prime_file} is empty; write one "
                             f"prime per line (an empty line primes nothing)")
    else:
        prime = fv["prime"].value or None
    from lstm_jax import checkpoint
    from lstm_jax import sample as sample_lib
    signals.stop_if_signalled(then_raise=True)
    debug = fv["debug"].value
    _friendly(lambda: _check_workdir(workdir, fv["step"].value, held_out=False), debug)
    model, vocab, config = _friendly(lambda: checkpoint.restore_model(workdir, fv["step"].value), debug)
    try:
        _friendly(lambda: write_samples(
            model, vocab, out, num_samples=fv["num_samples"].value,
            length=fv["length"].value, temperature=temperatures, top_k=fv["top_k"].value,
            top_p=fv["top_p"].value, prime=prime, seed=fv["seed"].value,
            chunk_size=fv["chunk_size"].value, unknown="drop" if fv["drop_unknown"].value else "error",
            context=fv["context"].value, window=config.seq_len, progress=fv["progress"].value), debug)
    except sample_lib.SamplingInterrupted as e:   # SIGINT/SIGTERM: the finished rows are kept
        print(f"lstm-jax: {e}", file=sys.stderr)
        return 130 if e.signal_name == "SIGINT" else 143
    return 0



class _NothingToKeep(Exception):
    """Interrupted before the first row: the temporary file goes, `--out` stays as it was."""


def write_samples(model, vocab, out: Optional[str] = None, *, num_samples: int = 1,
                  progress: bool = True, **kwargs) -> int:
    """Streams `sample.Sampler` rows as JSONL ({index, temperature, prime, text}) to `out`, chunk
    by chunk, or as plain text to stdout when `out` is None; a tqdm bar counts rows when there is
    more than one chunk. Takes `sample.generate`'s keyword arguments; returns the rows written.

    Every argument is checked before anything is opened. `out` is written through
    `files.atomic_open`, so an existing file survives a bad argument or a crash. On SIGINT/SIGTERM
    the rows finished so far are kept (renamed into `out`, valid JSONL) and SamplingInterrupted
    says how many.
    """
    import json
    from tqdm import tqdm
    from lstm_jax import files
    from lstm_jax import sample as sample_lib
    sampler = sample_lib.Sampler(model, vocab, mesh=kwargs.pop("mesh", None))
    plan = sampler.plan(num_samples, **kwargs)
    if out and os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give a file name such as {out}/samples.jsonl")
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        parent = os.path.dirname(out) or "."
        raise ValueError(f"--out {out}: the directory {parent} does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another --out")
    written, stopped_by = 0, None
    chunks = sampler.run(plan)
    try:
        with files.atomic_open(out) if out else contextlib.nullcontext(sys.stdout) as f:
            kept_bytes = 0
            try:
                with tqdm(total=num_samples, unit="sample", file=sys.stderr,
                          disable=not progress or plan.rows >= num_samples) as bar:
                    for chunk in chunks:
                        for i, t, p, text in zip(chunk.index, chunk.temperature, chunk.prime, chunk.texts):
                            if out:
                                f.write(json.dumps({"index": int(i), "temperature": float(t),
                                                    "prime": p, "text": text}, ensure_ascii=False) + "\n")
                            else:
                                head = f"----- sample {i}, temperature {float(t):g}\n" if num_samples > 1 else ""
                                f.write(f"{head}{p}{text}\n")
                        f.flush()
                        written += len(chunk.texts)
                        kept_bytes = f.tell() if out else 0
                        bar.update(len(chunk.texts))
            except (sample_lib.SamplingInterrupted, KeyboardInterrupt) as e:
                stopped_by = getattr(e, "signal_name", "SIGINT")
                if out and not written:
                    raise _NothingToKeep from None
                if out:   # keep the finished rows: cut a row half-written by a second Ctrl-C
                    f.truncate(kept_bytes)
    except _NothingToKeep:
        pass
    finally:
        chunks.close()
    if stopped_by:
        where = (f"{out} was left as it was" if out and not written else
                 f"{out} holds the {written:,} finished rows (valid JSONL)" if out else
                 f"wrote the {written:,} finished rows")
        raise sample_lib.SamplingInterrupted(f"sampling interrupted by {stopped_by} after {written:,} of "
                                             f"{num_samples:,} rows; {where}", stopped_by, written)
    return written

def evaluate(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "trained run directory", flag_values=fv)
    flags.DEFINE_string("text", None, "UTF-8 text file to evaluate (default: the run's held-out split)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest readable)", flag_values=fv)
    flags.DEFINE_bool("drop_unknown", False, "drop (and count) characters outside the run's vocabulary instead of failing", flag_values=fv)
    flags.DEFINE_integer("streams", 64, "parallel streams the text is cut into (each read with its state carried)", flag_values=fv)
    flags.DEFINE_bool("log", True, "append the result to <workdir>/eval.jsonl (--nolog for a read-only workdir)", flag_values=fv)
    flags.DEFINE_enum("encoding_errors", "strict", ["strict", "replace", "ignore"], "--text: how undecodable bytes are handled", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    _define_common(fv)
    _parse(fv, argv, "eval")
    import json
    import pathlib
    from lstm_jax import corpora
    debug, path, workdir = fv["debug"].value, _path(fv["text"].value), pathlib.Path(_path(fv["workdir"].value))
    log = workdir / "eval.jsonl"
    if fv["log"].value and workdir.is_dir() and not os.access(log if log.exists() else workdir, os.W_OK):
        raise SystemExit(f"lstm-jax eval: cannot write {log} (a read-only workdir?), where eval "
                         f"appends each result; make it writable, or pass --nolog")
    text = _friendly(lambda: corpora.load_text(path, flag="--text", errors=fv["encoding_errors"].value,
                                               errors_flag="--encoding_errors"), debug) if path else None
    from lstm_jax import evaluate as evaluate_lib
    signals.stop_if_signalled(then_raise=True)
    _friendly(lambda: _check_workdir(workdir, fv["step"].value, held_out=text is None), debug)
    result = _friendly(lambda: evaluate_lib.evaluate_text(workdir, text, step=fv["step"].value,
                                                  drop_unknown=fv["drop_unknown"].value,
                                                  streams=fv["streams"].value), debug)
    result["source"] = path or result["source"]
    print(f"{result['text_bpc']:.4f} bits/char ({result['text_loss']:.4f} nats) on {result['source']}: "
          f"{result['chars']:,} chars in {result['streams']} stream{'s' * (result['streams'] > 1)}, "
          f"step {result['step']}"
          + (f"; dropped {result['dropped_unknown']:,} unknown chars" if result["dropped_unknown"] else ""))
    def append():
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    if fv["log"].value:
        _friendly(append, debug)
    return 0


def _check_workdir(workdir, step: Optional[int], held_out: bool) -> None:
    """What `sample` and `eval` read beside the checkpoint must be what it was trained with (its
    metadata records both): vocab.json (an edited one decoded every sample wrongly, or failed
    as an 'unreadable' checkpoint), and, for `eval` of the held-out split (`held_out`) of a run
    trained from `prepared:DIR`, the prepared corpus (a DIR prepared again from another text was
    measured instead). Anything else wrong is left to the restore, which names it."""
    import json
    import pathlib
    from lstm_jax import checkpoint, data
    workdir = pathlib.Path(workdir)
    try:
        checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
    except checkpoint.CheckpointError:
        return
    try:
        meta = None
        for s in [step] if step is not None else reversed(checkpointer.all_steps()):
            try:
                meta = checkpointer.metadata(s)
                break
            except Exception:  # noqa: BLE001 - an unreadable step: the restore reports or skips it
                continue
    finally:
        checkpointer.close()
    if meta is None:
        return
    try:
        chars = json.loads((workdir / "vocab.json").read_text(encoding="utf-8"))["chars"]
    except (OSError, ValueError, KeyError, TypeError):
        chars = None   # unreadable: Vocab.load names it
    if chars is not None and "vocab" in meta and list(chars) != list(meta["vocab"]):
        raise data.DataError(
            f"{workdir / 'vocab.json'} ({len(chars)} chars) is not the vocabulary the checkpoints "
            f"were trained with ({len(meta['vocab'])} chars); restore the original (a `train` "
            f"resume of this workdir rewrites it from the checkpoint's metadata)")
    try:
        corpus = json.loads((workdir / "config.json").read_text())["corpus"]
    except (OSError, ValueError, KeyError, TypeError):
        return   # not a workdir: the restore says so
    if not held_out or not str(corpus).startswith("prepared:"):
        return
    directory = pathlib.Path(corpus.split(":", 1)[1])
    try:
        now = json.loads((directory / "meta.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return   # load_prepared names what is wrong with it
    trained = meta.get("corpus_fingerprint")
    if trained and now and trained != now:
        raise data.DataError(
            f"{directory} holds another corpus than the one {workdir} was trained on (it was "
            f"prepared again since); evaluate another text with --text FILE, or prepare the "
            f"original corpus into {directory} again")


def prepare(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory for train.bin, val.bin, vocab.json", flag_values=fv)
    flags.DEFINE_bool("replace", False, "overwrite a corpus already prepared in --out (runs trained from it then refuse to eval on it)", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    _define_common(fv)
    argv = _define_config(fv, argv)
    _parse(fv, argv, "prepare", _config_help())
    config, out = fv["config"].value, _path(fv["out"].value)
    from lstm_jax import config as config_lib, corpora, data
    signals.stop_if_signalled(then_raise=True)
    debug = fv["debug"].value
    try:
        config_lib.validate(config)
        data.check_prepare_out(out, fv["replace"].value)
    except ValueError as e:
        raise SystemExit(f"lstm-jax prepare: {e}")
    text = _friendly(lambda: corpora.load_text(config.corpus, lowercase=config.lowercase,
                                               errors=config.encoding_errors), debug)
    vocab = _friendly(lambda: data.prepare(text, out, config.val_fraction, replace=fv["replace"].value,
                                           vocab=data.Vocab.from_text(text, kind=config.vocab)), debug)
    print(f"prepared {len(text):,} chars, vocab {len(vocab)}, in {out}; "
          f"train with --config.corpus=prepared:{out}")
    return 0


def plot(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("workdir", None, "run directories to plot (repeat for several)", flag_values=fv)
    flags.DEFINE_string("out", "loss.png", "PNG to write", flag_values=fv)
    flags.DEFINE_bool("keras_reference", True, "draw the Keras reference figures as points", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    _define_common(fv)
    _parse(fv, argv, "plot")
    from lstm_jax import plot as plot_lib
    out = _path(fv["out"].value)
    if os.path.isdir(out):
        raise SystemExit(f"lstm-jax plot: --out {out} is a directory; name a PNG file, such as "
                         f"{os.path.join(out, 'loss.png')}")
    if not os.path.splitext(out)[1]:   # matplotlib would write OUT.png
        raise SystemExit(f"lstm-jax plot: --out {out} has no file extension; name a PNG file, "
                         f"such as {out}.png")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise SystemExit(f"lstm-jax plot: the directory of --out {out} does not exist; create it first")
    _friendly(lambda: plot_lib.plot_runs([_path(w) for w in fv["workdir"].value], out,
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
    flags.DEFINE_integer("repeats", 5, "interleaved timed rounds", flag_values=fv)
    flags.DEFINE_float("min_time", 1.0, "seconds per timed round and side", flag_values=fv)
    flags.DEFINE_list("sample_rows", ["1", "1024", "4096"], "sampler rows to time", flag_values=fv)
    flags.DEFINE_integer("sample_length", 200, "characters per sampled row", flag_values=fv)
    flags.DEFINE_bool("quick", False, "seconds-long smoke run: 1 short round, sampler at 1 and 64 rows of 16 chars", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    _define_common(fv)
    argv = _define_config(fv, argv)
    _parse(fv, argv, "bench", _config_help())
    config, debug = fv["config"].value, fv["debug"].value
    from lstm_jax import config as config_lib
    try:
        config_lib.validate(config)
        rows = tuple(int(r) for r in fv["sample_rows"].value)
    except ValueError as e:
        raise SystemExit(f"lstm-jax bench: {e}")
    vocab_size = fv["vocab_size"].value
    if not vocab_size:
        from lstm_jax import data as data_lib
        vocab_size = len(_friendly(lambda: data_lib.load_corpus(config), debug).vocab)
    host = _host_setup(config, vocab_size=vocab_size)
    print(host.summary())
    import json
    from lstm_jax import bench as bench_lib
    opts = dict(torch=fv["torch"].value, progress=fv["progress"].value)
    options = bench_lib.Options.quick(**opts) if fv["quick"].value else bench_lib.Options(
        repeats=fv["repeats"].value, min_time=fv["min_time"].value, sample_rows=rows,
        sample_length=fv["sample_length"].value, **opts)
    report = _friendly(lambda: bench_lib.run(config, vocab_size, options), debug)
    print(bench_lib.table(report))
    if fv["out"].value:
        with open(fv["out"].value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {fv['out'].value}")
    if fv["plot"].value:
        _friendly(lambda: bench_lib.plot(report, fv["plot"].value), debug)
        print(f"wrote {fv['plot'].value}")
    return 0


def export(argv: Sequence[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "trained run directory", flag_values=fv)
    flags.DEFINE_string("out", None, "file to write (e.g. sampler.lstmx)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
    flags.DEFINE_integer("rows", 64, "rows per program call (lstm-jax sample uses >= 64: same rows)", flag_values=fv)
    flags.DEFINE_integer("steps", 64, "characters per program call", flag_values=fv)
    flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "platforms to lower for", flag_values=fv)
    flags.DEFINE_string("loader", None, "where to copy the jax+numpy loader (default: load_exported.py beside --out; '' for none)", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    _define_common(fv)
    _parse(fv, argv, "export")
    import pathlib
    from lstm_jax import export as export_lib
    from lstm_jax import checkpoint
    debug, out = fv["debug"].value, pathlib.Path(fv["out"].value)
    model, vocab, _ = _friendly(lambda: checkpoint.restore_model(fv["workdir"].value, fv["step"].value), debug)
    meta = _friendly(lambda: export_lib.export_sampler(
        model, vocab, out, rows=fv["rows"].value, steps=fv["steps"].value,
        platforms=fv["platforms"].value), debug)
    loader = out.parent / "load_exported.py" if fv["loader"].value is None else fv["loader"].value
    if loader:
        _friendly(lambda: pathlib.Path(loader).write_text(export_lib.loader_source(), encoding="utf-8"), debug)
    print(f"wrote {out} ({out.stat().st_size:,} bytes: {', '.join(meta['platforms'])}; "
          f"{meta['rows']} rows x {meta['steps']} chars per call)"
          + (f"; run it with: python {loader} {out} --num_samples 4 --length 200" if loader else ""))
    return 0


_OS_ERRORS = {   # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free space or choose another --workdir/--out; checkpoints "
                   "saved before this one are intact"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another --workdir/--out; "
                   "checkpoints saved before this one are intact"),
    errno.EROFS: ("the file system is read-only", "choose a writable --workdir/--out"),
    errno.EACCES: ("permission denied", "choose a writable --workdir/--out or fix its permissions"),
    errno.EPERM: ("permission denied", "choose a writable --workdir/--out or fix its permissions"),
}


def _friendly(fn, debug: bool = False):
    """Errors a user causes (bad input, a locked or read-only workdir, a full disk, an unreadable
    checkpoint) become one clear line instead of a traceback; --debug shows the traceback."""
    from lstm_jax import checkpoint, corpora, data, workdir
    from lstm_jax.steps import TrainingError
    try:
        with _quiet_library_tracebacks(debug):
            return fn()
    except Exception as e:  # noqa: BLE001 - translated below, or re-raised
        if debug:
            raise
        os_error = _os_error_in(e)
        if os_error is not None and os_error.errno in _OS_ERRORS:
            what, fix = _OS_ERRORS[os_error.errno]
            where = f" writing {os_error.filename}" if os_error.filename else ""
            raise SystemExit(f"lstm-jax: error: {what}{where}; {fix}") from None
        if isinstance(e, (corpora.CorpusError, data.DataError, checkpoint.CheckpointError,
                          workdir.WorkdirError, TrainingError, ValueError, OSError)):
            raise SystemExit(f"lstm-jax: error: {e}") from None
        raise


class _DropLibraryErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR or record.exc_info)


@contextlib.contextmanager
def _quiet_library_tracebacks(debug: bool):
    """Orbax and TensorStore report a failed background save (a full disk, say) as logged
    tracebacks, and their callbacks print asyncio's 'Event loop is closed' through sys.excepthook
    and sys.unraisablehook, before and after the save's error reaches `_friendly`, which reports it
    in one line. Muted while a command runs and, after an error, until the process exits (the
    unraisable ones always: `_drop_asyncio_noise`); --debug keeps them."""
    if debug:
        yield
        return
    loggers, drop, hook = [logging.getLogger(n) for n in ("absl", "asyncio")], _DropLibraryErrors(), sys.excepthook
    for logger in loggers:
        logger.addFilter(drop)
    sys.excepthook = lambda *exc: None
    if sys.unraisablehook is not _drop_asyncio_noise:   # kept to the exit: callbacks run late
        _drop_asyncio_noise.previous = sys.unraisablehook
        sys.unraisablehook = _drop_asyncio_noise
    yield    # on an error, stay muted: the command exits, and pending callbacks print on the way out
    sys.excepthook = hook
    for logger in loggers:
        logger.removeFilter(drop)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings (a stale lock taken over, an unreadable checkpoint set aside) in
    one line each, not Python's two (the second being the source line that warned)."""
    if f"{os.sep}lstm_jax{os.sep}" in filename:
        print(f"lstm-jax: warning: {message}", file=file or sys.stderr)
    else:
        _show_warning.previous(message, category, filename, lineno, file, line)


def _drop_asyncio_noise(info) -> None:
    """TensorStore's callbacks into Orbax's closed event loop, after a restore that failed (an
    unreadable checkpoint the trainer set aside) or a failed save, end as 'unraisable'
    RuntimeErrors ('Event loop is closed', one traceback each: 132 lines for one bad step) or
    coroutines never awaited. The error that matters is reported in one line; drop these."""
    import asyncio
    if (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)
            or asyncio.iscoroutine(info.object)):
        return
    _drop_asyncio_noise.previous(info)


_drop_asyncio_noise.previous = sys.unraisablehook


def _os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind an exception (Orbax and TensorStore wrap disk errors), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        for code in _OS_ERRORS:
            if os.strerror(code) in str(e):
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console entry point (`lstm-jax`, `python -m lstm_jax.cli`)."""
    return _main(sys.argv if argv is None else argv)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[1]
    if command not in COMMANDS:
        import difflib
        hint = difflib.get_close_matches(command, COMMANDS, n=1)
        raise SystemExit(f"lstm-jax: unknown command {command!r}"
                         + (f"; did you mean {hint[0]!r}?" if hint else "") + "\n\n" + _usage())
    run = {"train": train, "sample": sample, "eval": evaluate, "prepare": prepare, "plot": plot,
           "export": export, "bench": bench}[command]
    try:
        with signals.StartupSignals() as startup, warnings.catch_warnings():
            _show_warning.previous, warnings.showwarning = warnings.showwarning, _show_warning
            code = run([f"lstm-jax {command}"] + argv[2:]) or 0
            if code == 0 and startup.pending:   # recorded, but the command ran to its end
                name = signal.Signals(startup.pending).name
                print(f"lstm-jax {command}: received {name} where it could not stop cleanly; acted on only "
                      f"now, after the command finished (its output is complete)", file=sys.stderr)
                return 130 if startup.pending == signal.SIGINT else 143
            return code
    except (KeyboardInterrupt, signals.Terminated) as e:
        if "--debug" in argv:
            raise
        name, code = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"lstm-jax {command}: stopped by {name}" + ("; nothing already saved is lost (train "
              "again to resume from the last checkpoint)" if command == "train" else ""), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
