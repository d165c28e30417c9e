"""Run one command in a throw-away container: the engine behind every RUN and `pybuild run`.

Plain kernel interfaces through `os` and ctypes, no runtime binary, so a RUN
costs milliseconds: one Python fork (whose cost grows with the caller's
memory) and one vfork. Two processes, each with one job:

* **B** is forked by the caller (`run`) straight into a new PID namespace,
  as its pid 1. It unshares the mount, UTS, IPC (and for network "none" net)
  namespaces, mounts the overlay root, /proc, /dev, /sys,
  /etc/{hosts,hostname,resolv.conf} and the RUN --mount mounts, pivots into
  the root, resolves the user, takes the user's ids and posix_spawns
  **C**, the command. B reaps orphans until C exits, then exits with C's
  status; a PID namespace dies with its pid 1, killing whatever the command
  left behind.
* the caller reaps B, then reads B's reports; interrupted, it SIGKILLs B
  first (its ^C-proof cleanup is `_Cleanup`).

Nothing can outlive a run: the mounts exist only in B's private mount
namespace, and B gets SIGKILL if the calling thread dies (PR_SET_PDEATHSIG).

Mount points the image lacks (``/proc`` in a scratch image, ``/etc/hosts``,
a RUN --mount target) must be created to mount over them, and they land in
the upper dir. B reports each one before it creates it (and the times of the
directories it touches) in a memfd; after the run the caller removes them from
the upper dir again, so the upper dir holds exactly what the command wrote.

The children only run `os` calls, ctypes calls into libc loaded at import and
already-imported pure Python, since the caller may have threads.
"""
from __future__ import annotations

import ctypes
import contextlib
import errno
import fcntl
import functools
import json
import os
import platform
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from builder.users import resolve_user
from grammar.errors import PybuildError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORK_MODES = ("host", "none")
# A plain diff in the upper dir: whiteouts and opaque dirs only, no redirects,
# metacopy-only files or inode index. Every 6.x kernel takes all four.
OVERLAY_OPTIONS: tuple[tuple[str, str | None], ...] = (
    ("index", "off"), ("redirect_dir", "off"), ("metacopy", "off"), ("xino", "off"))
# `run` adds "volatile" (5.10): no sync of the whole upper file system at unmount
# (~2 ms a run; a crashed build's upper dir is thrown away anyway). It leaves
# work/incompat/volatile behind, which `run` removes so the dirs can be reused.
VOLATILE = ("volatile", None)

# -- kernel interface -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_STRICTATIME = 32, 4096, 16384, 1 << 18, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
# The new mount API's numbers are the same on every architecture.
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
SYS_MOUNT_SETATTR, SYS_CLOSE_RANGE, CLOSE_RANGE_CLOEXEC = 442, 436, 4
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 1, 1, 4
MOUNT_ATTR_RDONLY, AT_FDCWD, AT_RECURSIVE = 1, -100, 0x8000
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_SETUP_FAILED = 125  # exit status of B when it reported an error
_ALL_SIGNALS = tuple(sorted(signal.valid_signals()))
_DEV_NODES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))
_ETC_FILES = ("hosts", "hostname", "resolv.conf")
_MAX_USER_FILE = 10 << 20  # as moby: passwd/group are small

