"""The registry client against real registries (Debian's docker-registry) started on 127.0.0.1.

Covers push/pull round trips (gzip, zstd, chunked, by digest, multi-platform index),
repeated pushes that upload nothing, cross-repository mounts, Basic (htpasswd) and
Bearer (token issuer) authentication, a proxy that drops, refuses, truncates and
corrupts, and skopeo reading what pybuild pushed. Config and credential handling
(config.json, credential helpers, login/logout) are tested without a server.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from builder import auth, registry
from builder.archive import import_rootfs
from builder.image import (
    MEDIA_OCI_INDEX, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, Descriptor, HistoryEntry, Index, Platform,
    host_platform, parse_manifest, parse_reference, serialize_index, sha256_digest,
)
from builder.store import Store
from builder.transfer import RetryPolicy
from grammar.errors import PybuildError

pytest.register_assert_rewrite("registry_fixtures")
pytest_plugins = ("registry_fixtures",)  # its fixtures: plain_registry, basic_registry, token_*, fault_proxy

from registry_fixtures import (  # noqa: E402  (after the rewrite hook)
    Fault, FaultProxy, RegistryServer, TokenIssuer, make_tls_cert, store_blobs_intact,
)

FAST = RetryPolicy(attempts=5, base_delay=0.05, max_delay=2.0)
OTHER_ARCH = "arm64" if host_platform().architecture != "arm64" else "amd64"


def _repo(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def _extra_layer() -> bytes:
    """A second layer: one file, so images have more than one layer to move in parallel."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"hello from the second layer\n"
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mode, info.mtime = len(data), 0o644, 1
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def source(tmp_path: Path, busybox_tar: Path):
    """A store with `src/app:1` (busybox + one small layer) and `src/app-other:1` (same layers, other arch)."""
    store = Store.open(tmp_path / "source")
    with open(busybox_tar, "rb") as f:
        base = import_rootfs(store, f, "src/busybox:1", created="2024-01-01T00:00:00Z")
    layer = store.add_layer_tar(io.BytesIO(_extra_layer()))
    cfg = base.config.copy()
    cfg.diff_ids.append(layer.diff_id)
    cfg.history.append(HistoryEntry(created="2024-01-01T00:00:01Z", created_by="COPY motd /etc/motd"))
    cfg.config.cmd = ["/bin/sh"]
    app = store.put_image(cfg)
    store.tag(app, "src/app:1")
    other = cfg.copy()
    other.architecture, other.variant = OTHER_ARCH, ("v8" if OTHER_ARCH == "arm64" else "")
    store.tag(store.put_image(other), "src/app-other:1")
    yield store
    store.close()


@pytest.fixture
def empty(tmp_path: Path):
    store = Store.open(tmp_path / "empty")
    yield store
    store.close()


def _manifest_of(ref: str) -> tuple[str, dict]:
    remote = registry.inspect_remote(ref)
    return remote.digest, json.loads(remote.raw)


def _assert_clean(store: Store) -> None:
    assert store_blobs_intact(store.root) == []
    for layer in (store.root / "layers").iterdir():
        assert store.has_blob("sha256:" + layer.name)


# --------------------------------------------------------------------------- no server

