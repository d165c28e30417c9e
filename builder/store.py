"""The local image store: an OCI image layout plus unpacked layers, safe under crashes and concurrency.

Layout under the root (``/var/lib/pybuild`` by default)::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 every image: one manifest descriptor per tag
                               (org.opencontainers.image.ref.name = full name),
                               or one without annotations for an untagged image
    blobs/sha256/<hex>         configs, manifests, uncompressed layer tars
    layers/<diff-id hex>/      each layer unpacked once, overlay format (a lower dir)
    tmp/<pid>-<random>/        one process's staging area, same filesystem
    lock                       flock: exclusive for index updates and cleanup
    active                     flock: shared by every open store, so GC knows
                               whether another process may be using a layer

Crash safety: anything under a final name is complete. Blobs are written to
tmp/, fsynced, hashed while written, and renamed to their digest; layer dirs
are staged in tmp/ and renamed into layers/ (after their blob); index.json is
replaced by rename. A killed process leaves only its tmp/ subdir, removed by
the next open once that process's lock on it is gone.

Concurrency: blobs and layers are content-addressed, so racing writers of the
same content are harmless (the second rename finds the name taken and drops
its copy); index.json read-modify-write happens under the store lock.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import shutil
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from grammar.errors import PybuildError

from .image import (
    ANNOTATION_REF_NAME, MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER, MEDIA_OCI_MANIFEST, Descriptor, ImageConfig, Index,
    Manifest, Reference, canonical_json, digest_hex, parse_config, parse_index, parse_manifest, parse_reference,
    serialize_config, serialize_index, serialize_manifest, sha256_digest, short_id,
)

_CHUNK = 1 << 20
_NOT_FOUND_HINT = "pybuild images lists what the store holds"


def default_root() -> Path:
    """Where the store lives unless --root / PYBUILD_ROOT say otherwise (the caller checks those)."""
    if os.geteuid() == 0:
        return Path("/var/lib/pybuild")
    data = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "pybuild"


@dataclass(frozen=True)
class Layer:
    diff_id: str   # digest of the uncompressed tar, also its blob digest
    size: int      # bytes of that tar
    path: Path     # layers/<hex>: the unpacked layer, usable as an overlay lower dir


@dataclass(frozen=True)
class Image:
    id: str                      # sha256 of the config bytes, as Docker's image id
    manifest_digest: str
    config: ImageConfig
    manifest: Manifest
    names: tuple[str, ...] = ()  # full names: docker.io/library/app:1.0

    @property
    def short_id(self) -> str:
        return short_id(self.id)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.diff_ids)


@dataclass
class Removal:
    """What remove_image did, in the words `docker rmi` prints."""

    untagged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- streams

class BlobWriter:
    """A write-only file that hashes what it is given; see Store.blob_writer."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None  # set once committed

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._f.closed

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Reader(io.RawIOBase):
    """Base for the small read-only stream adapters below."""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _Hashing(_Reader):
    """Hashes every byte read through it (the compressed bytes of a layer blob)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        data = self._src.read(n if n is not None else -1)
        self.hash.update(data)
        return data


class _Tee(_Reader):
    """Copies what is read into a writer: the uncompressed layer tar into its blob."""

    def __init__(self, src: BinaryIO, sink: BlobWriter) -> None:
        self._src = src
        self._sink = sink

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        data = self._src.read(n)
        if data:
            self._sink.write(data)
        return data


def decompressed(stream: BinaryIO) -> BinaryIO:
    """The stream itself, or a decompressing reader if it starts with gzip/bzip2/xz/zstd magic."""
    from .tarstream import decompress

    return decompress(stream)[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    """Remove a tree, including dirs left unreadable (overlay's work/work is mode 000)."""
    def fix(func: Callable[..., object], p: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except FileNotFoundError:
            pass
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=fix)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _release(fds: list[int], tmp_dir: Path) -> None:
    """Finaliser: drop this process's staging dir and locks (also run at interpreter exit)."""
    _rmtree(tmp_dir) if tmp_dir.exists() else None
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- the store

class Store:
    """One process's handle on a store directory. Do not share it across fork()."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.keep: list[Callable[[], Iterable[str]]] = []  # more GC roots (a build cache's layers)
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._depth = 0
        self._manifests: dict[str, Manifest] = {}
        self._seq = 0
        try:
            for d in (self.root, self._blob_dir, self.root / "layers", self.root / "tmp"):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._active_fd = os.open(self.root / "active", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise PybuildError(f"cannot open the image store at {self.root}: {e.strerror}; "
                               "pass --root or set PYBUILD_ROOT to a writable directory") from None
        fcntl.flock(self._active_fd, fcntl.LOCK_SH)
        with self.lock():
            self._clean_tmp()
            self._tmp, tmp_fd = self._make_own_tmp()
            if not (self.root / "oci-layout").exists():
                self._write_file(self.root / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
            if not (self.root / "index.json").exists():
                self._write_file(self.root / "index.json", serialize_index(Index()))
        self._finalizer = weakref.finalize(self, _release, [tmp_fd, self._active_fd, self._lock_fd], self._tmp)

    @classmethod
    def open(cls, root: Path) -> Store:
        """Open (creating if needed) the store at root and clean up after dead processes."""
        return cls(root)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- locking, tmp

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The store-wide exclusive lock (re-entrant in this process); hold it briefly."""
        if os.getpid() != self._pid:
            raise RuntimeError("a Store cannot be used across fork(); open it again in the child")
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _clean_tmp(self) -> None:
        """Remove staging dirs of processes that are gone (their flock on .lock died with them)."""
        for entry in (self.root / "tmp").iterdir():
            lock_file = entry / ".lock"
            if entry.is_dir() and not entry.is_symlink() and lock_file.exists():
                try:
                    fd = os.open(lock_file, os.O_RDWR)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner is alive
                finally:
                    os.close(fd)
            _rmtree(entry)  # created and locked under the store lock, so no .lock means dead owner

    def _make_own_tmp(self) -> tuple[Path, int]:
        path = self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return path, fd

    def temp_dir(self, prefix: str = "dir") -> Path:
        """A fresh empty dir in this process's staging area (same filesystem as the store)."""
        with self._mutex:
            self._seq += 1
            path = self._tmp / f"{prefix}-{self._seq}-{secrets.token_hex(3)}"
        path.mkdir(mode=0o700)
        return path

    def make_work_dir(self) -> tuple[Path, Path]:
        """(upper, work) for one overlay mount; commit_layer_dir(upper) later consumes upper."""
        base = self.temp_dir("run")
        upper, work = base / "upper", base / "work"
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        return upper, work

    def _write_file(self, final: Path, data: bytes) -> None:
        """Replace final atomically: temp file in tmp/, fsync, rename, fsync the dir."""
        tmp = self._tmp / f"file-{secrets.token_hex(6)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    # ----------------------------------------------------------------- blobs

    @property
    def _blob_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    def blob_path(self, digest: str) -> Path:
        return self._blob_dir / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise self._missing(digest) from None

    @contextmanager
    def blob_writer(self, expected: str | None = None) -> Iterator[BlobWriter]:
        """Write a blob as a stream; on a clean exit it is fsynced, checked and stored under its digest.

        With `expected`, a different digest raises PybuildError and nothing is stored.
        The digest is on the writer (``w.digest``) after the block.
        """
        if expected is not None:
            digest_hex(expected)
        tmp = self._tmp / f"blob-{secrets.token_hex(6)}"
        f = open(tmp, "wb")
        writer = BlobWriter(f)
        try:
            yield writer
            f.flush()
            os.fsync(f.fileno())
            f.close()
            digest = "sha256:" + writer.hexdigest()
            if expected is not None and digest != expected:
                raise PybuildError(f"content does not match its digest: expected {expected}, got {digest}; "
                                   "the source is damaged or was changed, fetch it again")
            self._commit_blob_file(tmp, digest)
            writer.digest = digest
        finally:
            if not f.closed:
                f.close()
            if tmp.exists():
                tmp.unlink()

    def _commit_blob_file(self, tmp: Path, digest: str) -> None:
        final = self.blob_path(digest)
        if final.exists():
            return  # same content already there (content-addressed): keep it
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        """Store bytes; returns their digest."""
        digest = sha256_digest(data)
        if self.has_blob(digest) and (expected is None or expected == digest):
            return digest
        with self.blob_writer(expected) as w:
            w.write(data)
        assert w.digest is not None
        return w.digest

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise self._missing(digest) from None

    def read_blob(self, digest: str) -> bytes:
        """A small blob's bytes, checked against its digest."""
        with self.open_blob(digest) as f:
            data = f.read()
        if sha256_digest(data) != digest:
            raise PybuildError(f"blob {digest} in {self.root} is corrupt; remove the image using it and "
                               "pull or build it again")
        return data

    def verify_blob(self, digest: str) -> bool:
        """Re-hash a stored blob: False if missing or damaged."""
        h = hashlib.sha256()
        try:
            with open(self.blob_path(digest), "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + h.hexdigest() == digest

    def _missing(self, digest: str) -> PybuildError:
        return PybuildError(f"blob {digest} is missing from the store at {self.root}; remove the image "
                            "using it and pull or build it again")

    # ----------------------------------------------------------------- layers

    def layer_path(self, diff_id: str) -> Path | None:
        """The unpacked layer dir, or None if the store does not have it."""
        path = self.root / "layers" / digest_hex(diff_id)
        return path if path.is_dir() else None

    def get_layer(self, diff_id: str) -> Layer | None:
        path = self.layer_path(diff_id)
        if path is None or not self.has_blob(diff_id):
            return None
        return Layer(diff_id, self.blob_size(diff_id), path)

    def commit_layer_dir(self, upper_dir: Path, *, clamp_mtime: int | None = None) -> Layer:
        """Make a layer of an overlay upper dir: tar it into a blob, then move the dir into layers/.

        The dir is consumed: renamed into place, or deleted if the layer exists already.
        It should come from make_work_dir (same filesystem); otherwise it is re-unpacked from the tar.
        """
        from . import snapshot
        with self.blob_writer() as w:
            info = snapshot.write_layer_tar(Path(upper_dir), w, clamp_mtime=clamp_mtime)  # type: ignore[arg-type]
        assert w.digest is not None
        if info.diff_id != w.digest:
            raise RuntimeError(f"snapshot digest {info.diff_id} differs from the bytes written ({w.digest})")
        return self._install_layer_dir(Path(upper_dir), w.digest)

    def add_layer_tar(self, stream: BinaryIO, *, diff_id: str | None = None, digest: str | None = None) -> Layer:
        """Store a layer from a tar stream (gzip/bzip2/xz/zstd or plain): its uncompressed blob and dir.

        `diff_id` (of the uncompressed tar) and `digest` (of the bytes as given) are
        checked when passed; a mismatch raises PybuildError and stores nothing.
        A layer already present by `diff_id` is returned without reading the stream.
        """
        if diff_id is not None and (known := self.get_layer(diff_id)) is not None:
            return known
        from .unpack import unpack_layer_tar
        staging = self.temp_dir("layer")
        try:
            raw = _Hashing(stream)
            plain = decompressed(raw)  # type: ignore[arg-type]
            (staging / "root").mkdir(mode=0o755)
            with self.blob_writer(expected=diff_id) as w:
                tee = _Tee(plain, w)
                unpack_layer_tar(tee, staging / "root")  # type: ignore[arg-type]
                tee.drain()  # tar readers may stop at the end-of-archive marker; the blob needs all bytes
                raw.drain()
                if digest is not None and "sha256:" + raw.hash.hexdigest() != digest:
                    raise PybuildError(f"layer blob does not match its digest {digest}; the archive or "
                                       "registry sent damaged data, fetch it again")
            assert w.digest is not None
            return self._install_layer_dir(staging / "root", w.digest)
        finally:
            _rmtree(staging)

    def _install_layer_dir(self, src: Path, diff_id: str) -> Layer:
        """Rename src to layers/<hex> (the commit point); if another writer won, drop ours."""
        final = self.root / "layers" / digest_hex(diff_id)
        if final.exists():
            _rmtree(src)
        else:
            try:
                os.rename(src, final)
                _fsync_dir(final.parent)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    _rmtree(src)  # lost a race with an identical layer
                elif e.errno == errno.EXDEV:
                    _rmtree(src)
                    self._restore_layer_dir(diff_id)
                else:
                    raise
        return Layer(diff_id, self.blob_size(diff_id), final)

    def _restore_layer_dir(self, diff_id: str) -> Path:
        """Unpack a layer dir from its blob (after EXDEV, or if the dir was lost)."""
        from .unpack import unpack_layer_tar
        staging = self.temp_dir("layer")
        try:
            (staging / "root").mkdir(mode=0o755)
            with self.open_blob(diff_id) as f:
                unpack_layer_tar(f, staging / "root")
            final = self.root / "layers" / digest_hex(diff_id)
            try:
                os.rename(staging / "root", final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            return final
        finally:
            _rmtree(staging)

    def layer_dirs(self, image: Image) -> list[Path]:
        """The image's layer dirs, bottom first (overlay wants lowerdir top first: reverse it)."""
        out = []
        for diff_id in image.config.diff_ids:
            path = self.layer_path(diff_id)
            if path is None:
                if not self.has_blob(diff_id):
                    raise PybuildError(f"layer {diff_id} of image {image.short_id} is missing from the store; "
                                       "remove the image and pull or build it again")
                path = self._restore_layer_dir(diff_id)
            out.append(path)
        return out

    # ----------------------------------------------------------------- index.json

    def _read_index(self) -> Index:
        try:
            return parse_index((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return Index()

    def _write_index(self, ix: Index) -> None:
        self._write_file(self.root / "index.json", serialize_index(ix))

    def _manifest(self, digest: str) -> Manifest:
        m = self._manifests.get(digest)
        if m is None:
            m = self._manifests[digest] = parse_manifest(self.read_blob(digest))
        return m

    def _image(self, manifest_digest: str, names: Iterable[str]) -> Image:
        m = self._manifest(manifest_digest)
        config = parse_config(self.read_blob(m.config.digest))
        return Image(m.config.digest, manifest_digest, config, m, tuple(names))

    def _grouped(self, ix: Index) -> dict[str, list[str]]:
        """manifest digest -> its names, in index order."""
        out: dict[str, list[str]] = {}
        for d in ix.manifests:
            names = out.setdefault(d.digest, [])
            name = d.annotations.get(ANNOTATION_REF_NAME)
            if name:
                names.append(name)
        return out

    @staticmethod
    def _descriptor(manifest_digest: str, size: int, name: str | None) -> Descriptor:
        return Descriptor(MEDIA_OCI_MANIFEST, manifest_digest, size, {ANNOTATION_REF_NAME: name} if name else {})

    # ----------------------------------------------------------------- images

    def put_image(self, config: ImageConfig | bytes) -> Image:
        """Store a config (serialised canonically, or exact bytes as loaded) and its manifest.

        Every layer in config.diff_ids must be in the store already. The image is
        listed untagged until tag() names it.
        """
        config_bytes = serialize_config(config) if isinstance(config, ImageConfig) else bytes(config)
        parsed = parse_config(config_bytes)
        layers = []
        for diff_id in parsed.diff_ids:
            if not self.has_blob(diff_id):
                raise PybuildError(f"layer {diff_id} is not in the store; load or build it before the image")
            layers.append(Descriptor(MEDIA_OCI_LAYER, diff_id, self.blob_size(diff_id)))
        config_digest = self.put_blob(config_bytes)
        manifest = Manifest(Descriptor(MEDIA_OCI_CONFIG, config_digest, len(config_bytes)), layers)
        manifest_bytes = serialize_manifest(manifest)
        manifest_digest = self.put_blob(manifest_bytes)
        with self.lock():
            ix = self._read_index()
            names = self._grouped(ix).get(manifest_digest)
            if names is None:
                ix.manifests.append(self._descriptor(manifest_digest, len(manifest_bytes), None))
                self._write_index(ix)
                names = []
        return Image(config_digest, manifest_digest, parsed, manifest, tuple(names))

    def images(self) -> list[Image]:
        """Every image in the store, in the order first stored; damaged entries are skipped."""
        out = []
        for digest, names in self._grouped(self._read_index()).items():
            try:
                out.append(self._image(digest, names))
            except PybuildError:
                continue
        return out

    def find_image(self, ref_or_id: str) -> Image | None:
        found = self.resolve(ref_or_id)
        return found[0] if found else None

    def get_image(self, ref_or_id: str | Image) -> Image:
        """By name[:tag], name@digest, image id (full or a unique prefix of 4+ hex), or manifest digest."""
        if isinstance(ref_or_id, Image):
            return ref_or_id
        found = self.resolve(ref_or_id)
        if found is None:
            raise PybuildError(f"image not found: {ref_or_id} ({_NOT_FOUND_HINT})")
        return found[0]

    def resolve(self, text: str) -> tuple[Image, str | None] | None:
        """(image, the full name it was found by, or None when found by id or digest); None if absent."""
        text = text.strip()
        groups = self._grouped(self._read_index())
        if text.startswith("sha256:") and re.fullmatch(r"[0-9a-f]{4,64}", text[7:]):
            return self._by_id(groups, text[7:], prefix=len(text) < 71)
        ref: Reference | None = None
        try:
            ref = parse_reference(text)
        except PybuildError:
            if not re.fullmatch(r"[0-9a-f]{4,64}", text):
                raise
        if ref is not None:
            if ref.digest is not None:  # name@digest: the digest alone decides, as it pins the content
                if ref.digest in groups:
                    return self._image(ref.digest, groups[ref.digest]), None
            else:
                full = str(ref)
                for digest, names in groups.items():
                    if full in names:
                        return self._image(digest, names), full
        if re.fullmatch(r"[0-9a-f]{4,64}", text):
            return self._by_id(groups, text, prefix=True)
        return None

    def _by_id(self, groups: dict[str, list[str]], hexpart: str, *, prefix: bool) -> tuple[Image, None] | None:
        matches: dict[str, str] = {}  # image id -> manifest digest
        for digest in groups:
            config_digest = self._manifest(digest).config.digest
            if config_digest[7:].startswith(hexpart) if prefix else config_digest[7:] == hexpart:
                matches.setdefault(config_digest, digest)
            elif not prefix and digest[7:] == hexpart:
                matches.setdefault(config_digest, digest)
        if len(matches) > 1:
            raise PybuildError(f"image id prefix {hexpart} is ambiguous ({len(matches)} images match); "
                               "give more digits")
        if not matches:
            return None
        (digest,) = matches.values()
        # one config can sit behind several manifests: merge their names
        names = [n for d, ns in groups.items() if self._manifest(d).config.digest == next(iter(matches))
                 for n in ns]
        return self._image(digest, names), None

    def tag(self, image: Image | str, name: str) -> str:
        """Point name (normalised, tag defaults to latest) at image; returns the full name."""
        target = self.get_image(image)
        ref = parse_reference(name)
        if ref.digest is not None:
            raise PybuildError(f"cannot tag {name!r}: a tag name cannot contain a digest; use name:tag")
        full = str(ref)
        size = self.blob_size(target.manifest_digest)
        with self.lock():
            ix = self._read_index()
            previous = [d.digest for d in ix.manifests if d.annotations.get(ANNOTATION_REF_NAME) == full]
            kept = [d for d in ix.manifests if d.annotations.get(ANNOTATION_REF_NAME) != full
                    and not (d.digest == target.manifest_digest and not d.annotations)]
            kept.append(self._descriptor(target.manifest_digest, size, full))
            self._keep_listed(kept, previous, ix)
            self._write_index(Index(kept, ix.annotations))
        return full

    def untag(self, name: str) -> str:
        """Remove one name; the image stays (untagged) until remove_image. Returns the full name."""
        full = str(parse_reference(name))
        with self.lock():
            ix = self._read_index()
            hit = [d for d in ix.manifests if d.annotations.get(ANNOTATION_REF_NAME) == full]
            if not hit:
                raise PybuildError(f"image not found: {name} ({_NOT_FOUND_HINT})")
            kept = [d for d in ix.manifests if d.annotations.get(ANNOTATION_REF_NAME) != full]
            self._keep_listed(kept, [d.digest for d in hit], ix)
            self._write_index(Index(kept, ix.annotations))
        return full

    @staticmethod
    def _keep_listed(kept: list[Descriptor], digests: list[str], old: Index) -> None:
        """An image that lost its last name stays listed untagged, as Docker's <none> images."""
        for digest in digests:
            if not any(d.digest == digest for d in kept):
                size = next(d.size for d in old.manifests if d.digest == digest)
                kept.append(Descriptor(MEDIA_OCI_MANIFEST, digest, size))

    def remove_image(self, ref_or_id: str, *, force: bool = False) -> Removal:
        """Like `docker rmi`: by a name, drop that name (the image too if it was the last);
        by id, drop the image (with force, even if it has several names).

        Blobs and layer dirs no remaining image (nor a `keep` hook) needs are deleted,
        but only while no other process has the store open: else a later gc() does it.
        """
        found = self.resolve(ref_or_id)
        if found is None:
            raise PybuildError(f"image not found: {ref_or_id} ({_NOT_FOUND_HINT})")
        image, by_name = found
        removal = Removal()
        if by_name is not None and len(image.names) > 1:
            removal.untagged.append(self.untag(by_name))
            return removal
        if by_name is None and len(image.names) > 1 and not force:
            raise PybuildError(f"image {image.short_id} has several names ({', '.join(image.names)}): remove "
                               "them one by one, or force to remove the image and every name")
        with self.lock():
            ix = self._read_index()
            gone = {d.digest for d in ix.manifests if self._manifest(d.digest).config.digest == image.id}
            removal.untagged = [d.annotations[ANNOTATION_REF_NAME] for d in ix.manifests
                                if d.digest in gone and ANNOTATION_REF_NAME in d.annotations]
            self._write_index(Index([d for d in ix.manifests if d.digest not in gone], ix.annotations))
            candidates = set(gone) | {image.id} | set(image.config.diff_ids)
            removal.deleted = self._collect(candidates)
        return removal

    def gc(self) -> list[str]:
        """Delete every blob and layer dir no image or keep hook references (a prune)."""
        with self.lock():
            candidates = {"sha256:" + p.name for p in self._blob_dir.iterdir()}
            candidates |= {"sha256:" + p.name for p in (self.root / "layers").iterdir()}
            return self._collect(candidates)

    def _referenced(self) -> set[str]:
        refs: set[str] = set()
        for digest in self._grouped(self._read_index()):
            m = self._manifest(digest)
            refs.add(digest)
            refs.add(m.config.digest)
            refs.update(d.digest for d in m.layers)
            try:
                refs.update(parse_config(self.read_blob(m.config.digest)).diff_ids)
            except PybuildError:
                pass
        for hook in self.keep:
            refs.update(hook())
        return refs

    def _collect(self, candidates: set[str]) -> list[str]:
        """Delete unreferenced candidates (called under the lock); nothing if others have the store open."""
        if not self._sole_user():
            return []
        try:
            doomed = sorted(c for c in candidates - self._referenced() if re.fullmatch(r"sha256:[0-9a-f]{64}", c))
            trash = self.temp_dir("trash")
            for digest in doomed:
                layer = self.root / "layers" / digest[7:]
                if layer.exists():  # the dir goes first: a layer dir implies its blob
                    os.rename(layer, trash / digest[7:])
                blob = self.blob_path(digest)
                if blob.exists():
                    blob.unlink()
                self._manifests.pop(digest, None)
            _rmtree(trash)
            return doomed
        finally:
            fcntl.flock(self._active_fd, fcntl.LOCK_SH)

    def _sole_user(self) -> bool:
        """Upgrade our shared hold on `active` to exclusive: only possible if no other store is open.

        flock conversion is not atomic (a failed upgrade may drop our shared lock),
        so the caller re-takes LOCK_SH; the store lock keeps other collectors out meanwhile.
        """
        try:
            fcntl.flock(self._active_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            fcntl.flock(self._active_fd, fcntl.LOCK_SH)
            return False