# Which overlay mount call to use: None tries the new API ("lowerdir+", Linux 6.8)
# and falls back to mount(2); tests set True/False to exercise one path.
_new_mount_api: bool | None = None


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _b(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        raise _oserror(f"mount {fstype or source} on {target}")


def _syscall(number: int, *args: Any) -> int:
    ret = _libc.syscall(ctypes.c_long(number), *args)
    if ret < 0:
        raise _oserror(f"syscall {number}")
    return ret


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


# -- public API --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """An extra mount for the command: RUN --mount caches, binds and tmpfs."""

    kind: str  # "bind" or "tmpfs"
    target: str  # absolute path inside the container
    source: Path | None = None  # host path, for "bind"
    readonly: bool = False


@dataclass
class SandboxSpec:
    """What to run and on which root; see `run`."""

    lower_dirs: list[Path]  # parent layers, top-most first (overlay order); [] is scratch
    upper_dir: Path | None  # receives the command's writes; None: read-only root
    work_dir: Path | None  # overlay work dir, same filesystem as upper_dir
    argv: list[str]  # exec form; the caller passes ["/bin/sh", "-c", cmd] for shell form
    env: list[str] | dict[str, str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""
    network: str = "host"  # "host" or "none"
    hostname: str = "pybuild"
    mounts: list[Mount] = field(default_factory=list)
    stdin: int | None = None  # fd; None is /dev/null
    stdout: int | None = None  # fd; None inherits ours
    stderr: int | None = None


def run(spec: SandboxSpec) -> int:
    """Run `spec.argv` in a fresh container and return its exit status (128+n for signal n).

    Returns 127 (126) with a message on the command's stderr when argv[0] is not
    found (not executable), as a shell does. Raises PybuildError for a bad spec
    or a failed setup (unknown user, unusable working directory, ...). Blocks
    until the command ended and every process and mount of the run is gone,
    also when interrupted (KeyboardInterrupt) while waiting.
    """
    _validate(spec)
    env = _environment(spec.env)
    reports = _Reports()
    cleanup = _Cleanup(spec, reports)
    try:
        cleanup.scratch = tempfile.mkdtemp(prefix="pybuild-sandbox-")
        stdin = spec.stdin
        if stdin is None:
            stdin = cleanup.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        plan = _Plan(spec, env, cleanup.scratch, stdin)
        # B's reports go to a memory file, not a pipe: read after B is gone, nothing is
        # lost to a ^C landing between a read and its use.
        cleanup.reports_fd = os.memfd_create("pybuild-sandbox-reports", os.MFD_CLOEXEC)
        cleanup.alive_fd, alive_w = os.pipe()
        try:
            with _signals_deferred():
                pid = _fork_into_new_pid_namespace()
                if pid == 0:  # B, pid 1 of the new namespace
                    code = _SETUP_FAILED
                    try:
                        code = _container_init(plan, cleanup.reports_fd, alive_w)
                    except BaseException as exc:  # report, never unwind into the caller's code
                        _report_exception(cleanup.reports_fd, exc)
                    finally:
                        os._exit(code)
                cleanup.child = _Child(pid)
        finally:
            os.close(alive_w)
        code = cleanup.child.wait()
    finally:
        cleanup.run()
    for report in reports:
        if report["op"] == "error":
            raise PybuildError(report["message"] if report["user"] else f"sandbox setup failed: {report['message']}")
    return code


# -- caller side -------------------------------------------------------------------------


def _validate(spec: SandboxSpec) -> None:
    if spec.network not in NETWORK_MODES:
        raise PybuildError(f"network mode {spec.network!r} not supported: use one of {', '.join(NETWORK_MODES)}")
    if not spec.argv:
        raise PybuildError("no command to run")
    if (spec.upper_dir is None) != (spec.work_dir is None):
        raise PybuildError("sandbox needs both an upper and a work dir, or neither")
    if not 0 < len(spec.hostname.encode()) <= 64:
        raise PybuildError(f"invalid hostname {spec.hostname!r}")
    for m in spec.mounts:
        if m.kind not in ("bind", "tmpfs"):
            raise PybuildError(f"unsupported mount type {m.kind!r}")
        if not m.target.startswith("/") or not m.target.strip("/"):
            raise PybuildError(f"mount target must be an absolute path other than /: {m.target!r}")
        if m.kind == "bind" and (m.source is None or not os.path.exists(m.source)):
            raise PybuildError(f"mount source {m.source} does not exist")


def _environment(env: list[str] | dict[str, str]) -> list[str]:
    """K=V strings with docker's default PATH added when absent."""
    items = [f"{k}={v}" for k, v in env.items()] if isinstance(env, dict) else list(env)
    if not any(item.startswith("PATH=") for item in items):
        items.append(f"PATH={DEFAULT_PATH}")
    return items


class _Reports(list[dict[str, Any]]):
    """B's JSON-lines reports: stubs it created, dirs it touched, errors."""

    def load(self, fd: int) -> None:
        """All of them, from the start of the file; a last line cut short by SIGKILL is skipped."""
        data = b""
        while chunk := os.pread(fd, 1 << 20, len(data)):
            data += chunk
        records = []
        for line in data.split(b"\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        self[:] = records


class _Child:
    """B as the caller sees it; killable without a pid-reuse race (a pidfd, Linux 5.3)."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1

    def wait(self) -> int:
        assert self.pid is not None
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return _exit_code(status)

    def kill(self) -> None:
        """SIGKILL pid 1, which takes the whole namespace along, and reap it."""
        if self.pid is not None:
            try:
                if self.pidfd >= 0:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class _Cleanup:
    """Everything `run` must undo, done even when ^C arrives meanwhile."""

    spec: SandboxSpec
    reports: _Reports
    scratch: str | None = None
    devnull: int = -1
    reports_fd: int = -1
    alive_fd: int = -1  # B writes to it: EPIPE once we are gone
    child: _Child | None = None

    def run(self) -> None:
        """Each step is idempotent: one a KeyboardInterrupt broke off is done again,
        and the interrupt is raised once everything is clean."""
        pending: list[BaseException] = []

        def do(step: Callable[[], Any]) -> Any:
            while True:
                try:
                    return step()
                except KeyboardInterrupt as exc:
                    pending.append(exc)

        do(self._stop_child)
        do(self._load_reports)
        if self.spec.upper_dir is not None:
            for step in do(lambda: _stub_removal(str(self.spec.upper_dir), self.reports)):
                do(step)
        do(self._remove_volatile)
        do(self._close)
        if pending:
            raise pending[0]

    def _stop_child(self) -> None:
        if self.child is not None:
            self.child.kill()

    def _load_reports(self) -> None:
        if self.reports_fd >= 0:
            self.reports.load(self.reports_fd)

    def _remove_volatile(self) -> None:
        # overlay refuses a work dir a "volatile" mount used until this is gone
        if self.spec.work_dir is not None:
            shutil.rmtree(Path(self.spec.work_dir, "work", "incompat", "volatile"), ignore_errors=True)

    def _close(self) -> None:
        for name in ("reports_fd", "alive_fd", "devnull"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self.scratch is not None:
            try:
                os.rmdir(self.scratch)  # empty: B's tmpfs on it died with B's mount namespace
            except OSError:
                pass
            self.scratch = None


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Python signal handlers wait until the child is forked and recorded.

    A KeyboardInterrupt raised in os.fork's at-fork hooks is swallowed and leaves
    logging's module lock held (every later fork from another thread hangs), and
    one raised between the fork and `_Child` would orphan B. Handlers only ever
    run in the main thread, so only there is there anything to defer.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved: dict[int, Callable[..., Any]] = {}
    for signum in _ALL_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            saved[signum] = handler
            signal.signal(signum, lambda n, frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum in caught:
            saved[signum](signum, None)


def _fork_into_new_pid_namespace() -> int:
    """os.fork() whose child is pid 1 of a new PID namespace: unshare(CLONE_NEWPID) changes
    only the calling thread's namespace for children, so that is restored right after.

    One Python fork per run instead of two (fork, unshare, fork): each costs ~1.5 ms
    plus ~0.4 ms per 10 MB of the caller's memory.
    """
    ns = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        if _libc.unshare(CLONE_NEWPID) != 0:
            raise _oserror("unshare(CLONE_NEWPID)")
        pid = os.fork()
    finally:
        if pid != 0:  # the caller: its next fork must not land in our namespace
            if _libc.setns(ns, CLONE_NEWPID) != 0:
                raise _oserror("setns back to our PID namespace")
            os.close(ns)
    return pid


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _stub_removal(upper: str, reports: _Reports) -> list[Callable[[], None]]:
    """The steps undoing the mount points B created in the upper dir and the times it changed.

    A directory B only touched is left alone if the command changed it since
    (B's "post" snapshot differs); one that B brought into the upper dir (copy-up
    or mkdir) is removed again when it is untouched and empty.
    """
    created = [r for r in reports if r["op"] == "created"]
    dirs = [r for r in reports if r["op"] == "dir"]
    post = {r["path"]: r["state"] for r in reports if r["op"] == "post"}
    untouched = {d["path"] for d in dirs if d["path"] not in post or _dir_state(upper, d["path"]) == post[d["path"]]}
    steps: list[Callable[[], None]] = []
    for rec in reversed(created):
        path = _join(upper, rec["path"])
        steps.append(functools.partial(_remove_stub, path))
        if rec["whiteout"]:  # we replaced a whiteout of the upper dir: put it back
            steps.append(functools.partial(_restore_whiteout, path))
    for d in sorted(dirs, key=lambda d: -d["path"].count("/") - bool(d["path"])):
        if d["path"] in untouched:
            steps.append(functools.partial(_settle_dir, _join(upper, d["path"]), d))
    return steps


def _remove_stub(path: str) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
    except OSError:
        pass  # gone already, or the command put something there: keep it


def _restore_whiteout(path: str) -> None:
    if not os.path.lexists(path):
        os.mknod(path, stat.S_IFCHR, 0)


def _settle_dir(path: str, rec: dict[str, Any]) -> None:
    """An untouched dir: out of the upper dir again if we brought it there, else its times back."""
    try:
        if not rec["in_upper"] and not os.listdir(path):
            os.rmdir(path)
        else:
            os.utime(path, ns=(rec["atime"], rec["mtime"]), follow_symlinks=False)
    except OSError:
        pass


def _dir_state(upper: str, rel: str) -> list[int] | None:
    """What tells whether the command changed a directory of the upper dir."""
    path = _join(upper, rel)
    try:
        st = os.lstat(path)
        return [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, len(os.listdir(path))]
    except OSError:
        return None


def _join(root: str, rel: str) -> str:
    return f"{root}/{rel}" if rel else root


# -- the children -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The spec with everything the children need worked out beforehand."""

    spec: SandboxSpec
    env: list[str]
    scratch: str
    stdin: int

    @property
    def root(self) -> str:
        return self.scratch + "/root"


def _send(fd: int, **record: Any) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())  # one write: whole lines only


def _report_exception(fd: int, exc: BaseException) -> None:
    try:
        if isinstance(exc, PybuildError):
            _send(fd, op="error", message=exc.message, user=True)
        elif isinstance(exc, OSError) and exc.strerror:
            where = f" ({exc.filename})" if exc.filename else ""
            _send(fd, op="error", message=exc.strerror + where, user=False)
        else:
            _send(fd, op="error", message=str(exc) or type(exc).__name__, user=False)
    except BaseException:
        pass


def _set_signal(signum: int, handler: int) -> None:
    """sigaction through libc: no Python-level handler bookkeeping in the children."""
    _libc.signal(ctypes.c_int(signum), ctypes.c_void_p(handler))


def _container_init(plan: _Plan, report_fd: int, alive_fd: int) -> int:
    """B, pid 1: build the container's file system, start the command, reap until it ends."""
    spec = plan.spec
    # Drop every fd but ours at once: another thread's run may have the command's output
    # pipe open in the caller, and holding it would delay its reader's EOF.
    keep = {0, 1, 2, report_fd, alive_fd, plan.stdin, *(fd for fd in (spec.stdout, spec.stderr) if fd is not None)}
    _close_fds_except(keep)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        _set_signal(signum, 1)  # ^C reaches the caller, which kills us
    _set_signal(signal.SIGCHLD, 0)  # we reap, whatever the caller chose
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise _oserror("prctl")
    os.write(alive_fd, b".")  # EPIPE if the caller died before we asked to die with it
    os.close(alive_fd)
    _libc.prctl(PR_SET_NAME, b"pybuild-init", 0, 0, 0)  # /proc/1/comm in the container
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (CLONE_NEWNET if spec.network == "none" else 0)
    if _libc.unshare(flags) != 0:
        raise _oserror("unshare")
    os.umask(0)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _make_scratch(plan)
    name = spec.hostname.encode()
    if _libc.sethostname(name, len(name)) != 0:
        raise _oserror("sethostname")
    if spec.network == "none":
        _loopback_up()
    root = plan.root
    _mount_overlay(plan)
    stubs = _Stubs(root, None if spec.upper_dir is None else str(spec.upper_dir), report_fd)
    _mount_system(plan, stubs)
    for m in sorted(spec.mounts, key=lambda m: len([p for p in m.target.split("/") if p])):
        _mount_extra(m, stubs)
    stubs.finish()
    os.chdir(root)
    _pivot_root()
    if _libc.umount2(b".", MNT_DETACH) != 0:
        raise _oserror("umount old root")
    os.chdir("/")

    user = resolve_user(spec.user, _read_user_file("/etc/passwd"), _read_user_file("/etc/group"))
    env = dict(item.split("=", 1) for item in plan.env if item.find("=") > 0)
    env.setdefault("HOME", user.home)
    os.umask(0o022)
    cwd = os.path.normpath(os.path.join("/", spec.cwd))
    try:
        os.makedirs(cwd, 0o755, exist_ok=True)
        os.chdir(cwd)
    except OSError as exc:
        raise PybuildError(f"cannot use {cwd} as the working directory: {exc.strerror}") from None

    sources = [plan.stdin, 1 if spec.stdout is None else spec.stdout, 2 if spec.stderr is None else spec.stderr]
    stdio = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in sources]  # sources may overlap 0-2
    _cloexec_from(3)  # no fd of the caller's leaks into the container
    # B takes the user's ids itself, so C can be posix_spawn'ed (a vfork, not a Python
    # fork: ~1.5 ms less). The caller can still SIGKILL it; a uid change disarms PDEATHSIG.
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise _oserror("prctl")
    try:
        pid = _spawn(spec.argv, env, stdio)
    except _ExecFailed as exc:
        return exc.status
    while True:  # reap everything orphaned into us until the command itself is done
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return _exit_code(status)


class _ExecFailed(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _spawn(argv: list[str], env: dict[str, str], stdio: list[int]) -> int:
    """C: argv[0] searched in the container's PATH, started in its own session with default
    signal handling. Else tells its stderr why, and raises with a shell's status (127, 126)."""
    name = argv[0]
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in env.get("PATH", DEFAULT_PATH).split(":")] if name else []
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    failure: OSError | None = None
    for path in candidates:
        try:
            return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                                  setsigmask=(), setsigdef=_ALL_SIGNALS)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and len(candidates) > 1:
                continue
            failure = exc
            if exc.errno != errno.EACCES or len(candidates) == 1:
                break
    if failure is None:
        why, status = "executable file not found in $PATH", 127
    else:
        why = (failure.strerror or str(failure)).lower()
        status = 127 if failure.errno in (errno.ENOENT, errno.ENOTDIR) else 126
    try:
        os.write(stdio[2], f'pybuild: exec "{name}": {why}\n'.encode(errors="replace"))
    except OSError:
        pass
    raise _ExecFailed(status)


