"""`lstm-jax sample` (and its file writer) and `lstm-jax export`."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional, Sequence

from absl import flags

from lstm_jax import signals
from lstm_jax.commands import common
from lstm_jax.commands.evaluation import check_workdir


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
    common.define_common(fv)
    common.parse(fv, argv, "sample")
    try:
        temperatures = [float(t) for t in fv["temperature"].value]
    except ValueError:
        raise SystemExit(f"lstm-jax: error: --temperature must be numbers separated by commas, "
                         f"got {','.join(fv['temperature'].value)!r}")
    workdir, out, prime_file = (common.path(fv[name].value) for name in ("workdir", "out", "prime_file"))
    if prime_file and fv["prime"].value:
        raise SystemExit("lstm-jax: error: pass --prime or --prime_file, not both")
    if prime_file:
        try:
            with open(prime_file, encoding="utf-8") as f:
                prime = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"lstm-jax: error: cannot read --prime_file: {e}")
        if not prime:
            raise SystemExit(f"lstm-jax: error: --prime_file {prime_file} is empty; write one "
                             f"prime per line (an empty line primes nothing)")
    else:
        prime = fv["prime"].value or None
    from lstm_jax import checkpoint
    from lstm_jax import sample as sample_lib
    signals.stop_if_signalled(then_raise=True)
    debug = fv["debug"].value
    common.friendly(lambda: check_workdir(workdir, fv["step"].value, held_out=False), debug)
    model, vocab, config = common.friendly(lambda: checkpoint.restore_model(workdir, fv["step"].value), debug)
    try:
        common.friendly(lambda: write_samples(
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
    common.define_common(fv)
    common.parse(fv, argv, "export")
    import pathlib
    from lstm_jax import export as export_lib
    from lstm_jax import checkpoint
    debug, out = fv["debug"].value, pathlib.Path(fv["out"].value)
    model, vocab, _ = common.friendly(lambda: checkpoint.restore_model(fv["workdir"].value, fv["step"].value), debug)
    meta = common.friendly(lambda: export_lib.export_sampler(
        model, vocab, out, rows=fv["rows"].value, steps=fv["steps"].value,
        platforms=fv["platforms"].value), debug)
    loader = out.parent / "load_exported.py" if fv["loader"].value is None else fv["loader"].value
    if loader:
        common.friendly(lambda: pathlib.Path(loader).write_text(export_lib.loader_source(), encoding="utf-8"), debug)
    print(f"wrote {out} ({out.stat().st_size:,} bytes: {', '.join(meta['platforms'])}; "
          f"{meta['rows']} rows x {meta['steps']} chars per call)"
          + (f"; run it with: python {loader} {out} --num_samples 4 --length 200" if loader else ""))
    return 0
