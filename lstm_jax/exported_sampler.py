"""Runs a sampler written by `lstm-jax export`, with jax and numpy only (no lstm_jax import).

Copy this file anywhere (`lstm-jax export` writes a copy beside its output) and:

    python load_exported.py sampler.lstmx --num_samples 8 --length 200 --temperature 0.5,1.0 \\
        --prime "the " --seed 0 [--top_k 20 --top_p 0.95] [--out rows.jsonl]

or from Python:

    from load_exported import ExportedSampler
    s = ExportedSampler("sampler.lstmx")
    rows = s.generate(num_samples=8, length=200, temperature=[0.5, 1.0], prime="the ", seed=0)

Row i (0-based) starts from primes[i % len(primes)] at temperatures[i % len(temperatures)]; its
text depends only on (seed, i, prime, temperature, top_k, top_p) and equals `lstm-jax sample`'s row
i for the same arguments on the same platform. The program runs on whatever JAX's default backend
is, provided it was exported for it (cpu, cuda and tpu by default).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "lstm_jax.exported_sampler/1"


class ExportedSampler:
    """The exported programs, weights and vocabulary of one file."""

    def __init__(self, path: str):
        with np.load(path) as z:
            self.meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an lstm_jax exported sampler ({FORMAT})")
            self.programs = {k: jax.export.deserialize(bytearray(z[f"program_{k}"].tobytes()))
                             for k in ("plain", "filtered")}
            self.params = [jnp.asarray(np.frombuffer(z[f"param_{i}"].tobytes(), jnp.dtype(p["dtype"]))
                                       .reshape(p["shape"])) for i, p in enumerate(self.meta["params"])]
        self.chars = self.meta["chars"]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.rows, self.steps = self.meta["rows"], self.meta["steps"]

    def encode(self, prime: str) -> np.ndarray:
        if self.meta["is_bytes"]:
            ids = np.frombuffer(prime.encode("utf-8"), np.uint8).astype(np.int32)
        else:
            missing = sorted(set(prime) - self.index.keys())
            if missing:
                raise ValueError(f"prime {prime!r} has characters outside the vocabulary: {missing}")
            ids = np.array([self.index[c] for c in prime], np.int32)
        return ids if len(ids) else np.array([self.meta["start"]], np.int32)

    def decode(self, tokens: np.ndarray) -> str:
        if self.meta["is_bytes"]:
            return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in tokens)

    def generate(self, num_samples: int = 1, length: int = 400,
                 temperature: Union[float, Sequence[float]] = 1.0, prime: Union[str, Sequence[str]] = "",
                 seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> list[dict]:
        """Rows {index, temperature, prime, text}, `rows` per program call."""
        temps = [float(temperature)] if np.ndim(temperature) == 0 else [float(t) for t in temperature]
        primes = [prime] if isinstance(prime, str) else list(prime)
        ids = [self.encode(p) for p in primes]
        lengths = np.array([len(i) for i in ids], np.int32)
        prime_BxP = np.zeros((len(ids), lengths.max()), np.int32)
        for j, i in enumerate(ids):
            prime_BxP[j, :len(i)] = i
        top_k = 0 if top_k >= len(self.chars) else int(top_k)
        program = self.programs["filtered" if top_k > 0 or top_p < 1 else "plain"]
        total = int(lengths.max()) - 1 + length
        blocks = -(-total // self.steps)
        hidden, layers, rows, s = self.meta["hidden_size"], self.meta["num_layers"], self.rows, self.steps
        out = []
        for first in range(0, num_samples, rows):
            which = np.arange(first, first + rows) % len(primes)
            primes_B, prime_len_B = prime_BxP[which], lengths[which]
            temp_B = np.array(temps, np.float32)[np.arange(first, first + rows) % len(temps)]
            zeros = np.zeros((rows, hidden), np.float32)
            carry = (tuple((zeros, zeros) for _ in range(layers)), np.zeros((rows,), np.int32))
            drawn = np.empty((rows, blocks * s), np.int32)
            for b in range(blocks):
                prime_BxS = np.zeros((rows, s), np.int32)
                prime_BxS[:, :max(0, primes_B.shape[1] - b * s)] = primes_B[:, b * s:(b + 1) * s]
                carry, drawn_BxS = program.call(
                    self.params, carry, prime_BxS, prime_len_B, temp_B, np.int32(first),
                    np.uint32(seed), np.int32(top_k), np.float32(top_p), np.int32(b * s))
                drawn[:, b * s:(b + 1) * s] = np.asarray(drawn_BxS)
            steps = prime_len_B[:, None] - 1 + np.arange(length)
            tokens = np.take_along_axis(drawn, steps, 1)
            for r in range(min(rows, num_samples - first)):
                i = first + r
                out.append({"index": i, "temperature": temps[i % len(temps)],
                            "prime": primes[i % len(primes)], "text": self.decode(tokens[r])})
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--length", type=int, default=400)
    p.add_argument("--temperature", default="0.2,0.5,1.0,1.2", help="comma-separated, cycled over rows")
    p.add_argument("--prime", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--out", help="JSONL rows; stdout text if absent")
    a = p.parse_args(argv)
    rows = ExportedSampler(a.path).generate(
        a.num_samples, a.length, [float(t) for t in a.temperature.split(",")], a.prime, a.seed,
        a.top_k, a.top_p)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        for r in rows:
            head = f"----- sample {r['index']}, temperature {r['temperature']:g}\n" if a.num_samples > 1 else ""
            sys.stdout.write(f"{head}{r['prime']}{r['text']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
