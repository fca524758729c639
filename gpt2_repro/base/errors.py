"""Every exception type the project raises on purpose, and how environment failures are told apart from bugs.

The scripts end every one of these the same way (`cli.run`): one `error: ...` line naming the problem and the fix,
exit code 2. `Stop` is an orderly early end with its own exit code (a preemption saved: 75; Ctrl-C: 130). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and what to use instead."""


class RunError(RuntimeError):
    """The run cannot go on for a reason outside the code (divergence, a full disk, another run in the folder);
    the message names the problem and the fix."""


class DataError(ValueError):
    """Bad input data or output folder; the message names the problem and the fix."""


class NotFound(DataError, FileNotFoundError):
    """A file or folder the command names or needs is not there (a vocabulary, shards, a dataset, a checkpoint);
    the message names it and what to pass instead. Also a FileNotFoundError, for code that tells a missing file
    apart from other failures (a text stream's read errors, say)."""


class StreamReadError(DataError):
    """A text stream could not be read: after retrying a transient failure (`transient`: the network, which may
    come back), or at once for one that retrying cannot mend (the data itself)."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class EvaluationInputError(ValueError):
    """A model, data file or setting an evaluation cannot use; the message names it and the fix."""


class HellaSwagUnavailable(RuntimeError):
    """The HellaSwag validation file could not be found or downloaded; `cache`: where a copy would be found."""

    def __init__(self, message: str, cache=None):
        super().__init__(message)
        self.cache = cache


class HubAccessError(ConfigError):
    """--push_to_hub cannot work (no token, no write access, offline): found at start-up, not at the first upload."""


class Stop(Exception):
    """An orderly early end that is not a bug: `cli.run` prints the message (no traceback) and exits with
    `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Every expected error: what `cli.run` reports as one line with exit code 2.
EXPECTED = (ConfigError, RunError, DataError, EvaluationInputError, HellaSwagUnavailable)


# errno values that mean "the environment", not the code: full disk or quota, a file-size limit, read-only or
# forbidden paths, a file where a folder should be (or the reverse), a name too long.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file-size limit (ulimit -f) or the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
    errno.EEXIST: "a file stands where a folder is needed",
    errno.ENAMETOOLONG: "file name too long",
}


def environment_errno(exc: BaseException) -> int | None:
    """The errno of an environment failure behind `exc` (an OSError, or a Rust I/O error that safetensors and
    tokenizers report as "os error N"), following its causes; None when `exc` is something else."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e.errno
        found = re.search(r"os error (\d+)", str(e))
        if found and int(found.group(1)) in ENVIRONMENT_ERRNOS:
            return int(found.group(1))
    return None


def describe_environment_error(exc: BaseException) -> str | None:
    """One line naming an environment failure (what, where, the fix), or None when `exc` is not one."""
    code = environment_errno(exc)
    if code is None:
        return None
    where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    what = ENVIRONMENT_ERRNOS[code]
    place = f" at {where}" if where else ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space (or raise the limit), or choose a folder on another disk"
    elif code == errno.EROFS:
        fix = "choose a folder on a writable file system"
    elif code in (errno.EACCES, errno.EPERM):
        fix = "fix its permissions, or choose a path you may use"
    else:
        fix = "choose another path"
    return f"{what}{place} ({os.strerror(code)}): {fix}"


def describe_peer_failure(exc: BaseException) -> str | None:
    """One line naming the failure of another process of the run, as torch.distributed reports it to a survivor (a
    connection closed by the peer, a collective that timed out: a machine died, hangs or lost its network), or None
    when `exc` is something else."""
    for e in _chain(exc):
        text = str(e)
        distributed = any(c.__name__ == "DistError" for c in type(e).__mro__)  # torch.distributed's own errors
        gloo = isinstance(e, RuntimeError) and re.match(r"\[[^\]]*gloo[^\]]*\]", text)  # "[.../gloo/...cc:553] ..."
        if distributed or gloo:
            first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
            return (
                f"another process of the run stopped answering ({first[:160] or type(e).__name__}): a machine died, "
                "hangs or lost its network (a hang ends after --dist_timeout seconds)"
            )
    return None


def _chain(exc: BaseException):
    """`exc`, then its cause (or the exception it was raised while handling), and so on, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