def _close_fds_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep) + [0x7FFFFFFF]:
        if fd > low:
            _close_range(low, fd - 1)
        low = fd + 1


def _close_range(first: int, last: int) -> None:
    if _libc.syscall(ctypes.c_long(SYS_CLOSE_RANGE), ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)):
        for name in os.listdir("/proc/self/fd"):  # before Linux 5.9
            if first <= int(name) <= last:
                try:
                    os.close(int(name))
                except OSError:
                    pass


def _cloexec_from(first: int) -> None:
    """Mark every fd >= first close-on-exec: close_range(CLOEXEC) (5.11), else one by one."""
    if _libc.syscall(ctypes.c_long(SYS_CLOSE_RANGE), ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF),
                     ctypes.c_uint(CLOSE_RANGE_CLOEXEC)) == 0:
        return
    for name in os.listdir("/proc/self/fd"):
        if int(name) >= first:
            try:
                os.set_inheritable(int(name), False)
            except OSError:
                pass


def _read_user_file(path: str) -> str | None:
    """/etc/passwd or /etc/group of the container, None if absent or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.read(fd, min(st.st_size + 1, _MAX_USER_FILE)).decode(errors="replace")
    finally:
        os.close(fd)


def _make_scratch(plan: _Plan) -> None:
    """A private tmpfs on the caller's empty temp dir, for the root's mount point, an
    empty lower dir and the files bound over /etc: no disk I/O, nothing to delete."""
    scratch = plan.scratch
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700,size=4m")
    os.mkdir(scratch + "/root", 0o755)
    os.mkdir(scratch + "/empty", 0o755)
    hostname = plan.spec.hostname
    try:
        with open("/etc/resolv.conf", "rb") as f:
            resolv = f.read()
    except OSError:
        resolv = b""
    files = {
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n".encode(),
        "hostname": f"{hostname}\n".encode(),
        "resolv.conf": resolv,
    }
    for name, data in files.items():
        fd = os.open(f"{scratch}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _loopback_up() -> None:
    """Bring up lo in the new network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifreq)[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))


