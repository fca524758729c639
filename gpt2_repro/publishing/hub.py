"""The Hugging Face Hub: background uploads of exported folders (whether it can be reached: base/machine.py).

- `HubUploader(repo_id)` uploads exported folders with `huggingface_hub` on a background thread. `check_access()`
  (at start-up) checks the login and creates the repository and its `gpt2` branch, so a missing token or write
  access fails at once. Each submitted folder is first snapshotted with hard links (free, and immune to the
  trainer replacing or rotating the original), a newer submission replaces one still waiting for the same branch
  (only the newest export matters), and failures are reported as warnings. The token is whatever
  `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`); this module never reads it, and scrubs anything
  token-shaped from the messages it prints.
"""

from __future__ import annotations

import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

from ..base.atomic_io import link_tree
from ..base.errors import HubAccessError

if TYPE_CHECKING:
    from ..base.config import CheckpointConfig

STOCK_GPT2_BRANCH = "gpt2"  # the branch of the Hub repo that holds the stock GPT2LMHeadModel export


_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _redact(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def _access_error(repo_id: str, e: Exception) -> HubAccessError:
    """The one-line reason an access check failed, with the fix (the token never appears in it)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, LocalTokenNotFoundError):
        why = "no Hugging Face token found. Log in with `hf auth login` (or set HF_TOKEN)"
    elif isinstance(e, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set, so the Hub cannot be reached. Unset it"
    elif status == 401:
        why = "the Hub rejected the token (401: invalid or expired). Log in again with `hf auth login`"
    elif status == 403:
        why = (
            "the token may not write to this repository (403 Forbidden). Use a repo in your own namespace or "
            "an organization you can write to, with a token that has write access"
        )
    else:
        why = f"the Hub check failed ({type(e).__name__}: {e}). Check the network and the repo id"
    return HubAccessError(_redact(f"--push_to_hub {repo_id}: {why}, or train without --push_to_hub."))


class HubUploader:
    """Upload folders to one Hub repo (main branch, and the `gpt2` branch for the stock export) from a
    background thread; `submit` returns at once."""

    def __init__(self, repo_id: str, staging_dir: str | Path, private: bool = False, api: HfApi | None = None):
        self.repo_id, self.private = repo_id, private
        self.api = api if api is not None else HfApi()
        self.staging_dir = Path(staging_dir)
        self.errors: list[str] = []
        self.uploaded: list[str] = []  # commit messages of the uploads that succeeded
        self._pending: dict[str | None, tuple[Path, str]] = {}  # branch (None: main) -> newest snapshot
        self._busy = False
        self._closed = False
        self._repo_ready = False
        self._branches: set[str] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="hub-upload", daemon=True)
        self._thread.start()

    def check_access(self) -> None:
        """Check the login, create the repository (if new) and its `gpt2` branch: a HubAccessError says why not.

        Run at start-up, so a missing token or write access stops the run in its first second. The branch is
        made now, while a new repository holds nothing, so it never starts with files of the main branch.
        """
        try:
            self.api.whoami()
            self._ensure_repo()
            self._ensure_branch(STOCK_GPT2_BRANCH)
        except Exception as e:  # no token, HTTP status, offline, network (httpx errors are no OSErrors)
            raise _access_error(self.repo_id, e) from None

    def submit(self, folder: str | Path, message: str, revision: str | None = None) -> None:
        """Queue `folder` (snapshotted now) for upload to `revision` (a branch; None: main). A still-waiting
        older submission for the same branch is dropped."""
        snapshot = self.staging_dir / re.sub(r"\W+", "-", f"{revision or 'main'} {message}").strip("-")
        link_tree(folder, snapshot)
        with self._cond:
            older = self._pending.get(revision)
            if older is not None and older[0] != snapshot:
                shutil.rmtree(older[0], ignore_errors=True)
            self._pending[revision] = (snapshot, message)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or uploading; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout=timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued uploads, then stop the thread. False if they did not finish within `timeout`."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                # the main branch first (our export before its stock twin), then the other branches
                revision = None if None in self._pending else next(iter(self._pending))
                snapshot, message = self._pending.pop(revision)
                self._busy = True
            where = f"{self.repo_id}" + (f" (branch {revision})" if revision else "")
            try:
                self._upload(snapshot, message, revision)
                self.uploaded.append(message if revision is None else f"{message} ({revision})")
            except Exception as e:  # the network, auth, quota: report and let training go on
                msg = _redact(f"Hub upload of {message!r} to {where} failed: {type(e).__name__}: {e}")
                self.errors.append(msg)
                warnings.warn(msg, stacklevel=1)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _ensure_repo(self) -> None:
        if not self._repo_ready:
            self.api.create_repo(self.repo_id, repo_type="model", private=self.private, exist_ok=True)
            self._repo_ready = True

    def _ensure_branch(self, branch: str) -> None:
        if branch not in self._branches:
            self.api.create_branch(self.repo_id, branch=branch, repo_type="model", exist_ok=True)
            self._branches.add(branch)

    def _upload(self, folder: Path, message: str, revision: str | None) -> None:
        self._ensure_repo()
        if revision is not None:
            self._ensure_branch(revision)
        # A branch that holds one export is made to mirror it exactly (files of an older export that this one
        # lacks are deleted); the main branch only gains and updates files, whatever else its owner keeps there.
        mirror = {"delete_patterns": "*"} if revision is not None else {}
        self.api.upload_folder(
            repo_id=self.repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=message,
            revision=revision,
            **mirror,
        )


def open_hub(settings: CheckpointConfig, run_dir: Path) -> HubUploader:
    """--push_to_hub (main process): check the login, create the repository and its gpt2 branch now, before any
    work, so a missing token stops the run in its first second rather than at the first checkpoint."""
    uploader = HubUploader(settings.push_to_hub, run_dir / ".hub-staging", settings.hub_private)
    try:
        uploader.check_access()
    except HubAccessError:
        uploader.close()
        raise
    return uploader
