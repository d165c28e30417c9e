"""Image interchange: docker-archive and OCI archive tars in and out, and `import` of a rootfs tar.

Both writers emit an OCI image layout (oci-layout, index.json, blobs/sha256/);
the docker-archive adds manifest.json and repositories, as Docker 25+ saves,
which older `docker load` reads too since it only follows manifest.json paths.
"""
from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from grammar.errors import PybuildError

from .image import (
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, INDEX_TYPES, MEDIA_OCI_MANIFEST, Descriptor, HistoryEntry,
    ImageConfig, Index, Platform, canonical_json, digest_hex, format_time, host_platform,
    parse_config, parse_index, parse_manifest, parse_reference, serialize_index, sha256_digest,
)
from .store import Image, Store, decompressed

ConfigTweak = Callable[[ImageConfig], "ImageConfig | None"]

_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar")


@dataclass
class _Saved:
    image: Image
    names: list[str]  # full names the user asked to save it under


# --------------------------------------------------------------------------- save

def _select(store: Store, refs: Sequence[str | Image]) -> list[_Saved]:
    """Resolve refs; an image asked for by several names is saved once, with all of them."""
    out: dict[str, _Saved] = {}
    for ref in refs:
        if isinstance(ref, Image):
            image, name = ref, None
        else:
            found = store.resolve(ref)
            if found is None:
                raise PybuildError(f"image not found: {ref} (pybuild images lists what the store holds)")
            image, name = found
        saved = out.setdefault(image.id, _Saved(image, []))
        if name is not None and name not in saved.names:
            saved.names.append(name)
    if not out:
        raise PybuildError("no image to save: name at least one image")
    return list(out.values())


class _TarWriter:
    """Deterministic tar output: fixed owner, mode and mtime, each blob written once."""

    def __init__(self, out: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        self._seen: set[str] = set()

    def _info(self, name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mtime, info.uid, info.gid = kind, size, 0, 0, 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info

    def dir(self, name: str) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE))

    def file(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, size=len(data)), io.BytesIO(data))

    def blob(self, store: Store, digest: str) -> str:
        path = "blobs/sha256/" + digest_hex(digest)
        if path not in self._seen:
            self._seen.add(path)
            with store.open_blob(digest) as f:
                self._tar.addfile(self._info(path, size=store.blob_size(digest)), f)
        return path

    def close(self) -> None:
        self._tar.close()


