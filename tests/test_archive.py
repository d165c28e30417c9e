"""Image interchange with real tools: import a busybox rootfs, save/load docker and OCI archives,
read them with skopeo and umoci, and load and run them in Docker when a daemon is reachable."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import zstandard

from builder.archive import import_rootfs, load_archive, save_docker_archive, save_oci_archive
from builder.image import Healthcheck, ImageConfig
from builder.store import Store
from grammar.errors import PybuildError


def _tweak(cfg: ImageConfig) -> None:
    cfg.config.cmd = ["/bin/sh"]
    cfg.config.env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    cfg.config.shell = ["/bin/sh", "-c"]
    cfg.config.on_build = ["RUN echo child"]
    cfg.config.healthcheck = Healthcheck(["CMD-SHELL", "true"], interval=30_000_000_000, retries=2)
    cfg.config.labels = {"org.example": "yes"}


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def imported(store: Store, busybox_tar: Path):
    with open(busybox_tar, "rb") as f:
        return import_rootfs(store, f, "pybuild-test/busybox:1", source=busybox_tar.name, tweak=_tweak)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_import_rootfs(store: Store, imported, busybox_tar: Path) -> None:
    assert imported.names == ("docker.io/pybuild-test/busybox:1",)
    cfg = imported.config
    assert len(cfg.diff_ids) == 1 and cfg.config.cmd == ["/bin/sh"] and cfg.config.on_build == ["RUN echo child"]
    assert cfg.history[0].comment == f"Imported from {busybox_tar.name}" and not cfg.history[0].empty_layer
    (root,) = store.layer_dirs(imported)
    assert (root / "bin/busybox").is_file() and (root / "bin/sh").is_symlink()
    assert store.get_image("pybuild-test/busybox:1").id == imported.id


@pytest.mark.parametrize("compress", [lambda b: gzip.compress(b, mtime=0), lambda b: zstandard.compress(b)],
                         ids=["gzip", "zstd"])
def test_import_compressed_gives_the_same_layer(store: Store, imported, busybox_tar: Path, compress) -> None:
    packed = compress(busybox_tar.read_bytes())
    again = import_rootfs(store, io.BytesIO(packed), None, tweak=_tweak, created=imported.config.created,
                          source=busybox_tar.name)
    assert again.diff_ids == imported.diff_ids and again.id == imported.id


def _save(store: Store, fn, refs, path: Path) -> Path:
    with open(path, "wb") as f:
        fn(store, refs, f)
    return path


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_save_and_load_into_a_fresh_store(store: Store, imported, tmp_path: Path, fmt: str) -> None:
    saver = save_docker_archive if fmt == "docker" else save_oci_archive
    archive = _save(store, saver, ["pybuild-test/busybox:1"], tmp_path / f"{fmt}.tar")
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert "index.json" in names and "oci-layout" in names and ("manifest.json" in names) == (fmt == "docker")
    fresh = Store.open(tmp_path / "fresh")
    with open(archive, "rb") as f:
        assert load_archive(fresh, f) == ["docker.io/pybuild-test/busybox:1"]
    loaded = fresh.get_image("pybuild-test/busybox:1")
    assert loaded.id == imported.id and loaded.config == imported.config
    assert (fresh.layer_dirs(loaded)[0] / "bin/busybox").read_bytes() == \
        (store.layer_dirs(imported)[0] / "bin/busybox").read_bytes()
    # a second load finds everything present
    with open(archive, "rb") as f:
        assert load_archive(fresh, f) == ["docker.io/pybuild-test/busybox:1"]
    fresh.close()


def test_load_compressed_archive_from_a_pipe(store: Store, imported, tmp_path: Path) -> None:
    archive = _save(store, save_docker_archive, [imported.id], tmp_path / "img.tar")
    packed = tmp_path / "img.tar.gz"
    packed.write_bytes(gzip.compress(archive.read_bytes()))
    fresh = Store.open(tmp_path / "fresh")
    with subprocess.Popen(["cat", str(packed)], stdout=subprocess.PIPE) as cat:
        assert load_archive(fresh, cat.stdout) == [imported.id], "saved by id: no names"
    assert fresh.get_image(imported.id).names == ()
    fresh.close()


def test_load_rejects_a_tampered_layer(store: Store, imported, tmp_path: Path) -> None:
    archive = _save(store, save_docker_archive, ["pybuild-test/busybox:1"], tmp_path / "img.tar")
    layer_hex = imported.diff_ids[0][7:]
    bad = tmp_path / "bad.tar"
    with tarfile.open(archive) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith(layer_hex):
                data = data.replace(b"root:x:0:0", b"root::0:0:")  # same size, different bytes
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    fresh = Store.open(tmp_path / "fresh")
    with open(bad, "rb") as f, pytest.raises(PybuildError, match="does not match"):
        load_archive(fresh, f)
    assert fresh.images() == [] and list((fresh.root / "layers").iterdir()) == []
    with pytest.raises(PybuildError, match="not a tar archive|neither"):
        load_archive(fresh, io.BytesIO(b"not an archive at all" * 100))
    fresh.close()


def test_skopeo_reads_both_archives(store: Store, imported, tmp_path: Path) -> None:
    skopeo = _tool("skopeo")
    for fmt, saver in (("docker-archive", save_docker_archive), ("oci-archive", save_oci_archive)):
        archive = _save(store, saver, ["pybuild-test/busybox:1"], tmp_path / f"{fmt}.tar")
        out = subprocess.run([skopeo, "inspect", f"{fmt}:{archive}"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["Layers"] == imported.diff_ids and info["Labels"] == {"org.example": "yes"}
        cfg = subprocess.run([skopeo, "inspect", "--config", f"{fmt}:{archive}"], capture_output=True, text=True)
        assert cfg.returncode == 0 and json.loads(cfg.stdout)["rootfs"]["diff_ids"] == imported.diff_ids


def test_umoci_unpacks_the_oci_layout(store: Store, imported, tmp_path: Path) -> None:
    umoci = _tool("umoci")
    archive = _save(store, save_oci_archive, ["pybuild-test/busybox:1"], tmp_path / "oci.tar")
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(archive) as tf:
        tf.extractall(layout, filter="data")
    bundle = tmp_path / "bundle"
    out = subprocess.run([umoci, "unpack", "--image", f"{layout}:docker.io/pybuild-test/busybox:1", str(bundle)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (bundle / "rootfs/bin/busybox").is_file()
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == ["/bin/sh"]


def _docker_ready() -> str:
    docker = _tool("docker")
    try:
        ok = subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        pytest.skip("no Docker daemon reachable (`docker info` fails); start dockerd to run this check")
    return docker


def test_docker_loads_and_runs_our_archive(store: Store, imported, tmp_path: Path) -> None:
    docker = _docker_ready()
    name = f"pybuild-test/busybox:{uuid.uuid4().hex[:8]}"
    store.tag(imported, name)
    archive = _save(store, save_docker_archive, [name], tmp_path / "img.tar")
    try:
        out = subprocess.run([docker, "load", "-i", str(archive)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        inspect = json.loads(subprocess.run([docker, "image", "inspect", name], capture_output=True,
                                            check=True).stdout)[0]
        assert inspect["Id"] == imported.id
        cfg = inspect["Config"]
        assert cfg["Shell"] == ["/bin/sh", "-c"] and cfg["OnBuild"] == ["RUN echo child"]
        assert cfg["Healthcheck"]["Test"] == ["CMD-SHELL", "true"] and cfg["Healthcheck"]["Retries"] == 2
        run = subprocess.run([docker, "run", "--rm", "--network", "none", name, "/bin/busybox", "true"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr

        # and the other way: what docker save writes, we load, with the same image id
        saved = tmp_path / "from-docker.tar"
        subprocess.run([docker, "save", "-o", str(saved), name], check=True, capture_output=True)
        fresh = Store.open(tmp_path / "fresh")
        with open(saved, "rb") as f:
            assert load_archive(fresh, f) == [f"docker.io/{name}"]
        assert fresh.get_image(name).id == imported.id
        fresh.close()
    finally:
        subprocess.run([docker, "rmi", "-f", name], capture_output=True)
