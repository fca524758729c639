"""Files that are either whole or absent: write under a temporary name, then rename.

Every file the project writes (token shards, manifests, checkpoint metadata, metrics, results, plots, caches) goes
through `atomic_write`, so a crash, a signal or a full disk never leaves a half-written file under the real name:
readers see the old version or the new one. A rename is atomic on POSIX file systems when both names are in the
same folder, which is why the temporary file sits next to its target.

Permissions follow the umask like a plain `open()` would (`tempfile.mkstemp` alone would make them 0600, and
the rest of a research group could not read the manifests or results of a shared run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

CACHE_ENV = "GPT2_REPRO_CACHE"  # where downloads and built files are cached (default ~/.cache/gpt2_repro)


def user_cache(kind: str) -> Path:
    """The folder that caches `kind` (e.g. "hellaswag"): $GPT2_REPRO_CACHE/kind, else ~/.cache/gpt2_repro/kind."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2_repro"
    return Path(root) / kind


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it...
    os.umask(mask)  # ...and put it back at once
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it is removed.

    `fsync=True` flushes the data to disk before the rename (for files that later steps trust blindly).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` as one whole file."""
    with atomic_write(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON. Non-finite floats are written as null, so every reader can parse it."""
    write_atomic(path, json.dumps(strict_json(obj), indent=2, default=str) + "\n")


def strict_json(obj):
    """`obj` with NaN and infinities replaced by None (JSON has no such numbers; Python writes bare NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def follow_umask(folder: str | os.PathLike) -> None:
    """Give the files of `folder` (not of its sub-folders) the mode a plain `open()` would: writers that make
    their files through `mkstemp` (safetensors does, for model.safetensors) leave them 0600 whatever the umask."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether `path` is a leftover temporary file of `atomic_write` (a run killed while writing)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


# ---------------------------------------------------------------------------------------------- folders


def remove_tree(path: str | os.PathLike) -> None:
    """Rename away, then delete: an interrupted delete leaves a `.trash-` folder, never a partial checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link file `src` as `dst` (no extra disk space), or copy it where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: str | Path, dst: str | Path, names: Iterable[str] | None = None) -> None:
    """Make `dst` a copy of folder `src` (or of only its top-level entries `names`) using hard links (a plain
    copy where links are impossible).

    The copy is built beside `dst` and swapped in, so `dst` is always a whole folder. Hard links cost no disk
    space and outlive the source: the run's export/ stays valid after its checkpoint is rotated away.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    keep = None if names is None else set(names)

    def ignore(folder, entries):
        if keep is None or Path(folder) != src:
            return []
        return [e for e in entries if e not in keep]

    shutil.copytree(src, tmp, copy_function=link_or_copy, ignore=ignore)
    remove_tree(dst)
    os.replace(tmp, dst)


def json_fields_problem(state, fields: dict[str, tuple[type, ...]]) -> str | None:
    """Why `state` (JSON read back) is not a mapping holding each of `fields` ({name: accepted types}) with a value
    of its types (True is not an int here), or None: a file that parses may still not be the one expected."""
    if not isinstance(state, dict):
        return f"a data position is a JSON object, not {type(state).__name__}"
    for name, types in fields.items():
        if name not in state:
            return f"the data position has no {name!r}"
        value = state[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"the data position's {name!r} is {value!r}, not {wanted}"
    return None