def _write_layout(store: Store, saved: list[_Saved], out: BinaryIO, *, docker: bool) -> None:
    tw = _TarWriter(out)
    tw.dir("blobs")
    tw.dir("blobs/sha256")
    descriptors: list[Descriptor] = []
    entries: list[dict[str, object]] = []
    repositories: dict[str, dict[str, str]] = {}
    for s in saved:
        config_path = tw.blob(store, s.image.id)
        layer_paths = [tw.blob(store, d.digest) for d in s.image.manifest.layers]
        tw.blob(store, s.image.manifest_digest)
        size = store.blob_size(s.image.manifest_digest)
        platform = Platform(s.image.config.os, s.image.config.architecture, s.image.config.variant)
        for name in s.names or [None]:
            ann = {ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: name} if name else {}
            descriptors.append(Descriptor(MEDIA_OCI_MANIFEST, s.image.manifest_digest, size, ann, platform))
        familiar = [parse_reference(n).familiar for n in s.names]
        entries.append({"Config": config_path, "RepoTags": familiar or None, "Layers": layer_paths})
        for n in s.names:
            ref = parse_reference(n)
            if layer_paths and ref.tag:
                repositories.setdefault(ref.familiar_name, {})[ref.tag] = digest_hex(s.image.diff_ids[-1])
    tw.file("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    tw.file("index.json", serialize_index(Index(descriptors)))
    if docker:
        tw.file("manifest.json", json.dumps(entries, separators=(",", ":")).encode())
        if repositories:
            tw.file("repositories", canonical_json(repositories))
    tw.close()


def save_docker_archive(store: Store, refs: Sequence[str | Image], out: BinaryIO) -> None:
    """Write a tar `docker load` (and skopeo docker-archive:) reads; names become RepoTags."""
    _write_layout(store, _select(store, refs), out, docker=True)


def save_oci_archive(store: Store, refs: Sequence[str | Image], out: BinaryIO) -> None:
    """Write an OCI image layout tar; each name is a ref.name annotation (full name)."""
    _write_layout(store, _select(store, refs), out, docker=False)


# --------------------------------------------------------------------------- load

class _Archive:
    """Random access to a tar's members by normalised path, following links inside the archive."""

    def __init__(self, f: BinaryIO) -> None:
        try:
            self._tar = tarfile.open(fileobj=f, mode="r:")
            self._members = {self._norm(m.name): m for m in self._tar.getmembers()}
        except tarfile.TarError as e:
            raise PybuildError(f"not a tar archive ({e}): expected a docker-archive or OCI archive, "
                               "as `pybuild save` or `docker save` write") from None

    @staticmethod
    def _norm(name: str) -> str:
        path = posixpath.normpath("/" + name).lstrip("/")
        return path

    def has(self, name: str) -> bool:
        return self._norm(name) in self._members

    def open(self, name: str) -> BinaryIO:
        path = self._norm(name)
        for _ in range(16):
            member = self._members.get(path)
            if member is None:
                raise PybuildError(f"the archive lists {name} but does not contain it; the archive is incomplete")
            if member.issym():
                path = self._norm(posixpath.join(posixpath.dirname(path), member.linkname))
            elif member.islnk():
                path = self._norm(member.linkname)
            elif member.isreg():
                f = self._tar.extractfile(member)
                assert f is not None
                return f  # type: ignore[return-value]
            else:
                break
        raise PybuildError(f"{name} in the archive is not a regular file; the archive is damaged")

    def read(self, name: str, digest: str | None = None) -> bytes:
        with self.open(name) as f:
            data = f.read()
        if digest is not None and sha256_digest(data) != digest:
            raise PybuildError(f"{name} in the archive does not match its digest {digest}; the archive is damaged")
        return data

    def json(self, name: str) -> object:
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise PybuildError(f"{name} in the archive is not valid JSON ({e}); the archive is damaged") from None


def _seekable_tar(store: Store, stream: BinaryIO) -> tuple[BinaryIO, Path | None]:
    """The stream if it is a seekable plain tar, else a decompressed copy in a tmp/ dir (returned too)."""
    try:
        if stream.seekable():
            pos = stream.tell()
            magic = stream.read(6)
            stream.seek(pos)
            if not magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")):
                return stream, None
    except (OSError, AttributeError):
        pass
    spool_dir = store.temp_dir("load")
    f = open(spool_dir / "archive.tar", "w+b")
    shutil.copyfileobj(decompressed(stream), f, 1 << 20)
    f.seek(0)
    return f, spool_dir


def _store_image(store: Store, config_bytes: bytes, layers: list[tuple[Callable[[], BinaryIO], str | None]]) -> Image:
    """Add an image's layers (checked against its config's diff_ids) and then the image."""
    config = parse_config(config_bytes)
    if len(layers) != len(config.diff_ids):
        raise PybuildError(f"the archive has {len(layers)} layers for an image whose config lists "
                           f"{len(config.diff_ids)}; the archive is damaged")
    for (opener, digest), diff_id in zip(layers, config.diff_ids):
        if store.get_layer(diff_id) is not None:
            continue
        with opener() as f:
            store.add_layer_tar(f, diff_id=diff_id, digest=digest)
    return store.put_image(config_bytes)


def _load_docker(store: Store, ar: _Archive) -> list[str]:
    entries = ar.json("manifest.json")
    if not isinstance(entries, list):
        raise PybuildError("manifest.json in the archive is not a list; the archive is damaged")
    loaded: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise PybuildError("manifest.json in the archive has an entry without Config; the archive is damaged")
        config_path = entry["Config"]
        stem = posixpath.basename(config_path).removesuffix(".json")
        expected = f"sha256:{stem}" if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None
        config_bytes = ar.read(config_path, expected)
        layers = [(lambda p=p: ar.open(p), None) for p in entry.get("Layers") or []]
        image = _store_image(store, config_bytes, layers)
        names = [store.tag(image, t) for t in entry.get("RepoTags") or []]
        loaded.extend(names or [image.id])
    return loaded


def _names_from(desc: Descriptor) -> list[str]:
    """docker load reads io.containerd.image.name; a ref.name counts only when it is a full name."""
    name = desc.annotations.get(ANNOTATION_CONTAINERD_NAME)
    if name:
        return [name]
    ref = desc.annotations.get(ANNOTATION_REF_NAME, "")
    if "/" in ref or ":" in ref:
        try:
            return [str(parse_reference(ref))]
        except PybuildError:
            return []
    return []


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest_hex(digest)


def _pick_manifest(ar: _Archive, desc: Descriptor) -> Descriptor:
    """Follow nested indexes to this host's platform (a multi-platform save)."""
    host = host_platform()
    for _ in range(8):
        if desc.media_type not in INDEX_TYPES:
            return desc
        nested = parse_index(ar.read(_blob_path(desc.digest), desc.digest))
        fits = [d for d in nested.manifests if d.platform is None or
                (d.platform.os, d.platform.architecture) == (host.os, host.architecture)]
        exact = [d for d in fits if d.platform is not None and d.platform.variant == host.variant]
        if not fits:
            have = ", ".join(str(d.platform) for d in nested.manifests if d.platform) or "none"
            raise PybuildError(f"the archive has no image for this platform ({host}); it has: {have}")
        desc = (exact or fits)[0]
    raise PybuildError("the archive nests image indexes too deeply; the archive is damaged")


def _load_oci(store: Store, ar: _Archive) -> list[str]:
    index = parse_index(ar.read("index.json"))
    loaded: list[str] = []
    for top in index.manifests:
        desc = _pick_manifest(ar, top)
        manifest = parse_manifest(ar.read(_blob_path(desc.digest), desc.digest))
        config_bytes = ar.read(_blob_path(manifest.config.digest), manifest.config.digest)
        for layer in manifest.layers:
            if layer.media_type in _FOREIGN:
                raise PybuildError(f"layer {layer.digest} is a foreign layer the archive does not contain; "
                                   "pull the image from its registry instead")
        layers = [(lambda d=d: ar.open(_blob_path(d.digest)), d.digest) for d in manifest.layers]
        image = _store_image(store, config_bytes, layers)
        names = [store.tag(image, n) for n in _names_from(top)]
        loaded.extend(n for n in (names or [image.id]) if n not in loaded)
    return loaded


def load_archive(store: Store, stream: BinaryIO) -> list[str]:
    """Load a docker-archive or OCI archive (plain or compressed), verifying every digest.

    Returns the full names tagged, or the image id of each image that came without a name.
    """
    f, spool_dir = _seekable_tar(store, stream)
    try:
        ar = _Archive(f)
        if ar.has("manifest.json"):
            return _load_docker(store, ar)
        if ar.has("index.json"):
            return _load_oci(store, ar)
        raise PybuildError("the archive has neither manifest.json nor index.json: expected a docker-archive "
                           "or OCI archive, as `pybuild save` or `docker save` write")
    finally:
        if spool_dir is not None:
            f.close()
            shutil.rmtree(spool_dir)


# --------------------------------------------------------------------------- import

def import_rootfs(store: Store, tar_stream: BinaryIO, name: str | None = None, *, source: str = "-",
                  message: str = "", tweak: ConfigTweak | None = None, created: str | None = None) -> Image:
    """Like `docker import`: a one-layer image from a rootfs tar (plain or compressed).

    `tweak` gets the config to change (the caller's parsed --change); it may edit it
    in place or return a new one. `created` is an RFC 3339 time, now by default.
    """
    layer = store.add_layer_tar(tar_stream)
    host = host_platform()
    when = created or format_time()
    config = ImageConfig(architecture=host.architecture, os=host.os, variant=host.variant, created=when,
                         diff_ids=[layer.diff_id],
                         history=[HistoryEntry(created=when, comment=message or f"Imported from {source}")])
    if tweak is not None:
        config = tweak(config) or config
    image = store.put_image(config)
    if name is not None:
        image = dataclasses.replace(image, names=(store.tag(image, name),))
    return image


__all__ = ["save_docker_archive", "save_oci_archive", "load_archive", "import_rootfs", "ConfigTweak"]
