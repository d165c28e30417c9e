"""The local image store on real files: blobs, layers, images, tags, crashes and concurrent writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from builder.image import (
    ContainerConfig, Healthcheck, HistoryEntry, ImageConfig, parse_config, parse_reference, serialize_config,
    sha256_digest,
)
from builder.store import Store, default_root
from grammar.errors import PybuildError

ROOT = Path(__file__).resolve().parent.parent
FIXED_TIME = 1_600_000_000


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def fill(upper: Path, files: dict[str, str]) -> Path:
    """Write files with a fixed mtime so equal content gives an equal layer tar."""
    for name, text in files.items():
        p = upper / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for p in sorted(upper.rglob("*"), reverse=True):
        os.utime(p, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    os.utime(upper, (FIXED_TIME, FIXED_TIME))
    return upper


def new_layer(store: Store, files: dict[str, str]):
    upper, _work = store.make_work_dir()
    return store.commit_layer_dir(fill(upper, files))


def config_for(*diff_ids: str, cmd: list[str] | None = None) -> ImageConfig:
    return ImageConfig(architecture="amd64", os="linux", created="2020-09-13T12:26:40Z",
                       config=ContainerConfig(cmd=cmd), diff_ids=list(diff_ids),
                       history=[HistoryEntry(created_by=f"layer {i}") for i in range(len(diff_ids))])


def run_child(code: str, store_root: Path, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(store_root), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def assert_consistent(root: Path) -> Store:
    """Every name resolves, every blob matches its digest, every image's layers are there."""
    s = Store.open(root)
    json.loads((root / "index.json").read_bytes())
    for blob in (root / "blobs/sha256").iterdir():
        assert s.verify_blob("sha256:" + blob.name), blob
    for image in s.images():
        assert s.verify_blob(image.manifest_digest) and s.verify_blob(image.id)
        for path, diff_id in zip(s.layer_dirs(image), image.diff_ids):
            assert path.is_dir() and s.verify_blob(diff_id)
    for layer in (root / "layers").iterdir():
        assert s.has_blob("sha256:" + layer.name), f"layer dir {layer.name} without its blob"
    return s


# --------------------------------------------------------------------------- image metadata

def test_reference_normalisation() -> None:
    assert str(parse_reference("busybox")) == "docker.io/library/busybox:latest"
    assert str(parse_reference("app:1.0")) == "docker.io/library/app:1.0"
    assert str(parse_reference("localhost:5000/x")) == "localhost:5000/x:latest"
    ref = parse_reference("x@sha256:" + "a" * 64)
    assert (ref.repository, ref.tag, ref.digest) == ("library/x", None, "sha256:" + "a" * 64)
    assert parse_reference("docker.io/library/busybox:1").familiar == "busybox:1"
    for bad, why in (("Upper", "lowercase"), ("a//b", "expected"), ("x@sha256:abc", "expected"),
                     ("f" * 64, "image id"), ("", "empty")):
        with pytest.raises(PybuildError, match=why):
            parse_reference(bad)


