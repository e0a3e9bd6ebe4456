"""`lstm-jax eval`, and the check that what `sample` and `eval` read beside a checkpoint is what it
was trained with."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import flags

from lstm_jax import signals
from lstm_jax.commands import common


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
    common.define_common(fv)
    common.parse(fv, argv, "eval")
    import json
    import pathlib
    from lstm_jax import corpora
    debug, path, workdir = fv["debug"].value, common.path(fv["text"].value), pathlib.Path(common.path(fv["workdir"].value))
    log = workdir / "eval.jsonl"
    if fv["log"].value and workdir.is_dir() and not os.access(log if log.exists() else workdir, os.W_OK):
        raise SystemExit(f"lstm-jax: error: cannot write {log} (a read-only workdir?), where eval "
                         f"appends each result; make it writable, or pass --nolog")
    text = common.friendly(lambda: corpora.load_text(path, flag="--text", errors=fv["encoding_errors"].value,
                                                     errors_flag="--encoding_errors"), debug) if path else None
    from lstm_jax import evaluate as evaluate_lib
    signals.stop_if_signalled(then_raise=True)
    common.friendly(lambda: check_workdir(workdir, fv["step"].value, held_out=text is None), debug)
    result = common.friendly(lambda: evaluate_lib.evaluate_text(workdir, text, step=fv["step"].value,
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
        common.friendly(append, debug)
    return 0


def check_workdir(workdir, step: Optional[int], held_out: bool) -> None:
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
