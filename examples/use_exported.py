"""An exported sampler inside your own program, without lstm_jax installed: only jax and numpy.

    lstm-jax export --workdir runs/demo --out exported/sampler.lstmx   # also writes exported/load_exported.py
    python examples/use_exported.py exported/sampler.lstmx

`load_exported.py` (written beside the export; the same file as lstm_jax/exported_sampler.py) is
all you need to copy into your project: `ExportedSampler(path).generate(...)` returns rows equal to
`lstm-jax sample`'s for the same seed, temperatures and primes.
"""
import pathlib
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = pathlib.Path(argv[0])
    sys.path.insert(0, str(path.parent))           # where `lstm-jax export` put load_exported.py
    from load_exported import ExportedSampler

    sampler = ExportedSampler(str(path))
    print(f"vocabulary of {len(sampler.chars)} chars; {sampler.rows} rows x {sampler.steps} chars "
          f"per call; platforms {', '.join(sampler.meta['platforms'])}")
    rows = sampler.generate(num_samples=3, length=60, temperature=[0.5, 1.0], prime="the ", seed=0)
    for r in rows:
        print(f"[{r['index']}, T={r['temperature']}] {r['prime']}{r['text']!r}")


if __name__ == "__main__":
    main()
