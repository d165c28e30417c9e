"""Image metadata: the Docker/OCI config, OCI manifest and index, image references.

Pure data and (de)serialisers, no I/O. Config keys keep Docker's spelling
(``Healthcheck``, ``Shell``, ``OnBuild``) so `docker load` reads everything
back. Serialisation is canonical (sorted keys, compact separators): the same
config always gives the same bytes, hence the same image id.
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform as _platform
import re
import time
from decimal import Decimal
from dataclasses import dataclass, field
from typing import Any

from grammar.errors import PybuildError

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = MEDIA_OCI_LAYER + "+gzip"
MEDIA_OCI_LAYER_ZSTD = MEDIA_OCI_LAYER + "+zstd"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"  # what docker load reads from OCI archives

EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"  # 1024 zero bytes


# --------------------------------------------------------------------------- digests

_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` digest; anything else is refused.

    Digests become file names in the store, so this is also the guard against
    path tricks in archives and manifests from elsewhere.
    """
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise PybuildError(f"invalid digest {digest!r}: expected sha256: followed by 64 lowercase hex digits")
    return hexpart


def short_id(digest: str) -> str:
    """The 12-hex form `docker images` shows."""
    return digest.partition(":")[2][:12]


# --------------------------------------------------------------------------- time

def format_time(epoch: float | None = None) -> str:
    """RFC 3339 UTC as Go prints time.Time: whole seconds, a fraction only when non-zero."""
    ns = time.time_ns() if epoch is None else int(Decimal(repr(epoch)) * 1_000_000_000)
    whole, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------- platform

_ARCH = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """The platform of this machine in Go's GOOS/GOARCH names."""
    machine = _platform.machine().lower()
    arch, variant = _ARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


# --------------------------------------------------------------------------- config

@dataclass
class Healthcheck:
    """HEALTHCHECK; durations are nanoseconds as Go's time.Duration. test ["NONE"] disables."""

    test: list[str] = field(default_factory=list)
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass
class ContainerConfig:
    """The ``config`` object: what a container started from the image gets.

    None means "not set" (omitted from JSON, a later stage may inherit), an
    empty list means "explicitly empty" (``ENTRYPOINT []``).
    """

    user: str = ""
    env: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""
    healthcheck: Healthcheck | None = None
    shell: list[str] | None = None
    on_build: list[str] = field(default_factory=list)
    args_escaped: bool = False


@dataclass
class HistoryEntry:
    created: str = ""
    created_by: str = ""
    author: str = ""
    comment: str = ""
    empty_layer: bool = False


@dataclass
class ImageConfig:
    """The image config JSON; its sha256 is the image id."""

    architecture: str = ""
    os: str = "linux"
    variant: str = ""
    os_version: str = ""
    os_features: list[str] = field(default_factory=list)
    created: str = ""
    author: str = ""
    config: ContainerConfig = field(default_factory=ContainerConfig)
    diff_ids: list[str] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)

    def copy(self) -> ImageConfig:
        """A deep copy to change for the next build step."""
        return copy.deepcopy(self)


