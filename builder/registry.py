"""Pull and push images over the OCI distribution API v2 (Docker Hub, distribution, Harbor, zot ...).

Nothing a registry sends is trusted: every manifest, config and layer is hashed
and sized while it streams and must match the digest that named it before it
reaches the store (layers are staged in this process's tmp/, then unpacked by
Store.add_layer_tar, which checks the compressed digest and the diff id again).

Push compresses each layer once per compression: the compressed digest and size
are remembered per (diff id, compression) in ``<store>/registry-blobs.json``,
with the repositories known to hold the blob, so a repeated push only asks
HEAD, and a push to another repository of the same registry mounts the blob
instead of uploading it. Pulled layers are remembered the same way.

Plain HTTP is used for localhost / 127.0.0.0/8 / ::1 and for registries listed
as insecure (host[:port] or a CIDR, as dockerd's --insecure-registry); TLS with
the system trust store (or a given CA file) otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import ipaddress
import json
import os
import shutil
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from grammar.errors import PybuildError

from . import auth
from .image import (
    DEFAULT_REGISTRY, INDEX_TYPES, MANIFEST_TYPES, MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST, MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER, MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_ZSTD, MEDIA_OCI_MANIFEST, Descriptor, Index, Manifest, Platform, Reference, host_platform,
    parse_config, parse_index, parse_manifest, parse_reference, serialize_manifest, sha256_digest, short_id,
)
from .store import Image, Store
from .transfer import FileRange, HttpClient, Response, RetryPolicy, describe_error, is_transient, tls_context

Progress = Callable[[str], None]

DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's API really lives
MANIFEST_ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))
COMPRESSIONS = {"gzip": MEDIA_OCI_LAYER_GZIP, "zstd": MEDIA_OCI_LAYER_ZSTD}
DEFAULT_CHUNK = 16 << 20     # blobs larger than this go up in PATCH chunks of this size
DEFAULT_WORKERS = 4
MEMO_FILE = "registry-blobs.json"
USER_AGENT = "pybuild/0.1"

_MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_LAYER_TYPES = {MEDIA_OCI_LAYER, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, MEDIA_DOCKER_LAYER_GZIP,
                _MEDIA_DOCKER_LAYER}
_FOREIGN_TYPES = {"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                  "application/vnd.oci.image.layer.nondistributable.v1.tar",
                  "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                  "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"}
_SCHEMA1_TYPES = {"application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws"}
_MANIFEST_MAX = 4 << 20
_CONFIG_MAX = 32 << 20
_CHUNK = 1 << 20
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386"}


# --------------------------------------------------------------------------- endpoints, platforms

def is_insecure(registry: str, insecure: Iterable[str] = ()) -> bool:
    """True for registries reached over plain HTTP: loopback, or listed (host, host:port or CIDR)."""
    host = urllib.parse.urlsplit("//" + registry).hostname or registry
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None and addr.is_loopback:
        return True
    for entry in insecure:
        entry = entry.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if not entry:
            continue
        if entry in (registry, host):
            return True
        if addr is not None and "/" in entry:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def api_base(registry: str, insecure: Iterable[str] = ()) -> str:
    """The URL prefix of registry's API: docker.io is registry-1.docker.io over TLS."""
    host = DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry
    return ("http://" if is_insecure(registry, insecure) else "https://") + host


def parse_platform(value: str | Platform | None) -> Platform:
    """`linux/arm64/v8`, `linux/amd64` (Go names; x86_64 and aarch64 are accepted); None is this host."""
    if value is None:
        return host_platform()
    if isinstance(value, Platform):
        return value
    parts = value.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PybuildError(f"invalid platform {value!r}: expected os/arch[/variant], "
                           "e.g. linux/amd64 or linux/arm64/v8")
    arch = _ARCH_ALIASES.get(parts[1], parts[1])
    return Platform(parts[0], arch, parts[2] if len(parts) == 3 else "")


def select_platform(index: Index, want: Platform, what: str) -> Descriptor:
    """The index entry for `want`: same os and architecture; the same variant, else one without a variant."""
    entries = [d for d in index.manifests if d.platform is not None]
    if not entries:  # an index without platforms: a single image wrapped in an index
        candidates = [d for d in index.manifests if d.media_type in MANIFEST_TYPES + INDEX_TYPES or not d.media_type]
        if candidates:
            return candidates[0]
    same = [d for d in entries
            if d.platform and (d.platform.os, d.platform.architecture) == (want.os, want.architecture)]
    exact = [d for d in same if d.platform and d.platform.variant == want.variant]
    loose = [d for d in same if d.platform and not d.platform.variant]
    if want.architecture == "arm64":  # arm64 is v8 unless said otherwise, as Docker normalises it
        loose += [d for d in same if d.platform and d.platform.variant in ("", "v8")]
    picked = exact or loose or (same if not want.variant else [])
    if not picked:
        have = ", ".join(sorted({str(d.platform) for d in entries if d.platform and d.platform.os != "unknown"}))
        raise PybuildError(f"{what} has no image for platform {want}; it has: {have or 'none'}; "
                           "pass one of those as the platform")
    return picked[0]


