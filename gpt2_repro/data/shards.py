"""GPT-2 token shards: the file format, where the shards of a folder are, and their integrity.

Shards use the llm.c / modded-nanogpt layout: a header of 256 little-endian int32 (magic 20240520, version 1,
token count, zeros) followed by the tokens as little-endian uint16. `*_val_000000.bin` is validation, the rest
(`*_train_000001.bin`, ...) training; build-nanogpt's `.npy` shards are read too. data_prep.py writes them
(`prepare.py`) and records each one's SHA-256 in the folder's `manifest.json`; `verify_shards` checks them.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..base.atomic_io import atomic_write
from ..base.errors import DataError, NotFound

SHARD_MAGIC = 20240520  # llm.c's magic for token shards
SHARD_VERSION = 1  # version 1 = GPT-2 uint16 tokens (llm.c's version 2 holds uint32 LLaMA-3 tokens)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# ---------------------------------------------------------------------------------------------------- files


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` (1-D, values < 65536) as an llm.c shard, atomically (temp name + rename). Returns its SHA-256."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"write_shard({path}): token ids must be in [0, 65535] to fit uint16")
        tokens = tokens.astype(np.uint16)
    tokens = tokens.astype("<u2", copy=False)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    digest = hashlib.sha256()
    with atomic_write(path, fsync=True) as f:  # training trusts a shard that exists: make it durable
        for part in (header.data, tokens.data):
            f.write(part)
            digest.update(part)
    return digest.hexdigest()


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token shard as uint16: an llm.c `.bin` (header validated) or a build-nanogpt `.npy`."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"Token shard not found: {path}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: unreadable .npy shard ({type(e).__name__}: {e}); re-create it") from e
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise DataError(f"{path}: expected a 1-D uint16 token array, found {arr.dtype} of shape {arr.shape}")
        return arr
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(
            f"{path}: truncated or not a token shard: {size} bytes, less than the {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: not an llm.c token shard (magic {header[0]}, expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(
            f"{path}: shard version {header[1]}, expected {SHARD_VERSION} (GPT-2 uint16 tokens); "
            "version 2 shards hold uint32 tokens of another tokenizer"
        )
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
            "delete it and rerun data_prep.py to rewrite it"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(data_dir_or_glob: str | os.PathLike, split: str) -> list[Path]:
    """The `split` shard files: `DIR/*_{split}_*.bin|.npy`, or the .bin/.npy files a glob matches with `_{split}_`."""
    spec = str(data_dir_or_glob)
    if Path(spec).is_dir():
        files = [p for ext in ("bin", "npy") for p in Path(spec).glob(f"*_{split}_*.{ext}")]
    elif Path(spec).is_file():
        return [Path(spec)]
    else:
        files = [Path(p) for p in globlib.glob(os.path.expanduser(spec)) if f"_{split}_" in Path(p).name]
        files = [p for p in files if p.suffix in (".bin", ".npy")]
    if not files:
        raise NotFound(
            f"No {split} shards (*_{split}_*.bin or *_{split}_*.npy) found at {spec}. Pass the folder data_prep.py "
            f"wrote, or prepare one: python data_prep.py --dataset YOUR_TEXT --output_dir {shlex.quote(spec)} "
            "(without --dataset it prepares FineWeb-Edu)"
        )
    return sorted(files)


def val_shard_tokens(val_tokens: int) -> int:
    """Tokens of the validation shard for `--val_tokens N`: N + 1, so that N targets can be scored (the last one
    follows the final window's inputs), exactly what `--val_tokens N` asks of evaluation."""
    return val_tokens + 1


def shard_capacity(index: int, val_tokens: int, shard_tokens: int, max_tokens: int | None = None) -> int:
    """Tokens of shard `index` of a full stream: shard 0 is validation (val_shard_tokens), then training shards;
    0 past max_tokens."""
    start = 0 if index == 0 else val_shard_tokens(val_tokens) + (index - 1) * shard_tokens
    size = val_shard_tokens(val_tokens) if index == 0 else shard_tokens
    return size if max_tokens is None else max(0, min(size, max_tokens - start))


def shards_fingerprint(files: list[Path], lengths) -> str:
    """16 hex digits naming a list of shards by file name and token count (what a loader position refers to)."""
    text = "".join(f"{Path(f).name}:{n};" for f, n in zip(files, lengths, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(data_dir_or_glob: str | os.PathLike, split: str = "train") -> str:
    """The fingerprint a TokenShardLoader of these shards saves in its state (headers only: no data is read)."""
    files = find_shards(data_dir_or_glob, split)
    return shards_fingerprint(files, [len(read_shard(f)) for f in files])


# ------------------------------------------------------------------------------------------------ integrity


MANIFEST = "manifest.json"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)  # releases the GIL: threads hash several files at once
    return digest.hexdigest()


def shard_files(folder: str | os.PathLike) -> list[str]:
    """Names of the shard files in `folder` that a loader reads (`*_val_*` and `*_train_*`, .bin or .npy)."""
    return sorted(
        p.name for split in ("val", "train") for ext in ("bin", "npy") for p in Path(folder).glob(f"*_{split}_*.{ext}")
    )


def verify_shards(
    folder: str | os.PathLike, threads: int | None = None, pending: str | None = None
) -> list[str] | None:
    """Check the shards of a folder against its manifest.json: the shard set is the manifest's (no file missing,
    none that it does not list, which a loader would read unchecked), each of the recorded size and SHA-256.
    `pending`: the name of the shard an interrupted preparation was writing, which is not counted as unlisted.

    Returns the problems found (empty: all intact), or None when the folder has no manifest.json to check against
    (shards from elsewhere, a glob). Files are hashed in `threads` threads (default: one per CPU core, up to 8):
    hashing is bound by the disk or by about 0.7-2 GB/s per core.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        shards = json.loads(path.read_text())["shards"]
        expected = [(Path(folder) / shard_name(s["file"]), int(s["tokens"]), s["sha256"]) for s in shards]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable ({type(e).__name__}: {e})"]
    listed = {file.name for file, _, _ in expected}
    unlisted = [
        f"{Path(folder) / name}: a shard that manifest.json does not list (copied in, or written by another "
        "preparation)"
        for name in shard_files(folder)
        if name not in listed and name != pending
    ]

    def check(item: tuple[Path, int, str]) -> str | None:
        file, tokens, sha = item
        if not file.is_file():
            return f"{file}: missing"
        size, want = file.stat().st_size, HEADER_BYTES + 2 * tokens
        if size != want:
            return f"{file}: {size:,} bytes, manifest.json records {want:,} ({tokens:,} tokens)"
        if file_sha256(file) != sha:
            return f"{file}: its SHA-256 differs from manifest.json's (corrupted or changed since it was written)"
        return None

    workers = max(1, min(len(expected), threads or min(8, os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers, thread_name_prefix="sha256") as pool:
        return unlisted + [problem for problem in pool.map(check, expected) if problem]


def shard_name(name) -> str:
    """A shard file name from manifest.json: a plain file name, in the manifest's own folder. ValueError for
    anything else (a path, `..`): a manifest never points at files outside its folder, which could be read,
    sized or trusted as part of the data without being there."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"the shard name {name!r} is not a file name in the manifest's folder")
    return name


def check_shards(folder: str | os.PathLike, threads: int | None = None) -> bool:
    """Raise DataError naming every shard that does not match manifest.json; False when there is no manifest."""
    problems = verify_shards(folder, threads)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(
            f"{folder}: {len(problems)} shard(s) do not match manifest.json: {shown}. Restore the files from where "
            "they came from, or prepare the data again into a new folder with data_prep.py."
        )
    return problems is not None


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """`folder`'s manifest.json as written by data_prep.py, or None when it has none (DataError when unreadable)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}). Nothing was changed: choose another folder.") from e
    if not isinstance(manifest, dict) or manifest.get("created_by") != "data_prep.py":
        raise DataError(f"{path} was not written by data_prep.py. Nothing was changed: choose another folder.")
    try:
        for shard in manifest.get("shards") or []:
            shard_name(shard["file"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: {e}. A manifest names the shards of its own folder only: this one was edited or made "
            "elsewhere. Nothing was changed: prepare the data again into a new folder with data_prep.py."
        ) from None
    return manifest


# manifest "source" keys -> data_prep.py's options, with the default each leaves out
_SOURCE_OPTIONS = {
    "name": ("--dataset_name", None),
    "split": ("--dataset_split", "train"),
    "text_column": ("--text_column", "text"),
}
_SOURCE_OPTIONS |= {"sample_by": ("--text_sample_by", "document")}


def prep_command(folder: str | os.PathLike, manifest: dict) -> str:
    """The data_prep.py command that prepares `folder` as its manifest records it, from every recorded option,
    quoted for a POSIX shell: it continues an unfinished preparation, or makes the same shards again."""
    source, settings = manifest.get("source") or {}, manifest.get("settings") or {}
    args = ["python", "data_prep.py", "--dataset", str(source.get("dataset")), "--output_dir", str(folder)]
    for key, (option, default) in _SOURCE_OPTIONS.items():
        if source.get(key) not in (None, default):
            args += [option, str(source[key])]
    args += [
        a
        for k in ("val_tokens", "shard_tokens", "max_tokens")
        if settings.get(k) is not None
        for a in (f"--{k}", str(settings[k]))
    ]
    return shlex.join(args)


def manifest_source(data_dir: str | os.PathLike | None) -> dict | None:
    """The data source that data_prep.py recorded in `data_dir`/manifest.json ("source"), or None."""
    try:
        source = json.loads((Path(data_dir) / MANIFEST).read_text())["source"]
    except (OSError, TypeError, ValueError, KeyError):
        return None
    return source if isinstance(source, dict) else None
