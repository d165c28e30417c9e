"""Why a step missed the cache, in one line, against the most recent build of the same step."""
from __future__ import annotations

from typing import Mapping

MAX_NAMES = 5


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMES])
    return shown + (f" and {len(items) - MAX_NAMES} more" if len(items) > MAX_NAMES else "")


def _changes(kind: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"{kind} {name} was set to {new[name]!r}")
        elif name not in new:
            out.append(f"{kind} {name} was removed (was {old[name]!r})")
        elif old[name] != new[name]:
            out.append(f"{kind} {name} changed from {old[name]!r} to {new[name]!r}")
    return out


def explain(previous: Mapping | None, current: Mapping) -> str:
    """The reason a step with record `current` missed, given the record of its last build."""
    if previous is None:
        return "no earlier build of this step"
    if previous.get("base") != current.get("base"):
        return f"the base image moved: {current.get('base_name', '')} was {previous.get('base')}, now {current.get('base')}"
    if previous.get("instruction") != current.get("instruction"):
        return f"the instruction changed (was: {previous.get('instruction')})"
    reasons = _changes("build arg", previous.get("args", {}), current.get("args", {}))
    reasons += _changes("env", previous.get("env", {}), current.get("env", {}))
    old_files, new_files = previous.get("files", {}), current.get("files", {})
    changed = [f for f in new_files if f in old_files and old_files[f] != new_files[f]]
    appeared = [f for f in new_files if f not in old_files]
    vanished = [f for f in old_files if f not in new_files]
    if changed:
        reasons.append(f"files changed: {_names(changed)}")
    if appeared:
        reasons.append(f"files appeared: {_names(appeared)}")
    if vanished:
        reasons.append(f"files vanished: {_names(vanished)}")
    if previous.get("source") != current.get("source") and not (changed or appeared or vanished):
        reasons.append("the source stage or image changed")
    if previous.get("other") != current.get("other"):
        reasons.append("its options changed")
    if reasons:
        return "; ".join(reasons)
    if previous.get("parent") != current.get("parent"):
        return "the step before it changed"
    return "its cache entry was pruned or its layer is gone"