def test_config_serialisation_is_canonical() -> None:
    cfg = config_for("sha256:" + "1" * 64, cmd=["sh"])
    cfg.config.healthcheck = Healthcheck(["CMD-SHELL", "true"], interval=30_000_000_000, retries=3)
    cfg.config.shell = ["/bin/sh", "-c"]
    cfg.config.on_build = ["RUN true"]
    cfg.config.exposed_ports = ["80/tcp"]
    data = serialize_config(cfg)
    assert serialize_config(parse_config(data)) == data
    obj = json.loads(data)
    assert obj["config"]["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 30_000_000_000, "Retries": 3}
    assert obj["config"]["Shell"] == ["/bin/sh", "-c"] and obj["config"]["OnBuild"] == ["RUN true"]
    assert obj["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert obj["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}


def test_default_root() -> None:
    if os.geteuid() == 0:
        assert default_root() == Path("/var/lib/pybuild")
    else:
        assert default_root().name == "pybuild"


# --------------------------------------------------------------------------- blobs

def test_blob_round_trip_and_verify(store: Store) -> None:
    digest = store.put_blob(b"hello")
    assert digest == sha256_digest(b"hello")
    assert store.has_blob(digest) and store.read_blob(digest) == b"hello" and store.verify_blob(digest)
    with store.blob_writer() as w:
        for _ in range(3):
            w.write(b"x" * 100_000)
    assert w.digest == sha256_digest(b"x" * 300_000) and store.blob_size(w.digest) == 300_000

    wrong = sha256_digest(b"other")
    with pytest.raises(PybuildError, match="does not match"):
        store.put_blob(b"hello!", expected=wrong)
    assert not store.has_blob(wrong) and not store.has_blob(sha256_digest(b"hello!"))

    store.blob_path(digest).write_bytes(b"HELLO")  # damage on disk is detected, not served
    assert not store.verify_blob(digest)
    with pytest.raises(PybuildError, match="corrupt"):
        store.read_blob(digest)
    with pytest.raises(PybuildError, match="invalid digest"):
        store.has_blob("sha256:../../etc/passwd")


# --------------------------------------------------------------------------- layers

def test_commit_layer_dir_then_layer_path(store: Store) -> None:
    upper, work = store.make_work_dir()
    assert upper.parent == work.parent and store.root in upper.parents
    fill(upper, {"etc/hello": "hi\n", "bin/tool": "#!/bin/sh\n"})
    layer = store.commit_layer_dir(upper)
    assert not upper.exists(), "the upper dir is moved into layers/"
    assert store.layer_path(layer.diff_id) == layer.path == store.root / "layers" / layer.diff_id[7:]
    assert (layer.path / "etc/hello").read_text() == "hi\n"
    assert store.verify_blob(layer.diff_id) and layer.size == store.blob_size(layer.diff_id)
    assert store.get_layer(layer.diff_id) == layer
    assert store.layer_path("sha256:" + "0" * 64) is None


def test_same_layer_twice_is_stored_once(store: Store) -> None:
    a = new_layer(store, {"f": "same"})
    b = new_layer(store, {"f": "same"})
    c = new_layer(store, {"f": "different"})
    assert a == b and a.diff_id != c.diff_id
    assert sorted(p.name for p in (store.root / "layers").iterdir()) == sorted([a.diff_id[7:], c.diff_id[7:]])
    assert [p.name for p in (store.root / "tmp").iterdir()] == [store._tmp.name]


def test_add_layer_tar_checks_diff_id(store: Store, tmp_path: Path) -> None:
    layer = new_layer(store, {"a": "1"})
    fresh = Store.open(tmp_path / "other")
    with store.open_blob(layer.diff_id) as f:
        assert fresh.add_layer_tar(f, diff_id=layer.diff_id) == fresh.get_layer(layer.diff_id)
    with store.open_blob(layer.diff_id) as f, pytest.raises(PybuildError, match="does not match"):
        fresh.add_layer_tar(f, diff_id="sha256:" + "e" * 64)
    assert not (fresh.root / "layers" / ("e" * 64)).exists() and not fresh.has_blob("sha256:" + "e" * 64)
    fresh.close()


# --------------------------------------------------------------------------- images and tags

def test_put_image_and_get_image(store: Store) -> None:
    layer = new_layer(store, {"a": "1"})
    image = store.put_image(config_for(layer.diff_id, cmd=["sh"]))
    assert image.id == sha256_digest(store.read_blob(image.id)) and image.names == ()
    assert store.put_image(config_for(layer.diff_id, cmd=["sh"])).id == image.id, "same config, same id"
    assert [i.id for i in store.images()] == [image.id]

    assert store.tag(image, "app:1.0") == "docker.io/library/app:1.0"
    for ref in ("app:1.0", "docker.io/library/app:1.0", image.id, image.id[7:], image.short_id,
                "sha256:" + image.short_id, image.manifest_digest, "app@" + image.manifest_digest):
        assert store.get_image(ref).id == image.id, ref
    assert store.get_image("app:1.0").names == ("docker.io/library/app:1.0",)
    assert store.layer_dirs(image) == [layer.path]
    with pytest.raises(PybuildError, match="image not found: app:2.0 .*pybuild images"):
        store.get_image("app:2.0")
    with pytest.raises(PybuildError, match="image not found"):
        store.get_image("0123456789ab")
    with pytest.raises(PybuildError, match="lowercase"):
        store.tag(image, "App")
    with pytest.raises(PybuildError, match="not in the store"):
        store.put_image(config_for("sha256:" + "9" * 64))


def test_tags_move_untag_and_remove(store: Store) -> None:
    base = new_layer(store, {"base": "1"})
    top = new_layer(store, {"top": "2"})
    one = store.put_image(config_for(base.diff_id))
    two = store.put_image(config_for(base.diff_id, top.diff_id))
    store.tag(one, "app")
    store.tag(two, "app")  # the tag moves; the old image stays, untagged (docker's <none>)
    assert store.get_image("app").id == two.id
    assert {i.id: i.names for i in store.images()} == {one.id: (), two.id: ("docker.io/library/app:latest",)}

    store.tag(two, "other:1")
    removal = store.remove_image("app")  # two names: only that name goes
    assert removal.untagged == ["docker.io/library/app:latest"] and removal.deleted == []
    with pytest.raises(PybuildError, match="image not found"):
        store.untag("app")
    store.tag(two, "app")
    with pytest.raises(PybuildError, match="several names"):
        store.remove_image(two.short_id)

    kept_by_cache = {top.diff_id}
    store.keep.append(lambda: kept_by_cache)
    removal = store.remove_image(two.short_id, force=True)
    assert sorted(removal.untagged) == ["docker.io/library/app:latest", "docker.io/library/other:1"]
    assert two.id in removal.deleted and two.manifest_digest in removal.deleted
    assert base.diff_id not in removal.deleted, "image one still uses the base layer"
    assert store.layer_path(base.diff_id) and store.layer_path(top.diff_id), "the keep hook protects top"
    assert [i.id for i in store.images()] == [one.id]

    store.keep.clear()
    removal = store.remove_image(one.id)
    assert base.diff_id in removal.deleted and store.layer_path(base.diff_id) is None
    assert top.diff_id in store.gc() and store.layer_path(top.diff_id) is None
    assert store.images() == [] and list((store.root / "blobs/sha256").iterdir()) == []


def test_no_deletion_while_another_process_has_the_store(store: Store) -> None:
    layer = new_layer(store, {"x": "1"})
    image = store.put_image(config_for(layer.diff_id))
    other = Store.open(store.root)  # stands for a running build elsewhere
    try:
        removal = store.remove_image(image.id)
        assert removal.deleted == [] and store.layer_path(layer.diff_id) is not None
        assert store.images() == []
    finally:
        other.close()
    assert layer.diff_id in store.gc()


def test_missing_layer_dir_is_restored_from_its_blob(store: Store) -> None:
    layer = new_layer(store, {"etc/x": "1"})
    image = store.put_image(config_for(layer.diff_id))
    os.rename(layer.path, store.temp_dir("gone") / "x")
    assert (store.layer_dirs(image)[0] / "etc/x").read_text() == "1"


# --------------------------------------------------------------------------- crashes

SLOW_BLOB = """
import sys, time
from pathlib import Path
from builder.store import Store
s = Store.open(Path(sys.argv[1]))
with s.blob_writer() as w:
    w.write(b"a" * 65536)
    w.flush()
    print("writing", flush=True)
    time.sleep(60)
"""

TAG_LOOP = """
import sys
from pathlib import Path
from builder.image import ImageConfig
from builder.store import Store
s = Store.open(Path(sys.argv[1]))
print("ready", flush=True)
i = 0
while True:
    image = s.put_image(ImageConfig(architecture="amd64", created=str(i)))
    s.tag(image, f"t{i % 7}")
    i += 1
"""


def test_killed_blob_write_leaves_no_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    child = run_child(SLOW_BLOB, root)
    assert child.stdout.readline() == b"writing\n", child.stderr.read()
    staging = list((root / "tmp").iterdir())
    assert len(staging) == 1 and any(p.name.startswith("blob-") for p in staging[0].iterdir())
    survivor = Store.open(root)  # owner alive: its staging dir must stay
    assert staging[0].exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    survivor.close()
    s = assert_consistent(root)
    assert list((root / "blobs/sha256").iterdir()) == []
    assert [p.name for p in (root / "tmp").iterdir()] == [s._tmp.name], "stale staging dir removed"
    s.close()


def test_killed_while_tagging_leaves_a_valid_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root).close()
    for delay in (0.05, 0.15, 0.3):
        child = run_child(TAG_LOOP, root)
        assert child.stdout.readline() == b"ready\n", child.stderr.read()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert_consistent(root).close()
    s = Store.open(root)
    assert len(list((root / "tmp").iterdir())) == 1
    assert 1 <= len([i for i in s.images() if i.names]) <= 7
    s.close()


