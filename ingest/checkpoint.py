"""Checkpoints of an ingestion in progress, so a killed run resumes where it stopped.

A run's checkpoint lives in the catalog's sidecar folder under the hash of everything that
determines its result (SAE, model, dataset, counting parameters), so rerunning the same command
finds it and a different command never does. Writes are atomic (temp file, then rename): a
kill at any moment leaves either the old checkpoint or the new one. An flock on the folder keeps
two processes from running the same work at once; the kernel drops it when a process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from catalog.errors import SaecatError

STATE_FILE = "state.pt"


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Checkpoint:
    def __init__(self, folder: Path):
        self.folder = folder
        self._lock_file = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock.close()
            raise SaecatError(f"this ingestion is already running in another process (lock {self.folder / 'lock'})") from err
        self._lock_file = lock

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def load(self) -> dict[str, Any] | None:
        path = self.folder / STATE_FILE
        if not path.exists():
            return None
        # memory-mapped: the counters are copied in from the file's pages, not from a second copy
        # of them in memory (the budget counts the per-feature state once)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.folder / f"{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.folder / STATE_FILE)

    def discard(self) -> None:
        """Remove the checkpoint once its SAE is committed (the lock goes with the folder)."""
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)
