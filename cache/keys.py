"""Cache keys: pure functions of what a step reads, never of where or when.

A step's key hashes its parent's key (or the base image id), the instruction
after expansion, the build state it reads and the content digests of its
inputs. Paths of the context, mtimes and the clock are left out, so the same
inputs hit from a moved context, a new process or another day.
"""
from __future__ import annotations

import hashlib
import json
import stat
from typing import Iterable, Mapping


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def step_key(parent: str, kind: str, inputs: Mapping[str, object]) -> str:
    """sha256 of (parent key, instruction kind, everything the step reads)."""
    digest = hashlib.sha256()
    digest.update(b"pybuild-step-v1\0")
    digest.update(parent.encode() + b"\0" + kind.encode() + b"\0")
    digest.update(canonical(inputs))
    return "sha256:" + digest.hexdigest()


def entry_line(rel: str, st_mode: int, size: int, content: str) -> str:
    """One file of a COPY source as it enters the key: name, type, mode, content or link target."""
    kind = "d" if stat.S_ISDIR(st_mode) else "l" if stat.S_ISLNK(st_mode) else "f"
    return f"{rel}\0{kind}\0{stat.S_IMODE(st_mode):o}\0{size if kind == 'f' else 0}\0{content}"


def tree_digest(lines: Iterable[str]) -> str:
    """The digest of a source from its entry lines (the walk order is already sorted)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return "sha256:" + digest.hexdigest()