def test_endpoints_and_short_names() -> None:
    ref = parse_reference("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert registry.api_base(ref.registry) == "https://registry-1.docker.io"
    assert registry.api_base("localhost:5000") == "http://localhost:5000"
    assert registry.api_base("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert registry.api_base("[::1]:5000") == "http://[::1]:5000"
    assert registry.api_base("reg.example:5000") == "https://reg.example:5000"
    assert registry.api_base("reg.example:5000", ["reg.example:5000"]) == "http://reg.example:5000"
    assert registry.api_base("reg.example", ["reg.example"]) == "http://reg.example"
    assert registry.api_base("10.1.2.3:5000", ["10.0.0.0/8"]) == "http://10.1.2.3:5000"
    assert registry.api_base("11.1.2.3:5000", ["10.0.0.0/8"]) == "https://11.1.2.3:5000"
    assert [auth.registry_host(t) for t in ("https://index.docker.io/v1/", "docker.io", "Reg.Example:5000/",
                                            "http://127.0.0.1:5000")] == \
        ["docker.io", "docker.io", "reg.example:5000", "127.0.0.1:5000"]
    assert registry.parse_platform("linux/aarch64") == Platform("linux", "arm64")
    with pytest.raises(PybuildError, match="os/arch"):
        registry.parse_platform("amd64")


def test_select_platform() -> None:
    def d(n: int, p: Platform | None) -> Descriptor:
        return Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + f"{n:064x}", 1, {}, p)
    ix = Index([d(1, Platform("linux", "amd64")), d(2, Platform("linux", "arm64", "v8")),
                d(3, Platform("linux", "arm", "v7")), d(4, Platform("unknown", "unknown"))])
    pick = registry.select_platform
    assert pick(ix, Platform("linux", "amd64"), "x").digest.endswith("1")
    assert pick(ix, Platform("linux", "arm64"), "x").digest.endswith("2")
    assert pick(ix, Platform("linux", "arm64", "v8"), "x").digest.endswith("2")
    assert pick(ix, Platform("linux", "arm", "v7"), "x").digest.endswith("3")
    with pytest.raises(PybuildError, match=r"no image for platform linux/arm/v6; it has: linux/amd64, "
                                           r"linux/arm/v7, linux/arm64/v8"):
        pick(ix, Platform("linux", "arm", "v6"), "x")


def test_challenges() -> None:
    (c,) = auth.parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                                 'scope="repository:a/b:pull,push",error="insufficient_scope"')
    assert c.scheme == "bearer" and c.params == {"realm": "https://auth.example/token", "service": "reg",
                                                 "scope": "repository:a/b:pull,push", "error": "insufficient_scope"}
    both = auth.parse_challenges('Basic realm="x y", Bearer realm="http://t/token"')
    assert [c.scheme for c in both] == ["basic", "bearer"] and both[0].params["realm"] == "x y"


def _helper(bin_dir: Path, name: str, store_file: Path) -> None:
    """A docker-credential-NAME helper keeping credentials in a JSON file (get/store/erase)."""
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(f"""#!/usr/bin/env python3
import json, sys
path = {str(store_file)!r}
try:
    db = json.load(open(path))
except FileNotFoundError:
    db = {{}}
action = sys.argv[1]
data = sys.stdin.read()
if action == "get":
    entry = db.get(data.strip())
    if entry is None:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps({{"ServerURL": data.strip(), "Username": entry[0], "Secret": entry[1]}}))
elif action == "store":
    obj = json.loads(data); db[obj["ServerURL"]] = [obj["Username"], obj["Secret"]]
    json.dump(db, open(path, "w"))
elif action == "erase":
    if db.pop(data.strip(), None) is None:
        print("credentials not found in native keychain"); sys.exit(1)
    json.dump(db, open(path, "w"))
""")
    script.chmod(0o755)


