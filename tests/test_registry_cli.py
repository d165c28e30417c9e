"""The registry commands as users run them: build --push, FROM auto-pull, --pull, login, outputs, interop."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import uuid

import pytest

from conftest import pybuild
from test_build import build, docker_available, inspect, run

pytest_plugins = ("registry_fixtures",)




def repo(registry, name: str = "app") -> str:
    return f"{registry.host}/{name}-{uuid.uuid4().hex[:6]}"


def test_build_push_then_from_pulls_into_an_empty_store(store, tmp_path, plain_registry):
    ref = f"{repo(plain_registry)}:1"
    build(store, tmp_path / "a", "FROM busybox\nRUN echo pushed > /msg\nCMD [\"cat\", \"/msg\"]\n",
          "-t", ref, "--push", "--compression", "zstd")
    fresh = tmp_path / "fresh"
    out = build(fresh, tmp_path / "b", f"FROM {ref}\nRUN echo more >> /msg\n", "-t", "child:1")
    assert f"pulling {ref}" in out.stderr.decode()
    assert run(fresh, "child:1") == "pushed\nmore\n"
    again = tmp_path / "again"
    assert pybuild("pull", "-q", ref, store=again).stdout.decode().strip() == inspect(fresh, ref)["Id"]


def test_pull_flag_notices_a_moved_base(store, tmp_path, plain_registry, busybox_tar):
    base = f"{repo(plain_registry, 'base')}:latest"
    pybuild("tag", "busybox:latest", base, store=store)
    pybuild("push", "-q", base, store=store)
    user = tmp_path / "user-store"
    ctx = tmp_path / "ctx"
    build(user, ctx, f"FROM {base}\nRUN echo x > /x\n", "-t", "u:1")
    pybuild("import", "--change", "ENV MOVED=1", str(busybox_tar), base, store=store)
    pybuild("push", "-q", base, store=store)
    stale = build(user, ctx, f"FROM {base}\nRUN echo x > /x\n", "-t", "u:1")
    assert "CACHED" in stale.stderr.decode()  # without --pull the local base is used
    moved = build(user, ctx, f"FROM {base}\nRUN echo x > /x\n", "-t", "u:1", "--pull", "--explain").stderr.decode()
    assert "the base image moved" in moved
    assert "MOVED=1" in inspect(user, "u:1")["config"]["Env"]


def test_login_logout_and_wrong_password(store, tmp_path, basic_registry, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    host = basic_registry.host
    bad = subprocess.run(["pybuild", "login", host, "-u", "alice", "--password-stdin"], input=b"nope\n",
                         capture_output=True, env={**os.environ, "PYBUILD_ROOT": str(store)})
    assert bad.returncode == 1 and b"refused the credentials for alice" in bad.stderr
    ok = pybuild("login", host, "-u", "alice", "-p", "wonderland", store=store)
    assert b"Login Succeeded" in ok.stdout
    ref = f"{host}/private-{uuid.uuid4().hex[:6]}:1"
    pybuild("tag", "busybox:latest", ref, store=store)
    pybuild("push", "-q", ref, store=store)
    assert b"Removing login credentials" in pybuild("logout", host, store=store).stdout
    denied = pybuild("pull", ref, store=tmp_path / "s2", check=False)
    assert denied.returncode == 1 and b"pybuild login" in denied.stderr and b"Traceback" not in denied.stderr


def test_outputs_oci_docker_tar_local(store, tmp_path):
    ctx = tmp_path / "ctx"
    out = tmp_path / "out"
    out.mkdir()
    build(store, ctx, "FROM busybox\nRUN echo out > /out.txt\n", "-t", "outs:1",
          "--output", f"type=oci,dest={out}/oci.tar", "--output", f"type=docker,dest={out}/docker.tar",
          "--output", f"type=tar,dest={out}/rootfs.tar", "--output", f"type=local,dest={out}/rootfs")
    assert (out / "rootfs" / "out.txt").read_text() == "out\n"
    with tarfile.open(out / "rootfs.tar") as tar:
        assert "out.txt" in {m.name.lstrip("./") for m in tar.getmembers()}
    skopeo = shutil.which("skopeo")
    if skopeo:
        subprocess.run([skopeo, "inspect", f"oci-archive:{out}/oci.tar"], check=True, capture_output=True)
    umoci = shutil.which("umoci")
    if umoci:
        layout = tmp_path / "layout"
        layout.mkdir()
        with tarfile.open(out / "oci.tar") as tar:
            tar.extractall(layout, filter="data")
        refs = subprocess.run([umoci, "ls", "--layout", str(layout)], check=True, capture_output=True,
                              text=True).stdout.split()
        subprocess.run([umoci, "unpack", "--image", f"{layout}:{refs[0]}", str(tmp_path / "bundle")], check=True,
                       capture_output=True)
        assert (tmp_path / "bundle" / "rootfs" / "out.txt").read_text() == "out\n"
    fresh = tmp_path / "fresh"
    pybuild("load", "-i", str(out / "docker.tar"), store=fresh)
    assert run(fresh, "outs:1", "cat", "/out.txt") == "out\n"
    bad = pybuild("build", "--output", "type=zip,dest=x", str(ctx), store=store, check=False)
    assert bad.returncode == 1 and b"type must be one of" in bad.stderr


def test_docker_pulls_and_runs_what_pybuild_pushed(store, tmp_path, plain_registry):
    if not docker_available():
        pytest.skip("no Docker engine answers (CI starts dockerd via .ci/dockerd-up)")
    ref = f"{repo(plain_registry, 'docker')}:1"
    build(store, tmp_path, "FROM busybox\nRUN echo via-registry > /m\nCMD [\"cat\", \"/m\"]\n", "-t", ref, "--push")
    try:
        subprocess.run(["docker", "pull", ref], check=True, capture_output=True, timeout=120)
        out = subprocess.run(["docker", "run", "--rm", "--network", "none", ref], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "via-registry\n"
    finally:
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