# -- the root file system -----------------------------------------------------------------


def _mount_overlay(plan: _Plan) -> None:
    """The overlay root at plan.root."""
    spec = plan.spec
    upper = None if spec.upper_dir is None else (str(spec.upper_dir), str(spec.work_dir))
    mount_overlay([str(p) for p in spec.lower_dirs], upper, plan.root, plan.scratch, volatile=True)


def mount_overlay(lowers: list[str], upper: tuple[str, str] | None, target: str, scratch: str,
                  volatile: bool = False) -> None:
    """Mount an overlay of `lowers` (top-most first) at target; read-only without `upper`
    (upper, work). `scratch` is a private dir for helper entries. The new mount API when the
    kernel has "lowerdir+" (no limit on layers), else mount(2) with short names."""
    empty = os.path.join(scratch, "empty")
    os.makedirs(empty, exist_ok=True)
    lowers = list(lowers) or [empty]
    if upper is None and len(lowers) == 1:
        lowers.append(empty)  # overlay needs two lowers when there is no upper
    if _new_mount_api is not False:
        try:
            _mount_overlay_fsopen(lowers, upper, target, volatile=volatile)
            return
        except _NoNewMountApi:
            if _new_mount_api:
                raise OSError(errno.ENOSYS, "the kernel lacks overlay lowerdir+ (Linux 6.8)") from None
    _mount_overlay_legacy(lowers, upper, target, scratch, volatile)


