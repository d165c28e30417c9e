"""Work on an image's merged root file system from Python (COPY, ADD, user lookup).

The layers are joined by an overlay mounted in a short-lived child process
with its own mount namespace, so the host never sees the mount and nothing
is left behind if the step fails or is killed. Writes land in the step's upper
dir exactly as a RUN's would: the overlay computes copy-ups and whiteouts.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from grammar.errors import PybuildError

T = TypeVar("T")
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def in_rootfs(lower_dirs: list[Path], upper: tuple[Path, Path] | None, fn: Callable[..., T],
              extra_roots: dict[str, list[Path]] | None = None) -> T:
    """Call fn(root, **extra) in a child where `root` is the merged view of `lower_dirs`
    (top-most first) plus `upper` (upper, work) if given; each extra root is a read-only
    merged view of its own layers. fn's result (or PybuildError) comes back pickled.
    """
    scratch = Path(tempfile.mkdtemp(prefix="pybuild-rootfs-"))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        os.close(read_fd)
        status = 0
        try:
            _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            from builder.sandbox import mount_overlay

            root = scratch / "root"
            root.mkdir()
            mount_overlay([str(p) for p in lower_dirs], (str(upper[0]), str(upper[1])) if upper else None,
                          str(root), str(scratch))
            extras = {}
            for name, layers in (extra_roots or {}).items():
                target = scratch / f"x-{name}"
                target.mkdir()
                mount_overlay([str(p) for p in layers], None, str(target), str(scratch))
                extras[name] = target
            payload = ("ok", fn(root, **extras))
        except PybuildError as exc:
            payload = ("user", (exc.message, exc.place, exc.source))
            status = 1
        except BaseException as exc:  # an internal bug: carry the text back
            import traceback

            payload = ("bug", "".join(traceback.format_exception(exc)))
            status = 2
        try:
            data = pickle.dumps(payload)
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
    finally:
        os.waitpid(pid, 0)
        shutil.rmtree(scratch, ignore_errors=True)
    if not data:
        raise RuntimeError("the rootfs helper process died without a result")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value
    if kind == "user":
        raise PybuildError(*value)
    raise RuntimeError(f"rootfs helper failed:\n{value}")


_private = False


def enter_private_mount_namespace() -> None:
    """Give this process its own mount namespace (once): whatever it mounts is invisible to the
    host and vanishes with the process, even after SIGKILL. Sandboxes forked later inherit it."""
    global _private
    if _private:
        return
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _private = True


def mount_stage_root(layers: list[Path], target: Path, readonly: bool) -> None:
    """A stage's or image's merged root at target (for RUN --mount=type=bind,from=...);
    writable mounts get a throwaway upper dir beside target, as BuildKit discards such writes."""
    enter_private_mount_namespace()
    target.mkdir(parents=True, exist_ok=True)
    upper = None
    if not readonly:
        (target.parent / "upper").mkdir(exist_ok=True)
        (target.parent / "work").mkdir(exist_ok=True)
        upper = (str(target.parent / "upper"), str(target.parent / "work"))
    from builder.sandbox import mount_overlay

    mount_overlay([str(p) for p in layers], upper, str(target), str(target.parent))


def resolve_in_root(root: Path, path: str) -> Path:
    """`path` inside `root`, following symlinks as if root were "/" (never leaving root)."""
    from builder.sandbox import resolve_in_root as resolve

    try:
        return root / resolve(str(root), path)
    except OSError as exc:  # a symlink loop in the image
        raise PybuildError(f"cannot resolve {path} in the image: {exc.strerror}") from None


def read_text_in_root(root: Path, path: str) -> str | None:
    """A small file of the image (e.g. /etc/passwd), or None when absent."""
    try:
        return resolve_in_root(root, path).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
