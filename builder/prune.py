"""`pybuild du` and `pybuild prune`: what the store and cache hold, and giving space back.

Cache entries go least recently used first; a layer is deleted only when no
image and no remaining cache entry needs it, and only when no other pybuild
process has the store open (a running build may be about to use it).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.store import Store
from cache.index import CacheIndex, StepResult
from grammar.errors import PybuildError

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4}
_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", text.lower())
    if not match:
        raise PybuildError(f"invalid size {text!r}: use bytes or a unit, e.g. 500MB or 2GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_age(text: str) -> float:
    """`until=24h` style durations (s, m, h, d, w; combinable: 1h30m)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text.lower())
    if not parts or "".join(a + b for a, b in parts) != text.lower():
        raise PybuildError(f"invalid duration {text!r}: use e.g. 30m, 24h or 7d")
    return sum(float(n) * _DURATION[u] for n, u in parts)


@dataclass
class Usage:
    images: int = 0
    image_bytes: int = 0  # layers and blobs that tagged images use
    cache_entries: int = 0
    cache_only_bytes: int = 0  # layers only the cache keeps: reclaimable by prune
    unreferenced_bytes: int = 0  # layers nothing keeps: reclaimable at once
    cache_mount_bytes: int = 0
    total_bytes: int = 0


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _image_refs(store: Store) -> set[str]:
    refs: set[str] = set()
    for image in store.images():
        refs.update(image.config.diff_ids)
        refs.add(image.manifest_digest)
        refs.add(image.id)
    return refs


def usage(store: Store, index: CacheIndex) -> Usage:
    result = Usage()
    images = store.images()
    result.images = len(images)
    image_refs = _image_refs(store)
    cache_refs = {s.diff_id for s in index.steps() if s.diff_id}
    result.cache_entries = len(index.steps())
    blob_dir = store.root / "blobs" / "sha256"
    for blob in blob_dir.iterdir():
        digest = "sha256:" + blob.name
        size = blob.stat().st_size
        layer = store.root / "layers" / blob.name
        size += _tree_size(layer) if layer.exists() else 0
        result.total_bytes += size
        if digest in image_refs:
            result.image_bytes += size
        elif digest in cache_refs:
            result.cache_only_bytes += size
        elif layer.exists():
            result.unreferenced_bytes += size
    mounts = store.root / "cache-mounts"
    if mounts.exists():
        result.cache_mount_bytes = _tree_size(mounts)
        result.total_bytes += result.cache_mount_bytes
    return result


@dataclass
class PruneReport:
    cache_entries: int = 0
    images: int = 0
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    skipped_busy: bool = False


def prune(store: Store, index: CacheIndex, *, everything: bool = False, keep_storage: int | None = None,
          unused_for: float | None = None) -> PruneReport:
    """Drop cache entries (all, older than `unused_for` seconds, or LRU down to `keep_storage`
    bytes of cache-only layers), then delete what nothing references any more."""
    report = PruneReport()
    before = {p.name: p.stat().st_size for p in (store.root / "blobs" / "sha256").iterdir()}
    # GC roots besides images: whatever cache entries remain when gc runs.
    store.keep.append(lambda: {s.diff_id for s in index.steps() if s.diff_id})
    for image in store.images():  # dangling images: replaced by a rebuild under the same tag
        if not image.names:
            store.remove_image(image.id)
            report.images += 1
    steps = sorted(index.steps(), key=lambda s: s.last_used)  # least recently used first
    image_refs = _image_refs(store)
    doomed: list[StepResult] = []
    if everything:
        doomed = steps
    else:
        if unused_for is not None:
            cutoff = time.time() - unused_for
            doomed = [s for s in steps if s.last_used < cutoff]
        if keep_storage is not None:
            remaining = [s for s in steps if s not in doomed]
            users: dict[str, int] = {}
            for step in remaining:
                if step.diff_id and step.diff_id not in image_refs and store.has_blob(step.diff_id):
                    users[step.diff_id] = users.get(step.diff_id, 0) + 1
            total = sum(store.blob_size(d) for d in users)
            for step in remaining:
                if total <= keep_storage:
                    break
                doomed.append(step)
                if step.diff_id in users:
                    users[step.diff_id] -= 1
                    if users[step.diff_id] == 0:
                        total -= store.blob_size(step.diff_id)
    index.forget([s.key for s in doomed])
    report.cache_entries = len(doomed)
    report.deleted = store.gc()
    image_refs = _image_refs(store)
    keep = {s.diff_id for s in index.steps() if s.diff_id}
    # gc deletes nothing while another pybuild has the store open: say so rather than report 0 freed.
    report.skipped_busy = any(s.diff_id and s.diff_id not in keep and s.diff_id not in image_refs
                              and store.has_blob(s.diff_id) for s in doomed)
    report.freed_bytes = sum(before.get(d[7:], 0) for d in report.deleted)
    if everything:
        mounts = store.root / "cache-mounts"
        if mounts.exists():
            report.freed_bytes += _tree_size(mounts)
            shutil.rmtree(mounts, ignore_errors=True)
        index.prune_digests(time.time() + 1)
    return report