# --------------------------------------------------------------------------- the memo of compressed blobs

@dataclass(frozen=True)
class KnownBlob:
    """A compressed form of a layer the store holds uncompressed, and where it is known to live."""

    digest: str
    size: int
    diff_id: str
    compression: str            # gzip, zstd or none
    sources: tuple[str, ...]    # registry/repository names holding it, most recent last


class BlobMemo:
    """``<store>/registry-blobs.json``: compressed forms of layers and remote image digests.

    Only a cache: every use is checked against the registry (HEAD) or the content
    (digests), so a stale or lost file costs time, never correctness.
    """

    _MAX_SOURCES = 8

    def __init__(self, store: Store) -> None:
        self._store = store
        self.path = store.root / MEMO_FILE

    def _load(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {"version": 1, "blobs": {}, "images": {}}
        if not isinstance(obj, dict):
            return {"version": 1, "blobs": {}, "images": {}}
        for key in ("blobs", "images"):
            if not isinstance(obj.get(key), dict):
                obj[key] = {}
        return obj

    def forms(self, diff_id: str, compression: str) -> list[KnownBlob]:
        out = []
        for digest, b in self._load()["blobs"].items():
            if isinstance(b, dict) and b.get("diff_id") == diff_id and b.get("compression") == compression:
                out.append(KnownBlob(digest, int(b.get("size") or 0), diff_id, compression,
                                     tuple(str(s) for s in b.get("sources") or [])))
        return out

    def image_for(self, remote: str) -> str | None:
        """The local image id of `registry/repo@sha256:...` (a manifest or index pulled or pushed)."""
        value = self._load()["images"].get(remote)
        return value if isinstance(value, str) else None

    def record_blob(self, digest: str, size: int, diff_id: str, compression: str, source: str | None) -> None:
        def change(obj: dict[str, Any]) -> None:
            b = obj["blobs"].setdefault(digest, {})
            b.update({"size": size, "diff_id": diff_id, "compression": compression})
            sources = [s for s in b.get("sources") or [] if s != source]
            if source:
                sources.append(source)
            b["sources"] = sources[-self._MAX_SOURCES:]
        self._update(change)

    def record_image(self, remotes: Iterable[str], image_id: str) -> None:
        def change(obj: dict[str, Any]) -> None:
            for r in remotes:
                obj["images"][r] = image_id
        self._update(change)

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write under the store lock; entries for layers and images gone from the store are dropped."""
        store = self._store
        with store.lock():
            obj = self._load()
            change(obj)
            obj["blobs"] = {d: b for d, b in obj["blobs"].items()
                            if isinstance(b, dict) and _has(store, b.get("diff_id"))}
            obj["images"] = {r: i for r, i in obj["images"].items() if _has(store, i)}
            staging = store.temp_dir("memo")
            tmp = staging / MEMO_FILE
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, sort_keys=True, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            staging.rmdir()


def _has(store: Store, digest: object) -> bool:
    try:
        return isinstance(digest, str) and store.has_blob(digest)
    except PybuildError:  # not a digest: a damaged memo entry
        return False


def find_local(store: Store, ref: str) -> Image | None:
    """The local image for a reference, also for name@digest of something pulled or pushed (FROM x@sha256:..)."""
    r = parse_reference(ref)
    if r.digest is not None:
        image_id = BlobMemo(store).image_for(f"{r.name}@{r.digest}")
        if image_id is not None:
            return store.find_image(image_id)
    return store.find_image(str(r))


# --------------------------------------------------------------------------- the API client

def _error_text(resp: Response) -> str:
    """The registry's error list (`MANIFEST_UNKNOWN: manifest unknown`), or the status."""
    try:
        data = resp.data if resp.data else resp.read(64 << 10)
        obj = json.loads(data)
        parts = []
        for e in obj.get("errors") or []:
            text = f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
            parts.append(text)
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError, TypeError, OSError, http.client.HTTPException):
        pass
    return f"HTTP {resp.status}"


def _mismatch(what: str, digest: str, where: str, got_size: int, want_size: int, got_digest: str) -> PybuildError:
    if got_size != want_size:
        detail = f"{got_size} bytes instead of {want_size}"
    else:
        detail = f"its content hashes to {got_digest}"
    return PybuildError(f"{what} {digest} from {where} is corrupt ({detail}); nothing of it was stored. "
                        "The registry or something between it and you damaged the data: try again, "
                        "and if it persists, push the image again")


