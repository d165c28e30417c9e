"""The RUN sandbox on real namespaces and overlays (root only)."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import builder.sandbox as sandbox
from builder.sandbox import Mount, SandboxSpec, run
from conftest import needs_root
from grammar.errors import PybuildError


@pytest.fixture(autouse=True)
def _root() -> None:
    needs_root()


@dataclass
class Result:
    code: int
    out: str
    err: str
    upper: Path


def sh(tmp_path: Path, lowers: list[Path], script: str, **kw: object) -> Result:
    """Run `sh -c script` (or argv=...) on a fresh upper dir, capturing output in files."""
    n = len(list(tmp_path.glob("run*")))
    base = tmp_path / f"run{n}"
    (base / "upper").mkdir(parents=True)
    (base / "work").mkdir()
    out, err = base / "out", base / "err"
    argv = kw.pop("argv", ["/bin/sh", "-c", script])
    with open(out, "wb") as fo, open(err, "wb") as fe:
        spec = SandboxSpec(lower_dirs=lowers, upper_dir=base / "upper", work_dir=base / "work",
                           argv=argv, stdout=fo.fileno(), stderr=fe.fileno(), **kw)  # type: ignore[arg-type]
        code = run(spec)
    return Result(code, out.read_text(), err.read_text(), base / "upper")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_output_and_status(tmp_path: Path, busybox_rootfs: Path) -> None:
    r = sh(tmp_path, [busybox_rootfs], "echo hello; echo oops >&2; exit 3")
    assert (r.code, r.out, r.err) == (3, "hello\n", "oops\n")
    assert sh(tmp_path, [busybox_rootfs], "kill -9 $$").code == 128 + 9


def test_writes_go_to_upper(tmp_path: Path, busybox_rootfs: Path) -> None:
    before = (busybox_rootfs / "etc/passwd").read_text()
    r = sh(tmp_path, [busybox_rootfs], "echo new > /new; echo more >> /etc/passwd; rm /bin/ls")
    assert r.code == 0, r.err
    assert (r.upper / "new").read_text() == "new\n"
    assert (r.upper / "etc/passwd").read_text() == before + "more\n"
    assert (busybox_rootfs / "etc/passwd").read_text() == before
    assert (busybox_rootfs / "bin/ls").is_symlink() and not (busybox_rootfs / "new").exists()
    whiteout = os.lstat(r.upper / "bin/ls")  # a deleted lower file: char device 0:0
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert tree(r.upper) == ["bin", "bin/ls", "etc", "etc/passwd", "new"]


def test_dirs_reused(tmp_path: Path, busybox_rootfs: Path) -> None:
    """The same upper and work dir serve a second run (the volatile mount's mark is removed)."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    assert run(SandboxSpec([busybox_rootfs], upper, work, ["/bin/sh", "-c", "echo 1 > /f"])) == 0
    assert run(SandboxSpec([busybox_rootfs], upper, work, ["/bin/sh", "-c", "grep -q 1 /f"])) == 0
    assert tree(upper) == ["f"]


def test_opaque_dir(tmp_path: Path, busybox_rootfs: Path) -> None:
    r = sh(tmp_path, [busybox_rootfs], "rm -rf /home && mkdir /home && touch /home/f && ls /home")
    assert (r.code, r.out) == (0, "f\n")
    assert os.getxattr(r.upper / "home", "trusted.overlay.opaque") == b"y"


def test_etc_files_not_captured(tmp_path: Path, busybox_rootfs: Path) -> None:
    r = sh(tmp_path, [busybox_rootfs], "cat /etc/hostname /etc/hosts /etc/resolv.conf", hostname="box1")
    assert r.code == 0, r.err
    hosts = r.out.split("\n", 1)[1]
    assert r.out.startswith("box1\n") and "127.0.0.1\tlocalhost box1" in hosts
    resolv = Path("/etc/resolv.conf").read_text() if os.path.exists("/etc/resolv.conf") else ""
    assert r.out.endswith(resolv)
    assert tree(r.upper) == []  # the stubs and the copied-up /etc are gone again
    r = sh(tmp_path, [busybox_rootfs], "echo x > /etc/mine; echo 1.2.3.4 h >> /etc/hosts")
    assert tree(r.upper) == ["etc", "etc/mine"]
    upper_etc, lower_etc = os.stat(r.upper / "etc"), os.stat(busybox_rootfs / "etc")
    assert (upper_etc.st_mode, upper_etc.st_uid) == (lower_etc.st_mode, lower_etc.st_uid)


def test_symlinked_mount_points(tmp_path: Path, busybox_rootfs: Path) -> None:
    """Mount points are looked up inside the root: symlinks followed, never out of it."""
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    os.symlink("../run/systemd/resolv.conf", layer / "etc/resolv.conf")  # dangling, as in many images
    os.symlink("/../../../../../escape", layer / "out")
    r = sh(tmp_path, [layer, busybox_rootfs], "cat /run/systemd/resolv.conf >/dev/null && ls /escape",
           mounts=[Mount("tmpfs", "/out/tmp")])
    assert (r.code, r.out) == (0, "tmp\n"), r.err
    assert tree(r.upper) == []
    assert not Path("/escape").exists()


def test_whiteout_under_a_mount_point_kept(tmp_path: Path, busybox_rootfs: Path) -> None:
    """An upper dir that already hides a lower /etc/hosts keeps its whiteout."""
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc/hosts").write_text("from the image\n")
    upper, work = tmp_path / "upper", tmp_path / "work"
    (upper / "etc").mkdir(parents=True)
    work.mkdir()
    os.mknod(upper / "etc/hosts", stat.S_IFCHR, 0)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        spec = SandboxSpec([layer, busybox_rootfs], upper, work, ["/bin/cat", "/etc/hosts"], stdout=f.fileno())
        assert run(spec) == 0
    assert "localhost" in out.read_text()
    st = os.lstat(upper / "etc/hosts")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_scratch_leaves_nothing(tmp_path: Path, busybox_rootfs: Path) -> None:
    """No lower dir at all: /proc, /dev, /sys, /etc and the mount target all get removed."""
    bb = Mount("bind", "/bb", busybox_rootfs / "bin", readonly=True)
    r = sh(tmp_path, [], "", argv=["/bb/sh", "-c", "cat /etc/hostname; echo hi > /out; /bb/ls /"], mounts=[bb])
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["pybuild", "bb", "dev", "etc", "out", "proc", "sys"]
    assert tree(r.upper) == ["out"]
    r = sh(tmp_path, [], "", argv=["/bin/true"])
    assert r.code == 127 and 'exec "/bin/true": no such file or directory' in r.err
    assert tree(r.upper) == []


def test_namespaces(tmp_path: Path, busybox_rootfs: Path) -> None:
    r = sh(tmp_path, [busybox_rootfs], "echo $$; hostname; ls /proc | grep -c '^[0-9]'; ls /sys/class/net")
    pid, host, nproc, *links = r.out.split()
    assert (pid, host) == ("2", "pybuild")  # pid 1 is the reaper
    assert int(nproc) <= 4
    assert sorted(links) == sorted(os.listdir("/sys/class/net"))  # host network by default
    r = sh(tmp_path, [busybox_rootfs], "ls /sys/class/net; cat /sys/class/net/lo/flags", network="none")
    name, flags = r.out.split()
    assert name == "lo" and int(flags, 16) & 1  # only lo, and it is up
    with pytest.raises(PybuildError, match="network mode 'bridge' not supported"):
        sh(tmp_path, [busybox_rootfs], "true", network="bridge")


def test_orphans_are_reaped(tmp_path: Path, busybox_rootfs: Path) -> None:
    """Pid 1 reaps what the command orphans: no zombie piles up while it runs."""
    r = sh(tmp_path, [busybox_rootfs], "(sleep 0.05 &); sleep 0.15; cat /proc/[0-9]*/stat | awk '$3 == \"Z\"' | wc -l; "
           "cat /proc/1/comm")
    assert r.out.split() == ["0", "pybuild-init"], r.err


@pytest.mark.parametrize(
    ("user", "want"),
    [
        ("", "0 0 0 /root"),
        ("app", "1000 1000 1000 50 /home/app"),
        ("app:staff", "1000 50 50 /home/app"),
        ("nobody", "65534 65534 65534 /nonexistent"),
        ("1234:50", "1234 50 50 /"),
    ],
)
def test_user(tmp_path: Path, busybox_rootfs: Path, user: str, want: str) -> None:
    r = sh(tmp_path, [busybox_rootfs], 'echo $(id -u) $(id -g) $(id -G) "$HOME"', user=user)
    assert (r.code, r.out.strip()) == (0, want), r.err


def test_unknown_user(tmp_path: Path, busybox_rootfs: Path) -> None:
    base = tmp_path / "x"
    with pytest.raises(PybuildError) as info:
        sh(tmp_path, [busybox_rootfs], "true", user="foo")
    assert str(info.value) == "unable to find user foo: no matching entries in passwd file"
    assert not base.exists() and tree(tmp_path / "run0/upper") == []


def test_process_setup(tmp_path: Path, busybox_rootfs: Path) -> None:
    r = sh(tmp_path, [busybox_rootfs], "pwd; umask; echo $PATH; echo $FOO; cat", cwd="/work/a/b",
           env={"FOO": "bar"}, user="app")
    default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert r.out.split("\n") == ["/work/a/b", "0022", default_path, "bar", ""]  # stdin is /dev/null
    st = os.stat(r.upper / "work/a")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    stdin = tmp_path / "in"
    stdin.write_text("fed\n")
    with open(stdin, "rb") as f:
        assert sh(tmp_path, [busybox_rootfs], "cat", stdin=f.fileno()).out == "fed\n"
    r = sh(tmp_path, [busybox_rootfs], "", argv=["nosuch", "x"])
    assert r.code == 127 and r.err == 'pybuild: exec "nosuch": executable file not found in $PATH\n'
    r = sh(tmp_path, [busybox_rootfs], "", argv=["/etc/passwd"])
    assert r.code == 126 and "permission denied" in r.err


def test_dev(tmp_path: Path, busybox_rootfs: Path) -> None:
    script = "stat -c '%F %t,%T %a' /dev/null; echo x > /dev/null; head -c 4 /dev/urandom | wc -c; " \
             "touch /dev/shm/f && readlink /dev/ptmx && test -d /dev/pts && touch /sys/x"
    r = sh(tmp_path, [busybox_rootfs], script, user="app")
    assert r.out.split("\n")[:3] == ["character special file 1,3 666", "4", "pts/ptmx"]
    assert r.code == 1 and "Read-only file system" in r.err  # /sys


def test_many_long_lowers(tmp_path: Path, busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """128 layers with ~200-character paths: far past mount(2)'s one page of options."""
    deep = tmp_path / ("d" * 100)
    layers = []
    for i in range(128):
        layer = deep / f"layer-{i:03d}-{'x' * 90}"
        (layer / "layers").mkdir(parents=True)
        (layer / "layers" / str(i)).touch()
        (layer / "top").write_text(f"{i}\n")
        layers.append(layer)
    lowers = layers + [busybox_rootfs]
    assert len(":".join(map(str, lowers))) > 4096
    for new_api in (True, False):
        monkeypatch.setattr(sandbox, "_new_mount_api", new_api)
        try:
            r = sh(tmp_path, lowers, "cat /top; ls /layers | wc -l")
        except PybuildError as exc:
            if new_api and "lowerdir+" in str(exc):
                continue  # kernel before 6.8
            raise
        assert (r.code, r.out.split()) == (0, ["0", "128"]), (new_api, r.err)


def _sleepers() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00100\x00":
                found.append(int(pid))
        except OSError:
            pass
    return found


def _our_mounts(tmp_path: Path) -> list[str]:
    """Host mounts a run could leak (others' mounts come and go on a shared machine)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if "pybuild-sandbox-" in line or str(tmp_path) in line]


def test_nothing_left_behind(tmp_path: Path, busybox_rootfs: Path) -> None:
    mounts = _our_mounts(tmp_path)
    start = time.monotonic()
    r = sh(tmp_path, [busybox_rootfs], 'sleep 100 & until [ "$(cat /proc/$!/comm)" = sleep ]; do :; done; echo started')
    assert (r.code, r.out) == (0, "started\n")
    assert time.monotonic() - start < 5
    assert _sleepers() == []
    assert _our_mounts(tmp_path) == mounts


def _in_own_interpreter(request: pytest.FixtureRequest) -> bool:
    """Run this test again in a fresh interpreter and report its result there.

    Interrupting os.fork at random points can leave interpreter-wide locks (logging's
    at-fork lock) held; pybuild exits on ^C, but a test process goes on, so these
    tests get a process of their own.
    """
    if os.environ.get("PYBUILD_TEST_OWN_INTERPRETER"):
        return False
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::{request.node.name}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYBUILD_TEST_OWN_INTERPRETER": "1"}, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return True


def test_interrupted(tmp_path: Path, busybox_rootfs: Path, request: pytest.FixtureRequest) -> None:
    """^C in the caller while the command runs: the namespace dies, stubs are removed."""
    if _in_own_interpreter(request):
        return
    mounts = _our_mounts(tmp_path)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            sh(tmp_path, [busybox_rootfs], "sleep 100 & sleep 100")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _sleepers() == []
    assert _our_mounts(tmp_path) == mounts
    assert tree(tmp_path / "run0/upper") == []


@pytest.mark.parametrize("delay", [0.001, 0.003, 0.006, 0.01, 0.02])
def test_interrupted_during_setup(tmp_path: Path, busybox_rootfs: Path, delay: float,
                                  request: pytest.FixtureRequest) -> None:
    """^C at any point of the setup still leaves an upper dir without stubs.

    (The interrupt may also come only once the run is over.)
    """
    if _in_own_interpreter(request):
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    bb = Mount("bind", "/bb", busybox_rootfs / "bin", readonly=True)
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        try:
            assert sh(tmp_path, [], "", argv=["/bb/sleep", "0.05"], mounts=[bb]).code == 0
        except KeyboardInterrupt:
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert tree(tmp_path / "run0/upper") == []
    # no lock of the at-fork hooks was left held: a run from another thread still works
    other = threading.Thread(target=sh, args=(tmp_path, [busybox_rootfs], "true"), daemon=True)
    other.start()
    other.join(10)
    assert not other.is_alive()


def test_mounts(tmp_path: Path, busybox_rootfs: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "old").write_text("old\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    single = tmp_path / "single"
    single.write_text("single\n")
    mounts = [
        Mount("bind", "/var/cache/x", cache),
        Mount("bind", "/src", ro, readonly=True),
        Mount("bind", "/etc/single.conf", single),
        Mount("tmpfs", "/scratch"),
        Mount("tmpfs", "/var/cache/x/tmp"),  # nested in the bind: made inside it
    ]
    script = "cat /var/cache/x/old /etc/single.conf; echo new > /var/cache/x/new; echo t > /scratch/t; " \
             "echo t > /var/cache/x/tmp/t; touch /src/f 2>/dev/null || echo ro"
    r = sh(tmp_path, [busybox_rootfs], script, mounts=mounts)
    assert (r.code, r.out) == (0, "old\nsingle\nro\n"), r.err
    assert (cache / "new").read_text() == "new\n"
    assert sorted(os.listdir(cache / "tmp")) == []  # the tmpfs was over it
    assert os.listdir(ro) == []
    assert tree(r.upper) == []  # every mount point was removed again


def test_read_only_root(tmp_path: Path, busybox_rootfs: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as f:
        code = run(SandboxSpec([busybox_rootfs], None, None, ["/bin/sh", "-c", "cat /etc/group; touch /x"],
                               stdout=f.fileno(), stderr=f.fileno()))
    assert code == 1
    assert out.read_text().startswith("root:x:0:") and "Read-only file system" in out.read_text()


def test_from_a_thread(tmp_path: Path, busybox_rootfs: Path) -> None:
    results: list[Result] = []
    def one(i: int) -> None:
        (tmp_path / str(i)).mkdir()
        results.append(sh(tmp_path / str(i), [busybox_rootfs], "echo $$"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a sandbox run from a thread hung"
    assert [r.out for r in results] == ["2\n"] * 3


def test_startup_cost(tmp_path: Path, busybox_rootfs: Path) -> None:
    """A `true` costs milliseconds, not a runtime's hundreds (generous bound for slow CI)."""
    times = []
    for i in range(5):
        (tmp_path / f"u{i}").mkdir()
        (tmp_path / f"w{i}").mkdir()
        start = time.perf_counter()
        assert run(SandboxSpec([busybox_rootfs], tmp_path / f"u{i}", tmp_path / f"w{i}", ["true"])) == 0
        times.append(time.perf_counter() - start)
    assert sorted(times)[2] < 0.25


def test_caller_killed(tmp_path: Path, busybox_rootfs: Path) -> None:
    """SIGTERM kills a caller that does not handle it: PDEATHSIG takes the container along."""
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    code = (f"from builder.sandbox import *; from pathlib import Path; "
            f"run(SandboxSpec([Path({str(busybox_rootfs)!r})], Path({str(tmp_path / 'u')!r}), "
            f"Path({str(tmp_path / 'w')!r}), ['/bin/sh', '-c', 'sleep 100 & echo up; sleep 100']))")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 5
        while len(_sleepers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_sleepers()) == 2
        proc.terminate()
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while _sleepers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _sleepers() == []


def test_no_fd_held_for_others(tmp_path: Path, busybox_rootfs: Path) -> None:
    """A run must not keep another thread's pipe open (its reader would wait for our end)."""
    r, w = os.pipe()
    worker = threading.Thread(target=sh, args=(tmp_path, [busybox_rootfs], "sleep 0.5"))
    worker.start()
    time.sleep(0.2)  # the run's processes exist now, forked while w was open
    os.close(w)
    start = time.monotonic()
    ready = __import__("select").select([r], [], [], 2)[0]
    assert ready and os.read(r, 1) == b"" and time.monotonic() - start < 0.2
    os.close(r)
    worker.join()