class _NoNewMountApi(Exception):
    pass


def _mount_overlay_fsopen(lowers: list[str], upper: tuple[str, str] | None, target: str,
                          volatile: bool = False) -> None:
    """Overlay of `lowers` (top-most first) at target, read-only without `upper` (upper, work)."""
    try:
        fs = _syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    except OSError as exc:
        raise _NoNewMountApi() from exc
    step = "lowerdir+"
    try:
        params = [("lowerdir+", p) for p in lowers]
        if upper is not None:
            params += [("upperdir", upper[0]), ("workdir", upper[1])]
        options = list(OVERLAY_OPTIONS) + ([VOLATILE] if volatile and upper is not None else [])
        for key, value in params + options:
            step = key
            if value is None:  # a flag
                _syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, key.encode(), None, 0)
            else:
                _syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0)
        step = "create"
        _syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        step = "fsmount"
        mnt = _syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY if upper is None else 0)
        step = "move_mount"
        _syscall(SYS_MOVE_MOUNT, mnt, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
        os.close(mnt)
    except OSError as exc:
        log = _kernel_log(fs)
        if step == "lowerdir+" and exc.errno == errno.EINVAL and "lowerdir+" in log:
            raise _NoNewMountApi() from exc  # before Linux 6.8
        raise OSError(exc.errno, f"mount overlay ({step}): {os.strerror(exc.errno or 0)} {log}".rstrip()) from None
    finally:
        os.close(fs)


def _kernel_log(fs: int) -> str:
    """The messages the kernel queued on an fs context (why fsconfig failed)."""
    lines = []
    for _ in range(16):
        try:
            lines.append(os.read(fs, 4096).decode(errors="replace").strip())
        except OSError:
            break
    return "; ".join(line for line in lines if line)


def _mount_overlay_legacy(lowers: list[str], upper: tuple[str, str] | None, target: str, scratch: str,
                          volatile: bool) -> None:
    """mount(2) takes one page of options: name every dir by a short symlink, relative to scratch."""
    links = tempfile.mkdtemp(prefix="l", dir=scratch)
    short = os.path.basename(links)
    names = []
    for i, path in enumerate(lowers):
        os.symlink(path, f"{links}/{i}")
        names.append(f"{short}/{i}")
    data = "lowerdir=" + ":".join(names)
    if upper is not None:
        os.symlink(upper[0], links + "/u")
        os.symlink(upper[1], links + "/w")
        data += f",upperdir={short}/u,workdir={short}/w"
    options = list(OVERLAY_OPTIONS) + ([VOLATILE] if volatile and upper is not None else [])
    data += "".join(f",{k}" if v is None else f",{k}={v}" for k, v in options)
    if len(data) >= 4096:
        raise OSError(errno.E2BIG, f"too many layers ({len(lowers)}) for mount(2) on this kernel")
    os.chdir(scratch)
    try:
        _mount("overlay", target, "overlay", MS_RDONLY if upper is None else 0, data)
    finally:
        os.chdir("/")


def resolve_in_root(root: str, path: str) -> str:
    """`path` inside `root` with every symlink followed as if root were "/" (relative, clean).

    Components past the first missing one are taken as written.
    """
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        full = root + "/" + "/".join(done + [name])
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            done.append(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
            target = os.readlink(full)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    return "/".join(done)


class _Stubs:
    """Creates missing mount points in the root and reports the ones in the upper dir."""

    def __init__(self, root: str, upper: str | None, report_fd: int) -> None:
        self.root, self.upper, self.fd = root, upper, report_fd
        self.root_dev = os.stat(root).st_dev
        self.created: set[str] = set()
        self.dirs: set[str] = set()

    def ensure(self, target: str, want_dir: bool) -> str | None:
        """Host path of the mount point for `target`; None if missing on a read-only root."""
        rel = resolve_in_root(self.root, target)
        parts = rel.split("/") if rel else []
        for i in range(len(parts)):
            sub = "/".join(parts[: i + 1])
            full = self.root + "/" + sub
            last = i == len(parts) - 1
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                if self.upper is None:
                    return None
                self._create(sub, "/".join(parts[:i]), want_dir or not last)
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, f"mount target {target}: /{sub} is not a directory")
            if last and want_dir != stat.S_ISDIR(st.st_mode):
                kind = "is not a directory" if want_dir else "is a directory"
                raise OSError(errno.ENOTDIR if want_dir else errno.EISDIR, f"mount target {target} {kind}")
        return self.root + ("/" + rel if rel else "")

    def _create(self, sub: str, parent: str, is_dir: bool) -> None:
        full = self.root + "/" + sub
        on_overlay = os.stat(self.root + ("/" + parent if parent else "")).st_dev == self.root_dev
        if on_overlay:  # reported before it exists: we may be killed right after creating it
            self._touch(parent)
            try:
                st = os.lstat(_join(self.upper or "", sub))
                whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            except FileNotFoundError:
                whiteout = False
            self.created.add(sub)
            _send(self.fd, op="created", path=sub, whiteout=whiteout)
        if is_dir:
            os.mkdir(full, 0o755)
        else:
            os.close(os.open(full, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def _touch(self, parent: str) -> None:
        """Record the times of `parent` and its ancestors before we change them."""
        parts = parent.split("/") if parent else []
        for i in range(len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel in self.dirs or rel in self.created:
                continue
            st = os.lstat(_join(self.root, rel))
            self.dirs.add(rel)
            in_upper = os.path.lexists(_join(self.upper or "", rel))
            _send(self.fd, op="dir", path=rel, in_upper=in_upper, atime=st.st_atime_ns, mtime=st.st_mtime_ns)

    def finish(self) -> None:
        """Snapshot the touched dirs: a later difference is the command's doing."""
        for rel in sorted(self.dirs):
            _send(self.fd, op="post", path=rel, state=_dir_state(self.upper or "", rel))


def _mount_system(plan: _Plan, stubs: _Stubs) -> None:
    """/proc, /dev, /sys and the /etc files every container gets."""
    proc = stubs.ensure("/proc", True)
    if proc is not None:
        _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = stubs.ensure("/dev", True)
    if dev is not None:
        _mount_dev(dev)
    sys_dir = stubs.ensure("/sys", True)
    if sys_dir is not None:
        try:
            _mount("sysfs", sys_dir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:  # not allowed here: the host's, read-only
            _mount("/sys", sys_dir, None, MS_BIND | MS_REC)
            _make_readonly(sys_dir)
    for name in _ETC_FILES:
        target = stubs.ensure("/etc/" + name, False)
        if target is not None:
            _mount(f"{plan.scratch}/{name}", target, None, MS_BIND)


def _mount_dev(dev: str) -> None:
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k")
    for name, major, minor in _DEV_NODES:
        path = f"{dev}/{name}"
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        except PermissionError:  # no CAP_MKNOD: bind the host's node
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            _mount(f"/dev/{name}", path, None, MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/pts", 0o755)
    _mount("devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.mkdir(dev + "/shm", 0o1777)
    _mount("shm", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")


def _mount_extra(m: Mount, stubs: _Stubs) -> None:
    want_dir = m.kind == "tmpfs" or os.path.isdir(str(m.source))
    target = stubs.ensure(m.target, want_dir)
    if target is None:
        raise OSError(errno.EROFS, f"mount target {m.target} does not exist and the root is read-only")
    if m.kind == "tmpfs":
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | (MS_RDONLY if m.readonly else 0), "mode=1777")
        return
    _mount(str(m.source), target, None, MS_BIND | MS_REC)
    if m.readonly:
        _make_readonly(target)


def _make_readonly(target: str) -> None:
    """Read-only, submounts included (mount_setattr, 5.12); else only the top mount."""
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    if _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), AT_FDCWD, os.fsencode(target), AT_RECURSIVE,
                     ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) == 0:
        return
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _pivot_root() -> None:
    """pivot_root(".", "."): the old root ends up stacked on the new one, ready to detach."""
    if hasattr(_libc, "pivot_root"):  # glibc exports it without declaring it
        ret = _libc.pivot_root(b".", b".")
    else:  # pragma: no cover - older libcs
        ret = _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT[platform.machine()]), b".", b".")
    if ret != 0:
        raise _oserror("pivot_root")