# --------------------------------------------------------------------------- concurrency

WORKER = """
import os, sys
from pathlib import Path
from builder.image import ImageConfig
from builder.store import Store
s = Store.open(Path(sys.argv[1]))
me = sys.argv[2]
for i in range(50):
    upper, _ = s.make_work_dir()
    (upper / "shared.txt").write_text(str(i % 10))          # both workers race on the same 10 layers
    os.utime(upper / "shared.txt", (1, 1)); os.utime(upper, (1, 1))
    layer = s.commit_layer_dir(upper)
    image = s.put_image(ImageConfig(architecture="amd64", created=f"{me}-{i}", diff_ids=[layer.diff_id]))
    s.tag(image, f"w{me}:{i}")
    s.tag(image, "shared")
s.close()
print("done", flush=True)
"""


def test_two_processes_writing_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root).close()
    workers = [run_child(WORKER, root, str(n)) for n in (1, 2)]
    for w in workers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0 and out == b"done\n", err.decode()
    s = assert_consistent(root)
    names = {n for i in s.images() for n in i.names}
    assert names == {f"docker.io/library/w{n}:{i}" for n in (1, 2) for i in range(50)} | {
        "docker.io/library/shared:latest"}
    assert len(s.images()) == 100 and len(list((root / "layers").iterdir())) == 10
    for n in (1, 2):
        for i in (0, 17, 49):
            assert s.get_image(f"w{n}:{i}").config.created == f"{n}-{i}"
    assert [p.name for p in (root / "tmp").iterdir()] == [s._tmp.name]
    s.close()