def canonical_json(obj: Any) -> bytes:
    """The one byte form used for everything this store hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _healthcheck_to_dict(h: Healthcheck) -> dict[str, Any]:
    out: dict[str, Any] = {"Test": list(h.test)}
    for key, value in (("Interval", h.interval), ("Timeout", h.timeout), ("StartPeriod", h.start_period),
                       ("StartInterval", h.start_interval), ("Retries", h.retries)):
        if value:
            out[key] = value
    return out


def _container_config_to_dict(c: ContainerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.user:
        out["User"] = c.user
    if c.exposed_ports:
        out["ExposedPorts"] = {p: {} for p in c.exposed_ports}
    if c.env:
        out["Env"] = list(c.env)
    if c.entrypoint is not None:
        out["Entrypoint"] = list(c.entrypoint)
    if c.cmd is not None:
        out["Cmd"] = list(c.cmd)
    if c.healthcheck is not None:
        out["Healthcheck"] = _healthcheck_to_dict(c.healthcheck)
    if c.args_escaped:
        out["ArgsEscaped"] = True
    if c.volumes:
        out["Volumes"] = {v: {} for v in c.volumes}
    if c.working_dir:
        out["WorkingDir"] = c.working_dir
    if c.labels:
        out["Labels"] = dict(c.labels)
    if c.on_build:
        out["OnBuild"] = list(c.on_build)
    if c.stop_signal:
        out["StopSignal"] = c.stop_signal
    if c.shell is not None:
        out["Shell"] = list(c.shell)
    return out


def _history_to_dict(h: HistoryEntry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (("created", h.created), ("created_by", h.created_by), ("author", h.author),
                       ("comment", h.comment)):
        if value:
            out[key] = value
    if h.empty_layer:
        out["empty_layer"] = True
    return out


def config_to_dict(cfg: ImageConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"architecture": cfg.architecture, "os": cfg.os}
    if cfg.variant:
        out["variant"] = cfg.variant
    if cfg.os_version:
        out["os.version"] = cfg.os_version
    if cfg.os_features:
        out["os.features"] = list(cfg.os_features)
    if cfg.created:
        out["created"] = cfg.created
    if cfg.author:
        out["author"] = cfg.author
    out["config"] = _container_config_to_dict(cfg.config)
    out["rootfs"] = {"type": "layers", "diff_ids": list(cfg.diff_ids)}
    if cfg.history:
        out["history"] = [_history_to_dict(h) for h in cfg.history]
    return out


def serialize_config(cfg: ImageConfig) -> bytes:
    return canonical_json(config_to_dict(cfg))


def image_id(config_bytes: bytes) -> str:
    """Docker's image id: the digest of the exact config bytes."""
    return sha256_digest(config_bytes)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise PybuildError(f"{what} is not valid JSON ({e}); the image is damaged, pull or build it again") from None
    if not isinstance(obj, dict):
        raise PybuildError(f"{what} is not a JSON object; the image is damaged, pull or build it again")
    return obj


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _opt_str_list(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def _keys(value: Any) -> list[str]:
    return sorted(value) if isinstance(value, dict) else []


def _parse_healthcheck(h: Any) -> Healthcheck | None:
    if not isinstance(h, dict):
        return None
    return Healthcheck(
        test=_str_list(h.get("Test")), interval=int(h.get("Interval") or 0), timeout=int(h.get("Timeout") or 0),
        start_period=int(h.get("StartPeriod") or 0), start_interval=int(h.get("StartInterval") or 0),
        retries=int(h.get("Retries") or 0))


def _parse_container_config(c: Any) -> ContainerConfig:
    if not isinstance(c, dict):
        return ContainerConfig()
    labels = c.get("Labels")
    return ContainerConfig(
        user=str(c.get("User") or ""), env=_str_list(c.get("Env")),
        entrypoint=_opt_str_list(c.get("Entrypoint")), cmd=_opt_str_list(c.get("Cmd")),
        working_dir=str(c.get("WorkingDir") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        exposed_ports=_keys(c.get("ExposedPorts")), volumes=_keys(c.get("Volumes")),
        stop_signal=str(c.get("StopSignal") or ""), healthcheck=_parse_healthcheck(c.get("Healthcheck")),
        shell=_opt_str_list(c.get("Shell")), on_build=_str_list(c.get("OnBuild")),
        args_escaped=bool(c.get("ArgsEscaped")))


def parse_config(data: bytes) -> ImageConfig:
    """Read an image config; unknown keys (``container_config``...) are dropped."""
    obj = _load_json(data, "image config")
    rootfs = obj.get("rootfs") if isinstance(obj.get("rootfs"), dict) else {}
    diff_ids = _str_list(rootfs.get("diff_ids"))
    for d in diff_ids:
        digest_hex(d)
    history = [
        HistoryEntry(created=str(h.get("created") or ""), created_by=str(h.get("created_by") or ""),
                     author=str(h.get("author") or ""), comment=str(h.get("comment") or ""),
                     empty_layer=bool(h.get("empty_layer")))
        for h in obj.get("history") or [] if isinstance(h, dict)]
    return ImageConfig(
        architecture=str(obj.get("architecture") or ""), os=str(obj.get("os") or ""),
        variant=str(obj.get("variant") or ""), os_version=str(obj.get("os.version") or ""),
        os_features=_str_list(obj.get("os.features")), created=str(obj.get("created") or ""),
        author=str(obj.get("author") or ""),
        # Docker's own configs carry the runtime config under "config"; very old ones only
        # under "container_config", which is what a container from them actually got.
        config=_parse_container_config(obj.get("config") if obj.get("config") is not None
                                       else obj.get("container_config")),
        diff_ids=diff_ids, history=history)


# --------------------------------------------------------------------------- manifest, index

@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None


@dataclass
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = MEDIA_OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Index:
    manifests: list[Descriptor] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


def descriptor_to_dict(d: Descriptor) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    if d.platform is not None:
        p: dict[str, Any] = {"architecture": d.platform.architecture, "os": d.platform.os}
        if d.platform.variant:
            p["variant"] = d.platform.variant
        out["platform"] = p
    return out


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict) or not isinstance(obj.get("digest"), str):
        raise PybuildError(f"{what}: descriptor without a digest; the image is damaged, pull or build it again")
    digest_hex(obj["digest"])
    size = obj.get("size")
    if not isinstance(size, int) or size < 0:
        raise PybuildError(f"{what}: descriptor {obj['digest']} has no valid size; the image is damaged")
    p = obj.get("platform")
    plat = Platform(str(p.get("os") or ""), str(p.get("architecture") or ""), str(p.get("variant") or "")) \
        if isinstance(p, dict) else None
    ann = obj.get("annotations")
    return Descriptor(str(obj.get("mediaType") or ""), obj["digest"], size,
                      {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}, plat)


def serialize_manifest(m: Manifest) -> bytes:
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": m.media_type,
                           "config": descriptor_to_dict(m.config),
                           "layers": [descriptor_to_dict(d) for d in m.layers]}
    if m.annotations:
        out["annotations"] = dict(m.annotations)
    return canonical_json(out)


