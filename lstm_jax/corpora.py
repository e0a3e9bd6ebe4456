"""Turn a corpus source string into text.

Sources: ``"builtin"`` (CPython's pydoc help topics, always offline), a registered
name such as ``"nietzsche"`` (local dir -> user cache -> verified download), a file
path or glob, or ``"tfds:NAME[:split]"``. Every user-facing failure raises
:class:`CorpusError` naming both the problem and the fix.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import urllib.error
import urllib.request

from lstm_jax import files

NIETZSCHE_URL = "https://s3.amazonaws.com/text-datasets/nietzsche.txt"
NIETZSCHE_SHA256 = "23cf69874ab69d3d256099ab530ea4be24d47d9675b673bcc67cbcd6298ec647"

# name -> (filename, url, sha256); add entries here to support more named corpora.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "nietzsche": ("nietzsche.txt", NIETZSCHE_URL, NIETZSCHE_SHA256),
}

_ERROR_MODES = ("strict", "replace", "ignore")
_GLOB_CHARS = frozenset("*?[")


class CorpusError(ValueError):
    """A corpus could not be loaded; the message says why and how to fix it."""


def corpus_fingerprint(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text, stored in checkpoints to detect corpus drift."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_cache_dir() -> pathlib.Path:
    """Download cache: $LSTM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/lstm_jax, else ~/.cache/lstm_jax."""
    override = os.environ.get("LSTM_JAX_CACHE_DIR")
    if override:
        return pathlib.Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "lstm_jax"


def download(url: str, dest: str | os.PathLike[str], sha256: str) -> pathlib.Path:
    """Fetch ``url`` into ``dest`` atomically; nothing is left at ``dest`` unless the hash matches."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest = hashlib.sha256()
        with files.atomic_open(dest, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != sha256:   # inside the block: nothing is renamed into dest
                raise CorpusError(
                    f"checksum mismatch downloading {url}: expected sha256 {sha256}, got "
                    f"{digest.hexdigest()}; nothing was saved. Retry later, or download the file "
                    f"yourself, verify it, and put it in $LSTM_JAX_DATA_DIR."
                )
    except (urllib.error.URLError, OSError) as e:
        raise CorpusError(
            f"could not download {url} to {dest}: {e}. Check your network, or download it "
            f"manually into $LSTM_JAX_DATA_DIR, or use the offline source 'builtin'."
        ) from e
    return dest


def _decode(data: bytes, origin: str, errors: str, errors_flag: str = "--config.encoding_errors") -> str:
    """Decode UTF-8, turning a strict-mode failure into a message that pinpoints the bad bytes."""
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CorpusError(
            f"{origin} is not valid UTF-8 at byte offset {e.start} (line {line}, column "
            f"{column}): bytes {data[e.start:e.end]!r} ({e.reason}). Fix: pass "
            f"{errors_flag}=replace (or ignore), or re-encode the file as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _load_builtin() -> str:
    """CPython's bundled help topics: deterministic, offline, about half a megabyte."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise CorpusError(
            "source 'builtin' needs the pydoc_data module, which this Python lacks (some "
            "distro builds strip it). Pass a text file instead (--config.corpus=PATH) "
            "or use --config.corpus=nietzsche."
        ) from e
    return "\n\n".join(topics[key] for key in sorted(topics))


def _load_registered(name: str, data_dir: str | None) -> bytes:
    """Find a named corpus in the data dir, then the cache, else download it; always verify."""
    filename, url, sha256 = REGISTRY[name]
    local_dir = data_dir or os.environ.get("LSTM_JAX_DATA_DIR")
    cached = resolve_cache_dir() / filename
    candidates = [pathlib.Path(local_dir).expanduser() / filename] if local_dir else []
    for path in [*candidates, cached]:
        if path.is_file():
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise CorpusError(
                    f"{path} has the wrong checksum for corpus {name!r}: expected sha256 "
                    f"{sha256}, got {actual}. Delete or replace it with the original from "
                    f"{url}."
                )
            return data
    return download(url, cached, sha256).read_bytes()


def _load_files(pattern: str, errors: str, flag: str = "--config.corpus",
                errors_flag: str = "--config.encoding_errors") -> str:
    """Read one file, or every file a glob matches (sorted), joined by newlines."""
    expanded = os.path.expanduser(pattern)
    if _GLOB_CHARS & set(pattern):
        paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    else:
        paths = [expanded] if os.path.isfile(expanded) else []
    if not paths:
        if os.path.isdir(expanded):
            what = "is a directory; use a glob such as dir/*.txt"
        else:
            what = "matches no files" if _GLOB_CHARS & set(pattern) else "does not exist"
        if flag != "--config.corpus":
            raise CorpusError(f"{flag} {pattern!r} {what}; pass an existing UTF-8 text file")
        raise CorpusError(
            f"corpus path {pattern!r} {what}. Set --config.corpus to an existing text file "
            f"or glob, or to 'builtin' (offline) or one of {sorted(REGISTRY)}."
        )
    return "\n".join(_decode(_read(p), p, errors, errors_flag) for p in paths)


def _read(path: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None


def _load_tfds(source: str, errors: str) -> str:
    """Concatenate the single string feature of a TensorFlow Datasets split."""
    _, name, *rest = source.split(":")
    if not name or len(rest) > 1:
        raise CorpusError(f"bad tfds source {source!r}; use 'tfds:NAME' or 'tfds:NAME:SPLIT'.")
    split = rest[0] if rest else "train"
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise CorpusError(
            f"source {source!r} needs tensorflow_datasets; install it with "
            f"pip install 'lstm_jax[tfds]'."
        ) from e
    try:
        examples = list(tfds.as_numpy(tfds.load(name, split=split)))
    except Exception as e:
        raise CorpusError(
            f"tensorflow_datasets could not load {name!r} split {split!r}: {e}. Check the "
            f"name and split at https://www.tensorflow.org/datasets/catalog."
        ) from e
    if not examples:
        return ""
    keys = sorted(k for k, v in examples[0].items() if isinstance(v, bytes))
    if len(keys) != 1:
        raise CorpusError(
            f"tfds dataset {name!r} needs exactly one text feature, found {keys}; "
            f"pick a text dataset such as tiny_shakespeare."
        )
    origin = f"tfds:{name}:{split}"
    return "\n".join(_decode(ex[keys[0]], origin, errors) for ex in examples)


def load_text(
    source: str,
    *,
    data_dir: str | None = None,
    lowercase: bool = False,
    errors: str = "strict",
    flag: str = "--config.corpus",
    errors_flag: str = "--config.encoding_errors",
) -> str:
    """Resolve ``source`` ("builtin", a registered name, "tfds:...", or a path/glob) to text.
    `flag` / `errors_flag` name the options the user set, for the error messages (the CLI's
    `eval --text` reads a file; `train` reads --config.corpus)."""
    if errors not in _ERROR_MODES:
        raise CorpusError(f"encoding errors mode {errors!r} is invalid; use one of {_ERROR_MODES}.")
    if source == "builtin":
        text = _load_builtin()
    elif source in REGISTRY:
        text = _decode(_load_registered(source, data_dir), source, errors)
    elif source.startswith("tfds:"):
        text = _load_tfds(source, errors)
    else:
        text = _load_files(source, errors, flag, errors_flag)
    if lowercase:
        text = text.lower()
    if not text:
        raise CorpusError(
            f"{'corpus' if flag == '--config.corpus' else flag} {source!r} is empty (0 "
            f"characters); point it at a non-empty text file"
            + (" or use 'builtin'." if flag == "--config.corpus" else ".")
        )
    return text