@dataclass(frozen=True)
class ManifestBlob:
    data: bytes
    media_type: str
    digest: str


class Registry:
    """One registry's API with its authentication; thread-safe (workers share it)."""

    def __init__(self, registry: str, *, insecure: Iterable[str] = (), ca_file: str | os.PathLike[str] | None = None,
                 credentials: auth.Credentials | None = None, auth_file: Path | None = None,
                 retry: RetryPolicy | None = None, timeout: float = 60.0, base_url: str | None = None) -> None:
        """`registry` as in references (docker.io, host:port); `base_url` overrides where its API is (a mirror)."""
        self.name = registry
        self.base = (base_url or api_base(registry, insecure)).rstrip("/")
        self.retry = retry or RetryPolicy()
        self.http = HttpClient(ssl_context=tls_context(ca_file), retry=self.retry, timeout=timeout)
        creds = credentials if credentials is not None else auth.get_credentials(registry, auth_file)
        self.auth = auth.Authenticator(registry, creds, self.http)
        self._pinged = False
        self._ping_lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- requests

    def _ping(self) -> None:
        """GET /v2/ once: learn whether and how the registry wants authentication."""
        with self._ping_lock:
            if self._pinged:
                return
            resp = self.http.request("GET", self.base + "/v2/", headers={"User-Agent": USER_AGENT}, max_body=1 << 20)
            if resp.status == 401:
                self.auth.learn(resp.header("WWW-Authenticate"))
            elif resp.status == 404:
                raise PybuildError(f"{self.name} does not serve the registry API (/v2/ is not found); "
                                   "check the registry name")
            elif resp.status != 200:
                raise PybuildError(f"registry {self.name} answered {resp.status} to /v2/: {_error_text(resp)}")
            self._pinged = True

    def url(self, path_or_url: str) -> str:
        return urllib.parse.urljoin(self.base + "/", path_or_url)

    def request(self, method: str, path_or_url: str, *, scopes: tuple[str, ...], headers: dict[str, str] | None = None,
                body: bytes | FileRange | None = None, stream: bool = False, max_body: int = 1 << 20) -> Response:
        """One API request with authentication (a token for `scopes`); 401 and 403 become PybuildErrors."""
        self._ping()
        url = self.url(path_or_url)
        for again in (True, False):
            sent = {"User-Agent": USER_AGENT, **(headers or {}), **self.auth.headers(scopes)}
            resp = self.http.request(method, url, headers=sent, body=body, stream=stream, max_body=max_body)
            if resp.status == 401:
                challenge = resp.header("WWW-Authenticate")
                resp.close()
                if again and self.auth.scheme is None:
                    self.auth.learn(challenge)  # the registry started asking (a per-repository policy)
                    continue
                if again and self.auth.scheme == "bearer":
                    self.auth.forget(scopes)  # expired or revoked: one fresh token
                    continue
                if self.auth.credentials is None:
                    raise self.auth.login_required(scopes)
                if self.auth.scheme == "basic":
                    raise self.auth.credentials_refused()
                raise self.auth.denied(scopes)
            if resp.status == 403:
                resp.close()
                raise self.auth.denied(scopes)
            return resp
        raise AssertionError("unreachable")

    def check_login(self) -> None:
        """Raise unless the credentials are accepted (what `pybuild login` checks before saving them)."""
        self._ping()
        if self.auth.scheme is None:
            return
        resp = self.request("GET", "/v2/", scopes=())
        if resp.status != 200:
            raise PybuildError(f"registry {self.name} answered {resp.status} to /v2/: {_error_text(resp)}")

    # ----------------------------------------------------------------- manifests

    def get_manifest(self, repository: str, reference: str) -> ManifestBlob:
        """A manifest or index by tag or digest, checked against the digest that names or announces it."""
        if ":" in reference and not reference.startswith("sha256:"):
            raise PybuildError(f"digest {reference} uses an algorithm pybuild does not check; use a sha256 digest")
        resp = self.request("GET", f"/v2/{repository}/manifests/{reference}",
                            scopes=(auth.repository_scope(repository, "pull"),),
                            headers={"Accept": MANIFEST_ACCEPT}, max_body=_MANIFEST_MAX)
        where = f"{self.name}/{repository}" + (f"@{reference}" if ":" in reference else f":{reference}")
        if resp.status == 404:
            raise PybuildError(f"{where} not found ({_error_text(resp)}); check the name and tag")
        if resp.status != 200:
            raise PybuildError(f"registry {self.name} answered {resp.status} for manifest {where}: {_error_text(resp)}")
        data = resp.data
        digest = sha256_digest(data)
        expected = reference if reference.startswith("sha256:") else resp.header("Docker-Content-Digest").strip()
        if expected.startswith("sha256:") and expected != digest:
            raise PybuildError(f"manifest {where} is corrupt: it hashes to {digest}, not {expected}; nothing was "
                               "stored. Try again; if it persists, the registry or a proxy damages data")
        media = resp.header("Content-Type").split(";")[0].strip()
        try:
            body_media = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            raise PybuildError(f"manifest {where} is not JSON; the registry sent something else") from None
        if isinstance(body_media, str) and body_media:
            media = body_media
        elif media not in MANIFEST_TYPES + INDEX_TYPES:
            media = MEDIA_OCI_INDEX if b'"manifests"' in data else MEDIA_OCI_MANIFEST
        if media in _SCHEMA1_TYPES:
            raise PybuildError(f"{where} is a Docker schema 1 manifest, which pybuild does not pull (Docker "
                               "deprecated it); push the image again with a current tool")
        return ManifestBlob(data, media, digest)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest or index under a tag (or its digest); returns its digest."""
        resp = self.request("PUT", f"/v2/{repository}/manifests/{reference}",
                            scopes=(auth.repository_scope(repository, "pull", "push"),),
                            headers={"Content-Type": media_type}, body=data)
        if resp.status not in (200, 201, 202):
            raise PybuildError(f"registry {self.name} refused the manifest for {repository}:{reference}: "
                               f"{_error_text(resp)}")
        digest = sha256_digest(data)
        announced = resp.header("Docker-Content-Digest").strip()
        if announced.startswith("sha256:") and announced != digest:
            raise PybuildError(f"registry {self.name} stored the manifest as {announced}, not {digest}; "
                               "something between pybuild and the registry changed it")
        return digest

    # ----------------------------------------------------------------- blobs

    def blob_exists(self, repository: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repository}/blobs/{digest}",
                            scopes=(auth.repository_scope(repository, "pull", "push"),))
        if resp.status in (200, 307):
            return True
        if resp.status == 404:
            return False
        raise PybuildError(f"registry {self.name} answered {resp.status} checking blob {digest} in {repository}")

    def fetch_blob(self, repository: str, desc: Descriptor, out: BinaryIO, what: str = "blob") -> None:
        """Download a blob into `out`, hashing and counting as it streams; a dropped transfer resumes (Range).

        Raises PybuildError naming the blob if it does not match desc's digest and size.
        """
        scopes = (auth.repository_scope(repository, "pull"),)
        where = f"{self.name}/{repository}"
        h, got = hashlib.sha256(), 0
        last = ""
        for attempt in range(self.retry.attempts):
            headers = {"Range": f"bytes={got}-"} if got else {}
            resp = self.request("GET", f"/v2/{repository}/blobs/{desc.digest}", scopes=scopes, headers=headers,
                                stream=True)
            try:
                if resp.status == 206 and got and resp.header("Content-Range").startswith(f"bytes {got}-"):
                    pass
                elif resp.status == 200:
                    if got:  # the registry ignored Range: start over
                        out.seek(0)
                        out.truncate()
                        h, got = hashlib.sha256(), 0
                    length = resp.header("Content-Length")
                    if length.isdigit() and int(length) != desc.size:
                        raise _mismatch(what, desc.digest, where, int(length), desc.size, "")
                elif resp.status == 404:
                    raise PybuildError(f"{what} {desc.digest} is missing from {where} ({_error_text(resp)}); the "
                                       "image was deleted or pushed incompletely: push it again")
                else:
                    raise PybuildError(f"registry {self.name} answered {resp.status} for {what} {desc.digest}: "
                                       f"{_error_text(resp)}")
                while chunk := resp.read(_CHUNK):
                    got += len(chunk)
                    if got > desc.size:
                        raise _mismatch(what, desc.digest, where, got, desc.size, "")
                    h.update(chunk)
                    out.write(chunk)
                if got < desc.size:  # http.client's read(n) returns b"" at a premature end instead of raising
                    raise http.client.IncompleteRead(b"", desc.size - got)
                break
            except PybuildError:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise
                last = describe_error(e)
                if attempt + 1 < self.retry.attempts:
                    time.sleep(self.retry.delay(attempt))
            finally:
                resp.close()
        else:
            raise PybuildError(f"cannot download {what} {desc.digest} from {where}: {last} "
                               f"({self.retry.attempts} attempts); try again")
        got_digest = "sha256:" + h.hexdigest()
        if got != desc.size or got_digest != desc.digest:
            raise _mismatch(what, desc.digest, where, got, desc.size, got_digest)

    def start_upload(self, repository: str, *, mount: str | None = None, source: str | None = None) -> str | None:
        """POST an upload (or a mount of `mount` from repository `source`): its URL, or None if mounted."""
        scopes = (auth.repository_scope(repository, "pull", "push"),)
        path = f"/v2/{repository}/blobs/uploads/"
        if mount is not None and source is not None:
            scopes += (auth.repository_scope(source, "pull"),)
            path += "?" + urllib.parse.urlencode({"mount": mount, "from": source})
        resp = self.request("POST", path, scopes=scopes)
        if resp.status == 201 and mount is not None:
            return None
        location = resp.header("Location")
        if resp.status != 202 or not location:
            raise PybuildError(f"registry {self.name} refused to start an upload to {repository}: {_error_text(resp)}")
        return self.url(location)

    def upload_blob(self, repository: str, digest: str, size: int, source: bytes | Path, *,
                    chunk_size: int = DEFAULT_CHUNK, location: str | None = None) -> None:
        """Upload a blob: one PUT when it fits in a chunk, else PATCH chunks (Content-Range) and a closing PUT.

        A rejected chunk (the registry lost track of the offset after a dropped connection)
        restarts the whole upload, a bounded number of times.
        """
        scopes = (auth.repository_scope(repository, "pull", "push"),)
        for attempt in range(3):
            url = location or self.start_upload(repository)
            location = None
            assert url is not None
            if size <= chunk_size:
                body = source if isinstance(source, bytes) else FileRange(Path(source), 0, size)
            else:
                offset = 0
                url, offset = self._patch_chunks(repository, url, source, size, chunk_size, scopes)
                if offset < 0:
                    continue  # restart
                body = b""
            resp = self.request("PUT", _with_query(url, digest=digest), scopes=scopes,
                                headers={"Content-Type": "application/octet-stream"}, body=body)
            if resp.status in (201, 204):
                return
            text = _error_text(resp)
            if resp.status in (404, 416) and attempt < 2:
                continue  # the upload session was lost: start again
            if "DIGEST_INVALID" in text or "SIZE_INVALID" in text:
                raise PybuildError(f"registry {self.name} rejected blob {digest} as damaged ({text}); the local "
                                   "copy may be corrupt or a proxy changed it: try again")
            raise PybuildError(f"registry {self.name} refused blob {digest} for {repository}: {text}")
        raise PybuildError(f"registry {self.name} kept losing the upload of blob {digest}; try again")

    def _patch_chunks(self, repository: str, url: str, source: bytes | Path, size: int, chunk_size: int,
                      scopes: tuple[str, ...]) -> tuple[str, int]:
        """PATCH every chunk; returns (url for the final PUT, size), or (url, -1) when the session must restart."""
        offset = 0
        while offset < size:
            n = min(chunk_size, size - offset)
            body: bytes | FileRange = source[offset:offset + n] if isinstance(source, bytes) \
                else FileRange(Path(source), offset, n)
            resp = self.request("PATCH", url, scopes=scopes, body=body, headers={
                "Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + n - 1}"})
            if resp.status in (404, 416):
                return url, -1
            location = resp.header("Location")
            if resp.status != 202 or not location:
                raise PybuildError(f"registry {self.name} refused a chunk of an upload to {repository}: "
                                   f"{_error_text(resp)}")
            url = self.url(location)
            offset += n
        return url, offset


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)


# --------------------------------------------------------------------------- inspect

@dataclass(frozen=True)
class RemoteImage:
    """What a reference names in its registry."""

    reference: Reference
    digest: str                  # of the manifest or index the reference names: what name@digest pins
    media_type: str
    raw: bytes
    index: Index | None          # when the reference names an index (multi-platform image)
    manifest: Manifest | None    # the image manifest (for the platform, when it names an index), or None
    manifest_digest: str | None  # the digest of that manifest

    @property
    def platforms(self) -> list[Platform]:
        return [d.platform for d in self.index.manifests if d.platform] if self.index else []


def _resolve(reg: Registry, ref: Reference, want: Platform | None) -> RemoteImage:
    """Fetch what ref names; with `want`, follow indexes down to that platform's image manifest."""
    top = reg.get_manifest(ref.repository, ref.digest or ref.tag or "latest")
    blob, index, chain = top, None, 0
    while blob.media_type in INDEX_TYPES:
        parsed = parse_index(blob.data)
        index = index or parsed
        if want is None:
            return RemoteImage(ref, top.digest, top.media_type, top.data, index, None, None)
        chain += 1
        if chain > 4:
            raise PybuildError(f"{ref} nests image indexes too deeply; the image is malformed")
        desc = select_platform(parsed, want, str(ref))
        blob = reg.get_manifest(ref.repository, desc.digest)
        if blob.digest != desc.digest:
            raise PybuildError(f"manifest {desc.digest} of {ref} hashes to {blob.digest}; nothing was stored")
    if blob.media_type not in MANIFEST_TYPES:
        raise PybuildError(f"{ref} is a {blob.media_type or 'untyped'} artifact, not a container image; "
                           "pybuild pulls OCI and Docker schema 2 images")
    return RemoteImage(ref, top.digest, top.media_type, top.data, index, parse_manifest(blob.data), blob.digest)