def parse_manifest(data: bytes) -> Manifest:
    """An OCI or Docker schema 2 image manifest (not an index: see parse_index)."""
    obj = _load_json(data, "image manifest")
    media = str(obj.get("mediaType") or MEDIA_OCI_MANIFEST)
    if obj.get("schemaVersion") != 2 or media not in MANIFEST_TYPES:
        raise PybuildError(f"unsupported manifest (schemaVersion {obj.get('schemaVersion')!r}, mediaType {media!r}): "
                           "only OCI and Docker schema 2 image manifests are supported")
    layers = obj.get("layers") if isinstance(obj.get("layers"), list) else []
    ann = obj.get("annotations")
    return Manifest(parse_descriptor(obj.get("config"), "manifest config"),
                    [parse_descriptor(d, "manifest layer") for d in layers], media,
                    {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {})


def serialize_index(ix: Index) -> bytes:
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
                           "manifests": [descriptor_to_dict(d) for d in ix.manifests]}
    if ix.annotations:
        out["annotations"] = dict(ix.annotations)
    return canonical_json(out)


def parse_index(data: bytes) -> Index:
    obj = _load_json(data, "image index")
    if obj.get("schemaVersion") != 2:
        raise PybuildError(f"unsupported image index schemaVersion {obj.get('schemaVersion')!r}: expected 2")
    mans = obj.get("manifests") if isinstance(obj.get("manifests"), list) else []
    ann = obj.get("annotations")
    return Index([parse_descriptor(d, "index entry") for d in mans],
                 {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {})


# --------------------------------------------------------------------------- references

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_NAME_MAX = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"({_DOMAIN})/({_COMPONENT}(?:/{_COMPONENT})*)(?::({_TAG}))?(?:@({_DIGEST}))?")
_FORMAT_HINT = ("expected [registry[:port]/]name[:tag][@sha256:<64 hex>], name parts made of lowercase "
                "letters, digits and single . _ or - separators, a tag of at most 128 letters, digits, . _ -")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``busybox`` is docker.io/library/busybox:latest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The short form Docker shows: busybox, not docker.io/library/busybox."""
        if self.registry != DEFAULT_REGISTRY:
            return self.name
        repo = self.repository
        if repo.startswith("library/") and repo.count("/") == 1:
            repo = repo[len("library/"):]
        return repo

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def familiar(self) -> str:
        return self.familiar_name + self._suffix()

    def __str__(self) -> str:
        return self.name + self._suffix()


def _invalid(text: str, why: str) -> PybuildError:
    return PybuildError(f"invalid image reference {text!r}: {why}")


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise as Docker does; the tag defaults to latest unless a digest is given."""
    if not text:
        raise _invalid(text, "it is empty; " + _FORMAT_HINT)
    if re.fullmatch(r"[0-9a-f]{64}", text):
        raise _invalid(text, "a 64-hex string is an image id, not a name; choose another name")
    slash = text.find("/")
    head = text[:slash] if slash >= 0 else ""
    if slash < 0 or (not any(c in head for c in ".:") and head != "localhost" and head.lower() == head):
        domain, rest = DEFAULT_REGISTRY, text
    else:
        domain, rest = head, text[slash + 1:]
    if domain == "index.docker.io":
        domain = DEFAULT_REGISTRY
    repo_part = rest.split("@", 1)[0]
    last = repo_part.rsplit("/", 1)[-1]
    repo_only = repo_part[: len(repo_part) - len(last)] + last.split(":", 1)[0]
    if repo_only.lower() != repo_only:
        raise _invalid(text, f"repository name must be lowercase (try {text.lower()!r})")
    if domain == DEFAULT_REGISTRY and "/" not in repo_only:
        rest = "library/" + rest
    full = f"{domain}/{rest}"
    m = _REFERENCE.fullmatch(full)
    if not m:
        raise _invalid(text, _FORMAT_HINT)
    registry, repository, tag, digest = m.groups()
    if len(f"{registry}/{repository}") > _NAME_MAX:
        raise _invalid(text, f"the name is longer than {_NAME_MAX} characters")
    if digest is not None:
        algo, _, hexpart = digest.partition(":")
        if _DIGEST_HEX.get(algo) != len(hexpart) or hexpart.lower() != hexpart:
            raise _invalid(text, "a digest must be sha256:<64 lowercase hex> (or sha384/sha512)")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)