def test_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.json"
    b64 = base64.b64encode(b"ann:s3:cret").decode()
    cfg.write_text(json.dumps({
        "auths": {"https://index.docker.io/v1/": {"auth": b64}, "reg.example:5000": {"username": "u", "password": "p"},
                  "https://other.example/v2/": {"auth": base64.b64encode(b"o:pw").decode()}},
        "credHelpers": {"helped.example": "fake"},
        "psFormat": "keep me"}))
    assert auth.get_credentials("docker.io", cfg) == auth.Credentials("ann", "s3:cret")
    assert auth.get_credentials("reg.example:5000", cfg) == auth.Credentials("u", "p")
    assert auth.get_credentials("other.example", cfg) == auth.Credentials("o", "pw")
    assert auth.get_credentials("nowhere.example", cfg) is None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _helper(bin_dir, "fake", tmp_path / "helper.json")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "helper.json").write_text(json.dumps({"helped.example": ["h", "hp"]}))
    assert auth.get_credentials("helped.example", cfg) == auth.Credentials("h", "hp")

    # login/logout keep other keys, write 0600, replace an old key spelling
    auth.login("other.example", "new", "pw2", cfg)
    obj = json.loads(cfg.read_text())
    assert obj["psFormat"] == "keep me" and "https://other.example/v2/" not in obj["auths"]
    assert base64.b64decode(obj["auths"]["other.example"]["auth"]) == b"new:pw2"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert auth.logout("other.example", cfg) and not auth.logout("other.example", cfg)
    assert auth.get_credentials("other.example", cfg) is None
    auth.login("helped.example", "h2", "hp2", cfg)  # goes to the helper, not the file
    assert "hp2" not in cfg.read_text() and auth.get_credentials("helped.example", cfg) == auth.Credentials("h2", "hp2")

    # credsStore for everything else; a broken file is a clear error
    store_cfg = tmp_path / "store.json"
    store_cfg.write_text(json.dumps({"credsStore": "fake"}))
    auth.login("docker.io", "hub", "hubpw", store_cfg)
    assert json.loads((tmp_path / "helper.json").read_text())["https://index.docker.io/v1/"] == ["hub", "hubpw"]
    assert auth.get_credentials("docker.io", store_cfg) == auth.Credentials("hub", "hubpw")
    cfg.write_text("{not json")
    with pytest.raises(PybuildError, match="not valid JSON"):
        auth.get_credentials("docker.io", cfg)
    fresh = tmp_path / "new" / "config.json"
    auth.login("127.0.0.1:5000", "x", "y", fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- plain registry

def test_push_pull_roundtrip_and_repeat(source: Store, empty: Store, fault_proxy: FaultProxy) -> None:
    ref = f"{fault_proxy.host}/{_repo()}:1"
    said: list[str] = []
    digest = registry.push(source, "src/app:1", ref, progress=said.append)
    app = source.get_image("src/app:1")
    remote_digest, manifest = _manifest_of(ref)
    assert remote_digest == digest
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"] == {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": app.id,
                                  "size": source.blob_size(app.id)}
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_OCI_LAYER_GZIP] * 2
    first_uploads = len(fault_proxy.uploads())
    assert first_uploads >= 6  # POST + PUT for two layers and the config

    fault_proxy.log.clear()
    said.clear()
    assert registry.push(source, "src/app:1", ref, progress=said.append) == digest
    assert fault_proxy.uploads() == [] and fault_proxy.mounts() == []
    assert not any("Compressing" in s for s in said), said  # the memo knew the compressed digests
    assert fault_proxy.count("HEAD") == 3 and fault_proxy.count("PUT", "/manifests/") == 1

    pulled = registry.pull(empty, ref)
    assert pulled.id == app.id and pulled.manifest_digest == app.manifest_digest
    assert pulled.names == (str(parse_reference(ref)),)
    assert empty.get_image(ref).id == app.id
    (base, top) = empty.layer_dirs(pulled)
    assert (base / "bin/busybox").is_file() and (top / "etc/motd").read_text() == "hello from the second layer\n"
    _assert_clean(empty)

    fault_proxy.log.clear()
    registry.pull(empty, ref)  # everything is there: only the manifest is fetched
    assert fault_proxy.count("GET", "/blobs/") == 0 and fault_proxy.count("GET", "/manifests/") == 1


def test_chunked_upload(source: Store, empty: Store, fault_proxy: FaultProxy) -> None:
    ref = f"{fault_proxy.host}/{_repo()}:chunked"
    registry.push(source, "src/app:1", ref, chunk_size=256 << 10)
    patches = fault_proxy.count("PATCH", "/blobs/uploads/")
    assert patches >= 4  # the ~1 MB busybox layer went in 256 KiB chunks
    assert registry.pull(empty, ref).id == source.get_image("src/app:1").id


