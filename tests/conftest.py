"""Shared fixtures: a real busybox root filesystem made from Debian's busybox-static."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nstaff:x:50:app\n"


def make_busybox_rootfs(dest: Path) -> Path:
    """A minimal but real rootfs: static busybox, its applet links, passwd/group."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    for d in ("bin", "etc", "tmp", "root", "home/app", "usr/bin", "var", "proc", "sys", "dev"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        link = dest / "bin" / name
        if not link.exists():
            link.symlink_to("busybox")
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    os.chown(dest / "home/app", 1000, 1000) if os.geteuid() == 0 else None
    return dest


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs directory, made once per test session (treat as read-only)."""
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(scope="session")
def busybox_tar(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox rootfs as a tar, as `pybuild import` or `docker import` takes it."""
    out = tmp_path_factory.mktemp("busybox-tar") / "busybox.tar"
    subprocess.run(["tar", "-C", str(busybox_rootfs), "--numeric-owner", "-cf", str(out), "."], check=True)
    return out


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and overlay mounts")


def pybuild(*args: str, store: Path, cwd: Path | None = None, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a new process, the store in PYBUILD_ROOT."""
    import sys

    env = {**os.environ, "PYBUILD_ROOT": str(store), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, cwd=cwd, env=env,
                         input=input)
    if check and out.returncode != 0:
        raise AssertionError(f"pybuild {' '.join(args)} failed ({out.returncode}):\n"
                             f"{out.stdout.decode(errors='replace')}\n{out.stderr.decode(errors='replace')}")
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Path:
    """A store of the test module's own, holding busybox:latest."""
    needs_root()
    root = tmp_path_factory.mktemp("store")
    pybuild("import", str(busybox_tar), "busybox:latest", store=root)
    return root
