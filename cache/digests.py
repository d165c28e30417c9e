"""Content digests of context files, remembered by stat so an unchanged file is read once.

The memo key is (device, inode, size, mtime_ns, ctime_ns): any write or
chmod changes ctime, so a hit means the bytes are the ones digested before.
The path is not in the key, so moving the context keeps the memo valid.
Entries live in memory (an LRU from cachetools) and in the store's cache
database, so a new process does not re-read either.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from cachetools import LRUCache

CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


class DigestMemo:
    """stat key -> sha256 hex; `load` fills it from the database, `pending` is what to save."""

    def __init__(self, load: Callable[[], dict[str, str]] | None = None, maxsize: int = 1_000_000) -> None:
        self._memory: LRUCache[str, str] = LRUCache(maxsize=maxsize)  # digested by this process
        self._stored: dict[str, str] | None = None  # read from the database on first use
        self._load = load
        self.pending: dict[str, str] = {}

    def digest(self, path: str, st: os.stat_result) -> str:
        if self._stored is None:
            self._stored = self._load() if self._load is not None else {}
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        found = self._stored.get(key) or self._memory.get(key)
        if found is None:
            found = file_sha256(path)
            self._memory[key] = found
            self.pending[key] = found
        return found