def _open_registry(ref: Reference, insecure: Iterable[str], ca_file: str | os.PathLike[str] | None,
                   credentials: auth.Credentials | None, auth_file: Path | None,
                   retry: RetryPolicy | None) -> Registry:
    return Registry(ref.registry, insecure=insecure, ca_file=ca_file, credentials=credentials, auth_file=auth_file,
                    retry=retry)


def inspect_remote(ref: str, *, platform: str | Platform | None = None, insecure: Iterable[str] = (),
                   ca_file: str | os.PathLike[str] | None = None, credentials: auth.Credentials | None = None,
                   auth_file: Path | None = None, retry: RetryPolicy | None = None) -> RemoteImage:
    """The manifest (or index) a reference names and its digest, plus the platform's manifest when it is an index.

    For a `--pull` check: `find_local(store, f"{r.reference.name}@{r.digest}")` is None when
    the local copy is out of date.
    """
    reference = parse_reference(ref)
    with _open_registry(reference, insecure, ca_file, credentials, auth_file, retry) as reg:
        try:
            return _resolve(reg, reference, parse_platform(platform))
        except PybuildError as e:
            if "has no image for platform" not in e.message:
                raise
            return _resolve(reg, reference, None)


def check_login(registry: str, credentials: auth.Credentials, *, insecure: Iterable[str] = (),
                ca_file: str | os.PathLike[str] | None = None) -> None:
    """Raise PybuildError unless registry accepts the credentials (before auth.login saves them)."""
    with Registry(auth.registry_host(registry), insecure=insecure, ca_file=ca_file, credentials=credentials) as reg:
        reg.check_login()