def test_zstd_roundtrip(source: Store, empty: Store, plain_registry: RegistryServer) -> None:
    ref = f"{plain_registry.host}/{_repo()}:zstd"
    gz = f"{plain_registry.host}/{_repo()}:gzip"
    digest = registry.push(source, "src/app:1", ref, compression="zstd")
    registry.push(source, "src/app:1", gz, compression="gzip")
    remote = registry.inspect_remote(ref)
    assert remote.digest == digest and remote.manifest is not None
    assert [d.media_type for d in remote.manifest.layers] == [MEDIA_OCI_LAYER_ZSTD] * 2
    assert remote.manifest.layers[0].digest != registry.inspect_remote(gz).manifest.layers[0].digest
    pulled = registry.pull(empty, ref)
    assert pulled.id == source.get_image("src/app:1").id
    memo = json.loads((source.root / registry.MEMO_FILE).read_text())
    assert sorted(b["compression"] for b in memo["blobs"].values()) == ["gzip", "gzip", "zstd", "zstd"]
    _assert_clean(empty)


def test_cross_repository_mount(source: Store, empty: Store, fault_proxy: FaultProxy) -> None:
    host = fault_proxy.host
    a, b, c = (f"{host}/{_repo('mount')}:1" for _ in range(3))
    registry.push(source, "src/app:1", a)
    fault_proxy.log.clear()
    registry.push(source, "src/app:1", b)
    assert len(fault_proxy.mounts()) == 2 and all(m.status == 201 for m in fault_proxy.mounts())
    assert [u.path for u in fault_proxy.uploads()] != [] and len(fault_proxy.uploads()) == 2  # only the config
    # a store that pulled from a knows where the blobs live, too
    registry.pull(empty, a)
    fault_proxy.log.clear()
    registry.push(empty, a, c)
    assert len(fault_proxy.mounts()) == 2 and fault_proxy.count("PATCH") == 0
    assert registry.inspect_remote(c).digest == registry.inspect_remote(a).digest


def test_multi_platform_index(source: Store, tmp_path: Path, plain_registry: RegistryServer) -> None:
    host, repo = plain_registry.host, _repo("multi")
    host_digest = registry.push(source, "src/app:1", f"{host}/{repo}:host")
    other_digest = registry.push(source, "src/app-other:1", f"{host}/{repo}:other")
    here = host_platform()
    entries = []
    for digest, plat in ((other_digest, Platform("linux", OTHER_ARCH, "v8" if OTHER_ARCH == "arm64" else "")),
                         (host_digest, here)):
        size = len(registry.inspect_remote(f"{host}/{repo}@{digest}").raw)
        entries.append(Descriptor("application/vnd.oci.image.manifest.v1+json", digest, size, {}, plat))
    with registry.Registry(host) as reg:
        index_digest = reg.put_manifest(repo, "multi", serialize_index(Index(entries)), MEDIA_OCI_INDEX)

    remote = registry.inspect_remote(f"{host}/{repo}:multi")
    assert remote.digest == index_digest and remote.manifest_digest == host_digest
    assert set(remote.platforms) == {e.platform for e in entries}
    with Store.open(tmp_path / "s1") as s1:
        assert registry.pull(s1, f"{host}/{repo}:multi").id == source.get_image("src/app:1").id
        other = registry.pull(s1, f"{host}/{repo}:multi", platform=f"linux/{OTHER_ARCH}")
        assert other.id == source.get_image("src/app-other:1").id and other.config.architecture == OTHER_ARCH
        assert s1.get_image(f"{host}/{repo}:multi").id == other.id  # the tag follows the last pull
        with pytest.raises(PybuildError, match=r"has no image for platform linux/s390x; it has: linux/"):
            registry.pull(s1, f"{host}/{repo}:multi", platform="linux/s390x")
        # by the index digest: the platform's image, found again locally by that digest
        pinned = registry.pull(s1, f"{host}/{repo}@{index_digest}")
        assert pinned.id == source.get_image("src/app:1").id
        assert registry.find_local(s1, f"{host}/{repo}@{index_digest}").id == pinned.id


def test_pull_by_digest(source: Store, empty: Store, plain_registry: RegistryServer) -> None:
    name = f"{plain_registry.host}/{_repo()}"
    digest = registry.push(source, "src/app:1", f"{name}:1")
    image = registry.pull(empty, f"{name}@{digest}")
    assert image.id == source.get_image("src/app:1").id
    assert image.names == ()  # a digest is no tag, as in Docker
    assert registry.find_local(empty, f"{name}@{digest}").id == image.id
    assert registry.find_local(empty, f"{name}:1") is None
    missing = "sha256:" + "0" * 64
    with pytest.raises(PybuildError, match="not found"):
        registry.pull(empty, f"{name}@{missing}")
    with pytest.raises(PybuildError, match=r":nope not found .*MANIFEST_UNKNOWN.*check the name and tag"):
        registry.pull(empty, f"{name}:nope")


# --------------------------------------------------------------------------- Basic auth

def test_basic_auth(source: Store, empty: Store, basic_registry: RegistryServer, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    host = basic_registry.host
    ref = f"{host}/{_repo()}:1"
    cfg = tmp_path / "docker" / "config.json"
    with pytest.raises(PybuildError, match=rf"^registry {host} requires authentication to pull,push .*: "
                                           rf"run pybuild login {host}"):
        registry.push(source, "src/app:1", ref, auth_file=cfg)

    registry.check_login(host, auth.Credentials("alice", "wonderland"))
    auth.login(host, "alice", "wonderland", cfg)
    digest = registry.push(source, "src/app:1", ref, auth_file=cfg)
    assert registry.pull(empty, ref, auth_file=cfg).id == source.get_image("src/app:1").id
    assert registry.inspect_remote(ref, auth_file=cfg).digest == digest

    wrong = f"registry {host} refused the credentials for alice (check pybuild login)"
    with pytest.raises(PybuildError) as e:
        registry.check_login(host, auth.Credentials("alice", "wrong"))
    assert str(e.value) == wrong
    auth.login(host, "alice", "wrong", cfg)
    with pytest.raises(PybuildError) as e:
        registry.pull(empty, ref, auth_file=cfg)
    assert str(e.value) == wrong

    # through a credential helper named in config.json
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _helper(bin_dir, "test", tmp_path / "helper.json")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    helped = tmp_path / "helped.json"
    helped.write_text(json.dumps({"credHelpers": {host: "test"}}))
    auth.login(host, "alice", "wonderland", helped)
    assert "wonderland" not in helped.read_text()
    assert registry.inspect_remote(ref, auth_file=helped).digest == digest


# --------------------------------------------------------------------------- Bearer tokens

def test_token_auth(source: Store, tmp_path: Path, token_registry: RegistryServer, token_issuer: TokenIssuer) -> None:
    host = token_registry.host
    ref = f"{host}/team/{uuid.uuid4().hex[:8]}:1"
    alice = auth.Credentials("alice", "wonderland")
    token_issuer.requests.clear()
    digest = registry.push(source, "src/app:1", ref, credentials=alice)
    # one token for the push scope, reused by every blob request of every worker
    assert [r.scopes for r in token_issuer.requests] == [[f"repository:{parse_reference(ref).repository}:pull,push"]]
    assert token_issuer.requests[0].user == "alice"
    with Store.open(tmp_path / "alice") as s:
        assert registry.pull(s, ref, credentials=alice).id == source.get_image("src/app:1").id

    # bob may pull but not push: refused with what was granted
    bob = auth.Credentials("bob", "builder")
    with Store.open(tmp_path / "bob") as s:
        assert registry.pull(s, ref, credentials=bob).id == source.get_image("src/app:1").id
    repo = parse_reference(ref).repository
    with pytest.raises(PybuildError) as e:
        registry.push(source, "src/app:1", f"{host}/{repo}:bob", credentials=bob)
    assert str(e.value) == (f"registry {host} denied bob access to pull,push {repo} (granted: {repo}: pull); "
                            "check the repository name and that the account may do this")

    with pytest.raises(PybuildError) as e:
        registry.pull(source, ref, credentials=auth.Credentials("alice", "nope"))
    assert str(e.value) == f"registry {host} refused the credentials for alice (check pybuild login)"
    with pytest.raises(PybuildError) as e:
        registry.check_login(host, auth.Credentials("bob", "nope"))
    assert str(e.value) == f"registry {host} refused the credentials for bob (check pybuild login)"
    registry.check_login(host, bob)

    # anonymous: public/* may be pulled, team/* needs a login
    with pytest.raises(PybuildError, match=rf"requires authentication to pull {repo}: run pybuild login {host}"):
        registry.inspect_remote(ref, auth_file=tmp_path / "none.json")
    public = f"{host}/public/{uuid.uuid4().hex[:8]}:1"
    registry.push(source, "src/app:1", public, credentials=alice)
    with Store.open(tmp_path / "anon") as s:
        assert registry.pull(s, public, auth_file=tmp_path / "none.json").id == source.get_image("src/app:1").id
    assert registry.inspect_remote(ref, credentials=alice).digest == digest


# --------------------------------------------------------------------------- faults

def test_retries_after_faults(source: Store, empty: Store, fault_proxy: FaultProxy) -> None:
    ref = f"{fault_proxy.host}/{_repo()}:1"
    fault_proxy.faults = [Fault("status", "POST", "/blobs/uploads/", 500, times=2),
                          Fault("drop", "PUT", "/blobs/uploads/", times=1),
                          Fault("status", "PUT", "/manifests/", 429, headers={"Retry-After": "1"})]
    fault_proxy.drop_connections = 2
    start = time.monotonic()
    digest = registry.push(source, "src/app:1", ref, retry=FAST)
    assert time.monotonic() - start >= 1.0  # Retry-After was honoured (FAST alone waits far less)
    assert fault_proxy.dropped == 2 and all(f.hits == f.times for f in fault_proxy.faults)

    manifest = registry.inspect_remote(ref).manifest
    assert manifest is not None
    big = manifest.layers[0].digest
    fault_proxy.log.clear()
    fault_proxy.dropped, fault_proxy.drop_connections = 0, 2
    fault_proxy.faults = [Fault("status", "GET", "/manifests/", 500),
                          Fault("status", "GET", f"/blobs/{manifest.config.digest}", 503),
                          Fault("drop", "GET", f"/blobs/{manifest.layers[1].digest}"),
                          Fault("truncate", "GET", f"/blobs/{big}", times=2)]
    pulled = registry.pull(empty, ref, retry=FAST)
    assert pulled.id == source.get_image("src/app:1").id
    assert all(f.hits == f.times for f in fault_proxy.faults) and fault_proxy.dropped == 2
    # the truncated layer resumed where it broke off (Range -> 206) instead of starting over
    assert [e.status for e in fault_proxy.log if big in e.path] == [200, 206, 206]
    assert registry.inspect_remote(ref).digest == digest
    _assert_clean(empty)


def test_gives_up_after_bounded_retries(empty: Store, fault_proxy: FaultProxy) -> None:
    fault_proxy.faults = [Fault("status", "GET", "/manifests/", 503, times=-1)]
    with pytest.raises(PybuildError, match=r"answered 503 for manifest .*UNAVAILABLE"):
        registry.pull(empty, f"{fault_proxy.host}/{_repo()}:1", retry=RetryPolicy(attempts=3, base_delay=0.01))
    assert fault_proxy.count("GET", "/manifests/") == 3


def test_corrupt_blob_is_refused(source: Store, empty: Store, fault_proxy: FaultProxy) -> None:
    ref = f"{fault_proxy.host}/{_repo()}:1"
    registry.push(source, "src/app:1", ref)
    manifest = registry.inspect_remote(ref).manifest
    assert manifest is not None
    bad = manifest.layers[0].digest
    fault_proxy.faults = [Fault("corrupt", "GET", f"/blobs/{bad}", times=-1)]
    with pytest.raises(PybuildError) as e:
        registry.pull(empty, ref, retry=FAST)
    assert f"layer {bad} from {fault_proxy.host}/" in str(e.value)
    assert "is corrupt (its content hashes to" in str(e.value)
    assert empty.images() == [] and empty.get_layer(source.get_image("src/app:1").diff_ids[0]) is None
    _assert_clean(empty)
    assert not any((empty.root / "tmp").glob("*/pull-*"))  # staging cleaned

    fault_proxy.faults = [Fault("corrupt", "GET", f"/blobs/{manifest.config.digest}", times=-1)]
    with pytest.raises(PybuildError, match=rf"config {manifest.config.digest} from .* is corrupt"):
        registry.pull(empty, ref, retry=FAST)
    assert empty.images() == [] and not empty.has_blob(manifest.config.digest)
    fault_proxy.faults = [Fault("corrupt", "GET", "/manifests/", times=-1)]
    with pytest.raises(PybuildError, match="manifest .* is corrupt"):
        registry.pull(empty, ref, retry=FAST)
    fault_proxy.faults = []
    assert registry.pull(empty, ref).id == source.get_image("src/app:1").id  # and all is well once it stops
    _assert_clean(empty)


# --------------------------------------------------------------------------- interop

def _skopeo() -> str:
    tool = shutil.which("skopeo")
    if tool is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    return tool


def _policy(tmp_path: Path) -> list[str]:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return ["--policy", str(policy)]


def test_skopeo_reads_what_pybuild_pushed(source: Store, empty: Store, plain_registry: RegistryServer,
                                          tmp_path: Path) -> None:
    skopeo = _skopeo()
    host, repo = plain_registry.host, _repo("skopeo")
    digest = registry.push(source, "src/app:1", f"{host}/{repo}:1")
    out = subprocess.run([skopeo, "inspect", "--tls-verify=false", f"docker://{host}/{repo}:1"],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    app = source.get_image("src/app:1")
    assert info["Digest"] == digest and info["Architecture"] == app.config.architecture
    assert len(info["Layers"]) == 2
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{host}/{repo}:1"],
                         check=True, capture_output=True).stdout
    assert parse_manifest(raw).config.digest == app.id

    layout = tmp_path / "oci"
    subprocess.run([skopeo, *_policy(tmp_path), "copy", "--src-tls-verify=false", f"docker://{host}/{repo}:1",
                    f"oci:{layout}:copied"], check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]  # copied byte for byte

    # and what skopeo writes as a Docker schema 2 manifest, pybuild pulls
    subprocess.run([skopeo, *_policy(tmp_path), "copy", "--format", "v2s2", "--src-tls-verify=false",
                    "--dest-tls-verify=false", f"docker://{host}/{repo}:1", f"docker://{host}/{repo}:v2s2"],
                   check=True, capture_output=True)
    remote = registry.inspect_remote(f"{host}/{repo}:v2s2")
    assert remote.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert registry.pull(empty, f"{host}/{repo}:v2s2").id == app.id


def test_tls(source: Store, plain_registry: RegistryServer, tmp_path: Path) -> None:
    """TLS is used for every registry not known as insecure; loopback is always plain, so point a client at it."""
    cert, key = make_tls_cert(tmp_path)
    server = RegistryServer(tmp_path / "tls-registry", tls=(cert, key)).start()
    try:
        url, repo = f"https://{server.host}", _repo("tls")
        with registry.Registry(server.host, base_url=url) as reg:
            with pytest.raises(PybuildError, match=rf"TLS certificate of {server.host} is not trusted .*CA file"):
                reg.blob_exists(repo, "sha256:" + "0" * 64)
        data = source.read_blob(source.get_image("src/app:1").id)
        digest = sha256_digest(data)
        with registry.Registry(server.host, base_url=url, ca_file=cert) as reg:
            reg.upload_blob(repo, digest, len(data), data)
            assert reg.blob_exists(repo, digest)
            out = io.BytesIO()
            reg.fetch_blob(repo, Descriptor("application/octet-stream", digest, len(data)), out)
            assert out.getvalue() == data
    finally:
        server.stop()
    with registry.Registry(plain_registry.host, base_url=f"https://{plain_registry.host}") as reg:
        with pytest.raises(PybuildError, match="TLS with .* failed .*insecure registry"):
            reg.blob_exists("x/y", "sha256:" + "0" * 64)