# --------------------------------------------------------------------------- pull

class _Say:
    """A thread-safe progress callback (workers report concurrently)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(text)


def _run_parallel(jobs: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """Run jobs on a small pool; the first failure cancels what has not started and is raised."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="registry") as ex:
        futures: list[Future[Any]] = [ex.submit(job) for job in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            wait(futures)
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def _compression_of(media_type: str) -> str:
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    return "none"


def pull(store: Store, ref: str, *, platform: str | Platform | None = None, insecure: Iterable[str] = (),
         progress: Progress | None = None, ca_file: str | os.PathLike[str] | None = None,
         credentials: auth.Credentials | None = None, auth_file: Path | None = None,
         retry: RetryPolicy | None = None, workers: int = DEFAULT_WORKERS) -> Image:
    """Pull an image into the store and tag it with the reference's full name (not for name@digest).

    `busybox` is docker.io/library/busybox:latest. Layers the store has are skipped;
    the rest download in parallel and are verified before they are stored.
    """
    reference = parse_reference(ref)
    want = parse_platform(platform)
    say = _Say(progress)
    memo = BlobMemo(store)
    with _open_registry(reference, insecure, ca_file, credentials, auth_file, retry) as reg:
        remote = _resolve(reg, reference, want)
        manifest = remote.manifest
        assert manifest is not None and remote.manifest_digest is not None
        repo, where = reference.repository, f"{reference.registry}/{reference.repository}"
        if store.has_blob(manifest.config.digest):
            config_bytes = store.read_blob(manifest.config.digest)
        else:
            if manifest.config.size > _CONFIG_MAX:
                raise PybuildError(f"the config of {reference} claims {manifest.config.size} bytes; refusing "
                                   "so large a config")
            buf = io.BytesIO()
            reg.fetch_blob(repo, manifest.config, buf, "config")
            config_bytes = buf.getvalue()
        config = parse_config(config_bytes)
        if len(config.diff_ids) != len(manifest.layers):
            raise PybuildError(f"{reference} lists {len(manifest.layers)} layers but its config "
                               f"{len(config.diff_ids)}; the image is malformed")
        for desc in manifest.layers:
            if desc.media_type in _FOREIGN_TYPES:
                raise PybuildError(f"layer {desc.digest} of {reference} is a foreign (non-distributable) layer, "
                                   "which pybuild does not fetch")
            if desc.media_type not in _LAYER_TYPES:
                raise PybuildError(f"layer {desc.digest} of {reference} has media type {desc.media_type!r}, "
                                   "which pybuild cannot unpack (encrypted or not a layer)")
        jobs: list[Callable[[], Any]] = []
        seen: set[str] = set()
        for desc, diff_id in zip(manifest.layers, config.diff_ids):
            if store.get_layer(diff_id) is not None or diff_id in seen:
                say(f"{short_id(desc.digest)}: Already exists")
                continue
            seen.add(diff_id)
            jobs.append(lambda desc=desc, diff_id=diff_id: _pull_layer(store, reg, repo, desc, diff_id, say))
        _run_parallel(jobs, workers)
    if not store.has_blob(manifest.config.digest):
        store.put_blob(config_bytes, expected=manifest.config.digest)
    for desc, diff_id in zip(manifest.layers, config.diff_ids):
        memo.record_blob(desc.digest, desc.size, diff_id, _compression_of(desc.media_type), where)
    image = store.put_image(config_bytes)
    names: tuple[str, ...] = image.names
    if reference.digest is None:
        names = (store.tag(image, str(reference)),)
    memo.record_image({f"{reference.name}@{remote.digest}", f"{reference.name}@{remote.manifest_digest}"}, image.id)
    say(f"Digest: {remote.digest}")
    return dataclasses.replace(image, names=names)


def _pull_layer(store: Store, reg: Registry, repo: str, desc: Descriptor, diff_id: str, say: _Say) -> None:
    say(f"{short_id(desc.digest)}: Downloading {desc.size} bytes")
    staging = store.temp_dir("pull")
    try:
        with open(staging / "blob", "w+b") as f:
            reg.fetch_blob(repo, desc, f, "layer")
            f.flush()
            f.seek(0)
            try:
                store.add_layer_tar(f, digest=desc.digest, diff_id=diff_id)
            except PybuildError as e:
                raise PybuildError(f"layer {desc.digest} of {reg.name}/{repo}: {e.message}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"{short_id(desc.digest)}: Pull complete")


# --------------------------------------------------------------------------- push

class _HashingFile:
    """Writes to a file, hashing and counting."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)


class _HashingReader:
    """Reads from a file, hashing: the local layer is checked against its diff id while compressed."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


GZIP_MEMBER = 4 << 20  # bytes of tar per gzip member: big enough that members cost ~nothing in size


def _gzip_member(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # zlib releases the GIL: members compress in parallel
    return z.compress(data) + z.flush()


def _gzip_parallel(src: Any, out: Any) -> None:
    """gzip as a sequence of members (RFC 1952 allows several; every gzip reader, Go's included,
    reads them as one stream), like pigz: one member per core at a time, written in order."""
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Future[bytes]] = []
        while True:
            data = src.read(GZIP_MEMBER)
            if data:
                pending.append(pool.submit(_gzip_member, data))
            if pending and (len(pending) > workers or not data):
                out.write(pending.pop(0).result())
            if not data and not pending:
                break


def compress_layer(store: Store, diff_id: str, compression: str, dest: Path) -> tuple[str, int]:
    """Compress a stored layer tar into dest: (digest, size). Both use all cores: gzip as
    independent members (level 6) compressed side by side, zstd with its own threads.

    Both are deterministic (gzip headers without name or time), so the memo stays valid.
    """
    size = store.blob_size(diff_id)
    with store.open_blob(diff_id) as raw, open(dest, "wb") as f:
        src = _HashingReader(raw)
        out = _HashingFile(f)
        if compression == "gzip":
            _gzip_parallel(src, out)
        elif compression == "zstd":
            import zstandard
            cctx = zstandard.ZstdCompressor(level=3, threads=-1, write_content_size=True, write_checksum=True)
            cctx.copy_stream(src, out, size=size, read_size=_CHUNK, write_size=_CHUNK)
        else:
            raise PybuildError(f"unknown compression {compression!r}: use gzip or zstd")
        f.flush()
        os.fsync(f.fileno())
    if "sha256:" + src.hash.hexdigest() != diff_id:
        raise PybuildError(f"layer {diff_id} in the store at {store.root} is corrupt; remove the images using it "
                           "and build or pull them again")
    return "sha256:" + out.hash.hexdigest(), out.size


def push(store: Store, image_ref: str | Image, dest_ref: str | None = None, *, compression: str = "gzip",
         insecure: Iterable[str] = (), progress: Progress | None = None,
         ca_file: str | os.PathLike[str] | None = None, credentials: auth.Credentials | None = None,
         auth_file: Path | None = None, retry: RetryPolicy | None = None, workers: int = DEFAULT_WORKERS,
         chunk_size: int = DEFAULT_CHUNK) -> str:
    """Push a stored image as an OCI manifest to dest_ref (default: the image's own name); returns its digest.

    Blobs the repository has are skipped (HEAD), blobs known in another repository of
    the same registry are mounted, the rest are compressed (once: see BlobMemo) and uploaded.
    """
    if compression not in COMPRESSIONS:
        raise PybuildError(f"unknown compression {compression!r}: use gzip or zstd")
    image = store.get_image(image_ref)
    if dest_ref is None:
        found = store.resolve(image_ref) if isinstance(image_ref, str) else None
        if found is None or found[1] is None:
            raise PybuildError(f"say where to push {image_ref if isinstance(image_ref, str) else image.short_id}: "
                               "name the image by its registry/repository:tag or give a destination")
        dest_ref = found[1]
    dest = parse_reference(dest_ref)
    if dest.digest is not None:
        raise PybuildError(f"cannot push to {dest_ref}: a digest names content, not a place; push to name:tag")
    say = _Say(progress)
    memo = BlobMemo(store)
    config_bytes = store.read_blob(image.id)
    with _open_registry(dest, insecure, ca_file, credentials, auth_file, retry) as reg:
        jobs: list[Callable[[], Any]] = [
            (lambda d=d: _push_layer(store, reg, dest, d, compression, memo, say, chunk_size))
            for d in dict.fromkeys(image.config.diff_ids)]
        jobs.append(lambda: _push_config(reg, dest, image.id, config_bytes, say, chunk_size))
        results = _run_parallel(jobs, workers)
        by_diff: dict[str, Descriptor] = dict(zip(dict.fromkeys(image.config.diff_ids), results[:-1]))
        manifest = Manifest(Descriptor(MEDIA_OCI_CONFIG, image.id, len(config_bytes)),
                            [by_diff[d] for d in image.config.diff_ids], MEDIA_OCI_MANIFEST)
        data = serialize_manifest(manifest)
        digest = reg.put_manifest(dest.repository, dest.tag or "latest", data, MEDIA_OCI_MANIFEST)
    memo.record_image([f"{dest.name}@{digest}"], image.id)
    say(f"{dest.tag or 'latest'}: digest: {digest} size: {len(data)}")
    return digest


def _push_config(reg: Registry, dest: Reference, digest: str, data: bytes, say: _Say, chunk_size: int) -> None:
    if reg.blob_exists(dest.repository, digest):
        return
    reg.upload_blob(dest.repository, digest, len(data), data, chunk_size=chunk_size)


def _push_layer(store: Store, reg: Registry, dest: Reference, diff_id: str, compression: str, memo: BlobMemo,
                say: _Say, chunk_size: int) -> Descriptor:
    media = COMPRESSIONS[compression]
    repo, here = dest.repository, dest.name
    known = memo.forms(diff_id, compression)
    for k in known:
        if reg.blob_exists(repo, k.digest):
            say(f"{short_id(k.digest)}: Layer already exists")
            memo.record_blob(k.digest, k.size, diff_id, compression, here)
            return Descriptor(media, k.digest, k.size)
    location: str | None = None
    for k in known:
        for source in reversed(k.sources):
            src = parse_reference(source)
            if src.registry != dest.registry or src.repository == repo:
                continue
            location = reg.start_upload(repo, mount=k.digest, source=src.repository)
            if location is None:
                say(f"{short_id(k.digest)}: Mounted from {src.repository}")
                memo.record_blob(k.digest, k.size, diff_id, compression, here)
                return Descriptor(media, k.digest, k.size)
            break  # the registry would not mount it: upload into the session it opened
        if location is not None:
            break
    staging = store.temp_dir("push")
    try:
        blob = staging / "layer"
        say(f"{short_id(diff_id)}: Compressing ({compression})")
        digest, size = compress_layer(store, diff_id, compression, blob)
        memo.record_blob(digest, size, diff_id, compression, None)
        if not any(k.digest == digest for k in known) and reg.blob_exists(repo, digest):
            say(f"{short_id(digest)}: Layer already exists")
        else:
            say(f"{short_id(digest)}: Pushing {size} bytes")
            reg.upload_blob(repo, digest, size, blob, chunk_size=chunk_size, location=location)
            say(f"{short_id(digest)}: Pushed")
        memo.record_blob(digest, size, diff_id, compression, here)
        return Descriptor(media, digest, size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["Registry", "RemoteImage", "ManifestBlob", "BlobMemo", "KnownBlob", "pull", "push", "inspect_remote",
           "find_local", "check_login", "compress_layer", "is_insecure", "api_base", "parse_platform",
           "select_platform", "RetryPolicy", "COMPRESSIONS", "DEFAULT_CHUNK"]
