"""Side by side with Docker: the examples built by pybuild and by `docker build` (BuildKit).

Both tools start from the very same base image: the busybox rootfs of conftest.py,
`pybuild import`ed as pybuild-compat/busybox:latest (with Docker Hub busybox's config:
ENV PATH, CMD ["sh"]) and handed to docker with `pybuild save` + `docker load` (same
bytes, same image id). Each example's context is copied and its `FROM busybox` lines
point at that image, so a user's own `busybox` image in docker is never touched. Every
example (and each variant of its expect.json) is compared twice:

- config: the image config's `config` (Env as a set, Cmd, Entrypoint, WorkingDir, User,
  ExposedPorts, Volumes, Labels, StopSignal, Healthcheck, Shell, OnBuild; None, [], {}
  and missing are equal), and, for each tool, one non-empty history entry per layer;
- files: `docker create` + `docker export` against pybuild's saved layers applied in
  order (whiteouts and opaque dirs included), as (path, type, mode, uid, gid, size,
  sha256, link target). mtimes are ignored, and so are the files docker adds to every
  container (/.dockerenv, /etc/hosts, /etc/hostname, /etc/resolv.conf, /dev, /proc, /sys).

The number of layers is not compared: BuildKit 20.10 commits a layer for every WORKDIR
and keeps the layer of a RUN that changed nothing, pybuild does neither. Differences
from BuildKit that are real are strict xfails (KNOWN_*), matched exactly.

Skips with the reason when no docker daemon answers or no client builds with BuildKit.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import pybuild

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "Dockerfiles"
SPECS = {p.parent.name: json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*/expect.json"))}
TAGS = {spec["tag"]: name for name, spec in SPECS.items()}
PREFIX = "pybuild-compat"
BASE = f"{PREFIX}/busybox:latest"          # what the examples' `FROM busybox` becomes
RAW_BASE = f"{PREFIX}/busybox-rootfs:latest"  # the same rootfs with an empty config
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Examples docker's built-in (20.10) BuildKit frontend cannot build without a `# syntax=` line.
EXCLUDED = {
    "heredocs": "heredocs need the docker/dockerfile:1.4+ frontend (a `# syntax=` line, so Docker Hub)",
}

# Real differences from BuildKit, kept visible as strict xfails (a fix turns them into XPASS failures).
# Each lists the exact differences the test reports: anything else (another difference, a failed
# build) fails for real instead of hiding behind the xfail.
_ROOT_DIR = "('dir', '0755', 0, 0, 0, None, None)"
KNOWN_CONFIG_DIFFERENCES: dict[str, tuple[str, set[str]]] = {}
KNOWN_FS_DIFFERENCES = {
    "run-mounts": (
        "BuildKit leaves the RUN --mount targets it had to create as empty dirs in the image "
        "(/mnt, /mnt/tools, /var/cache, /var/cache/demo, 0755 root:root); pybuild leaves nothing",
        {f"{d}: only in docker {_ROOT_DIR}" for d in ("/mnt", "/mnt/tools", "/var/cache", "/var/cache/demo")}),
}


class KnownDifference(AssertionError):
    """Exactly the differences a KNOWN_* entry describes (what the strict xfail expects)."""


def check(problems: list[str], known: tuple[str, set[str]] | None, header: str) -> None:
    message = header + "\n  " + "\n  ".join(problems[:30])
    if known is not None and set(problems) == known[1]:
        raise KnownDifference(message)
    assert not problems, message


def cases(known: dict[str, tuple[str, set[str]]] | None = None) -> list:
    """(example, tag, build args, target) for each example and each of its variants."""
    out = []
    for name, spec in SPECS.items():
        if name in EXCLUDED:
            continue
        marks = ([pytest.mark.xfail(strict=True, raises=KnownDifference, reason=known[name][0])]
                 if known and name in known else [])
        for i, b in enumerate([spec, *spec.get("variants", [])]):
            case_id = name if i == 0 else f"{name}[{b['tag'].split(':')[0]}]"
            out.append(pytest.param(name, b["tag"], b["build_args"], b["target"], id=case_id, marks=marks))
    return out


# -- running docker ------------------------------------------------------------------------

def run(argv: list[str], env: dict[str, str] | None = None, check: bool = True,
        input: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, env=env, capture_output=True, input=input, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}):\n"
                             f"{out.stdout.decode(errors='replace')[-3000:]}\n"
                             f"{out.stderr.decode(errors='replace')[-3000:]}")
    return out


def last_line(out: subprocess.CompletedProcess) -> str:
    lines = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit {out.returncode}"


def docker_clients() -> list[str]:
    """Every distinct `docker` executable on PATH (a distro client may sit behind a newer one)."""
    seen, found = set(), []
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        p = Path(d or ".") / "docker"
        if p.is_file() and os.access(p, os.X_OK) and p.resolve() not in seen:
            seen.add(p.resolve())
            found.append(str(p))
    return found


class Docker:
    """A docker client that builds with BuildKit, and the tags this module made (for cleanup)."""

    def __init__(self, client: str, env: dict[str, str]) -> None:
        self.client, self.env = client, env
        self.tags: list[str] = []

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
        return run([self.client, *args], env=self.env, check=check, input=input)

    def build(self, ctx: Path, tag: str, build_args: dict[str, str], target: str | None) -> None:
        argv = ["build", "--network", "host", "--progress", "plain", "-t", tag]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        if target:
            argv += ["--target", target]
        self.tags.append(tag)
        self(*argv, str(ctx))


def find_buildkit_docker(work: Path) -> Docker:
    """A client and daemon that build with BuildKit, or pytest.skip with the reason."""
    clients = docker_clients()
    if not clients:
        pytest.skip("no docker client on PATH (apt-get install docker.io)")
    info = run([clients[0], "info", "--format", "{{.ServerVersion}}"], check=False)
    if info.returncode != 0:
        pytest.skip(f"docker daemon not reachable ({last_line(info)}); "
                    "start it with `dockerd --bridge=none --iptables=false &`")
    probe = work / "probe"
    probe.mkdir()
    (probe / "Dockerfile").write_text("FROM scratch\nCOPY Dockerfile /probe\n")
    reasons = []
    for client in clients:
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        tag = f"{PREFIX}/probe:latest"
        out = run([client, "build", "--network", "host", "--progress", "plain", "-t", tag, str(probe)],
                  env=env, check=False)
        text = (out.stdout + out.stderr).decode(errors="replace")
        if out.returncode == 0:
            run([client, "rmi", tag], env=env, check=False)
            if "#1 " in text or "naming to" in text:  # BuildKit's progress, not the legacy builder's
                return Docker(client, env)
            reasons.append(f"{client}: built, but not with BuildKit")
        else:
            reasons.append(f"{client}: {last_line(out)}")
    pytest.skip("no docker client builds with BuildKit (" + "; ".join(reasons) + ")")


# -- contexts ------------------------------------------------------------------------------

def rewrite_dockerfile(text: str, deps: list[str]) -> str:
    """Point `busybox[:latest]` (and the examples' own tags in `deps`) at the prefixed images."""
    stages = {m.lower() for m in re.findall(r"(?im)^\s*FROM\s.*?\sAS\s+(\S+)", text)}
    images = {"busybox": BASE, "busybox:latest": BASE}
    for dep in deps:
        images[dep] = f"{PREFIX}/{dep}"
    names = "|".join(re.escape(k) for k in sorted(images, key=len, reverse=True))

    def sub_from(m: re.Match) -> str:
        return m.group(1) + images[m.group(2)] + m.group(3)

    def sub_copy_from(m: re.Match) -> str:
        if m.group(2).lower() in stages:  # a stage that happens to be named busybox
            return m.group(0)
        return m.group(1) + images[m.group(2)] + m.group(3)

    text = re.sub(rf"(?im)^(\s*FROM\s+(?:--\S+\s+)*)({names})(\s|$)", sub_from, text)
    text = re.sub(rf"(?i)(--from=)({names})(\s|,|$)", sub_copy_from, text)
    text = re.sub(rf"(?im)^(\s*ARG\s+\w+=)({names})(\s|$)", sub_from, text)
    return text


def prepare_context(name: str, dest: Path) -> Path:
    ctx = dest / name
    if not ctx.exists():
        shutil.copytree(EXAMPLES / name, ctx, symlinks=True)
        df = ctx / "Dockerfile"
        df.write_text(rewrite_dockerfile(df.read_text(), SPECS[name].get("depends_on", [])))
    return ctx


def prefixed(tag: str) -> str:
    return f"{PREFIX}/{tag}"


def rewrite_args(build_args: dict[str, str]) -> dict[str, str]:
    return {k: (BASE if v in ("busybox", "busybox:latest") else v) for k, v in build_args.items()}


# -- file systems --------------------------------------------------------------------------

# What `docker export` has although the image does not: the container's own files and
# mount points. Their parents (/etc, /dev, ...) are compared when the image has them.
DOCKER_ADDED = {".dockerenv", "etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab"}
DOCKER_MOUNT_DIRS = ("dev", "proc", "sys")


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    return "" if name == "." else name


def _ignored(path: str) -> bool:
    return path in DOCKER_ADDED or any(path.startswith(d + "/") for d in DOCKER_MOUNT_DIRS)


def _entry(tar: tarfile.TarFile, m: tarfile.TarInfo, tree: dict[str, tuple]) -> tuple:
    """(type, mode, uid, gid, size, sha256, link target) of one member."""
    meta = (f"{m.mode & 0o7777:04o}", m.uid, m.gid)
    if m.islnk():  # a hard link: the same file as its target (which tool lists which name first varies)
        target = tree.get(_norm(m.linkname))
        if target is None or target[0] != "file":
            return ("hardlink?", *meta, 0, None, _norm(m.linkname))
        return ("file", *meta, *target[4:])
    if m.isreg():
        data = tar.extractfile(m).read()
        return ("file", *meta, len(data), hashlib.sha256(data).hexdigest(), None)
    if m.isdir():
        return ("dir", *meta, 0, None, None)
    if m.issym():
        return ("symlink", *meta, 0, None, m.linkname)
    if m.ischr() or m.isblk():
        return ("char" if m.ischr() else "block", *meta, 0, None, f"{m.devmajor}:{m.devminor}")
    if m.isfifo():
        return ("fifo", *meta, 0, None, None)
    return (f"type {m.type!r}", *meta, m.size, None, None)


def read_rootfs_tar(stream: io.IOBase) -> dict[str, tuple]:
    """A plain rootfs tar (docker export) -> {path: entry}."""
    tree: dict[str, tuple] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            path = _norm(m.name)
            if path:
                tree[path] = _entry(tar, m, tree)
    return tree


def _remove(tree: dict[str, tuple], path: str, children_only: bool = False) -> None:
    prefix = path + "/" if path else ""
    for p in [p for p in tree if p.startswith(prefix) or (not children_only and p == path)]:
        del tree[p]


def apply_layer(tree: dict[str, tuple], layer: bytes) -> None:
    """Apply one OCI/docker layer tar on top of `tree`, as the image spec says."""
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
        # Whiteouts hide lower layers only: apply them all before this layer's own entries.
        for m in members:
            path = _norm(m.name)
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                _remove(tree, parent, children_only=True)
            elif base.startswith(".wh."):
                _remove(tree, f"{parent}/{base[4:]}" if parent else base[4:])
        for m in members:
            path = _norm(m.name)
            if not path or path.rpartition("/")[2].startswith(".wh."):
                continue
            old = tree.get(path)
            if old is not None and old[0] == "dir" and not m.isdir():
                _remove(tree, path, children_only=True)
            tree[path] = _entry(tar, m, tree)


def pybuild_rootfs(store: Path, image: str, work: Path) -> dict[str, tuple]:
    """pybuild's image as docker would load it: the `pybuild save` archive's layers, applied in order."""
    archive = work / "save.tar"
    pybuild("save", "-o", str(archive), image, store=store)
    tree: dict[str, tuple] = {}
    try:
        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))[0]
            for layer in manifest["Layers"]:
                apply_layer(tree, tar.extractfile(layer).read())
    finally:
        archive.unlink()
    return tree


def pybuild_image_config(store: Path, image: str) -> dict:
    return json.loads(pybuild("inspect", image, store=store).stdout)[0]


def docker_rootfs(docker: Docker, tag: str) -> dict[str, tuple]:
    cid = docker("create", "--network", "none", "--entrypoint", "/nonexistent", tag).stdout.decode().strip()
    try:
        proc = subprocess.Popen([docker.client, "export", cid], stdout=subprocess.PIPE, env=docker.env)
        try:
            tree = read_rootfs_tar(proc.stdout)
        finally:
            proc.stdout.close()
            assert proc.wait() == 0, f"docker export {cid} failed"
    finally:
        docker("rm", "-f", cid, check=False)
    return tree


def docker_image_config(docker: Docker, tag: str) -> dict:
    """The raw image config (with history), from `docker save`."""
    data = docker("save", tag).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        return json.load(tar.extractfile(manifest["Config"]))


def fs_differences(docker_tree: dict[str, tuple], pybuild_tree: dict[str, tuple]) -> list[str]:
    fields = ("type", "mode", "uid", "gid", "size", "sha256", "link")
    out = []
    for path in sorted(set(docker_tree) | set(pybuild_tree)):
        if _ignored(path):
            continue
        d, p = docker_tree.get(path), pybuild_tree.get(path)
        if d == p:
            continue
        if p is None and path in ("etc", *DOCKER_MOUNT_DIRS):
            continue  # a mount point docker makes in every container
        if d is None:
            out.append(f"/{path}: only in pybuild {p}")
        elif p is None:
            out.append(f"/{path}: only in docker {d}")
        else:
            diff = ", ".join(f"{f}: docker {a!r} pybuild {b!r}"
                             for f, a, b in zip(fields, d, p) if a != b)
            out.append(f"/{path}: {diff}")
    return out


# -- configs -------------------------------------------------------------------------------

CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "Labels",
                 "StopSignal", "Healthcheck", "Shell", "OnBuild")


def _config_value(cfg: dict, key: str):
    value = cfg.get(key)
    if value in (None, [], {}, ""):
        return None
    if key == "Env":
        return sorted(set(value))
    if key == "Healthcheck":
        return {k: v for k, v in value.items() if v not in (None, 0, [], "")}
    return value


def config_differences(docker_cfg: dict, pybuild_cfg: dict) -> list[str]:
    out = []
    for key in CONFIG_FIELDS:
        d, p = _config_value(docker_cfg.get("config") or {}, key), _config_value(pybuild_cfg.get("config") or {}, key)
        if d != p:
            out.append(f"config.{key}: docker {d!r} pybuild {p!r}")
    for who, cfg in (("docker", docker_cfg), ("pybuild", pybuild_cfg)):
        layers = len(cfg["rootfs"]["diff_ids"])
        non_empty = sum(1 for h in cfg.get("history", []) if not h.get("empty_layer"))
        if non_empty != layers:
            out.append(f"{who}: {non_empty} non-empty history entries for {layers} layers")
    # Not compared: the number of layers. BuildKit 20.10 commits a layer for every WORKDIR and keeps a
    # RUN's layer even when the RUN changed nothing; pybuild does neither (see the module's report).
    return out


# -- fixtures and the tests ---------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory, busybox_tar):
    """(docker, pybuild store, work dir) with the shared base images in both; cleans docker up after."""
    from conftest import needs_root

    needs_root()
    work = tmp_path_factory.mktemp("docker-compat")
    docker = find_buildkit_docker(work)
    store = work / "store"
    # The examples' base looks like Docker Hub's busybox (PATH and CMD set); RAW_BASE is the bare
    # rootfs import, for test_base_without_path.
    pybuild("import", "-c", f"ENV {DEFAULT_PATH}", "-c", 'CMD ["sh"]', str(busybox_tar), BASE, store=store)
    pybuild("import", str(busybox_tar), RAW_BASE, store=store)
    archive = work / "base.tar"
    pybuild("save", "-o", str(archive), BASE, RAW_BASE, store=store)
    docker.tags += [BASE, RAW_BASE]
    try:
        docker("load", "-i", str(archive))
        archive.unlink()
        for image in (BASE, RAW_BASE):  # the very same image (id) in both tools
            ids = (pybuild("inspect", image, store=store).stdout, docker("image", "inspect", image).stdout)
            assert json.loads(ids[0])[0]["Id"] == json.loads(ids[1])[0]["Id"], image
        yield docker, store, work
    finally:
        for tag in reversed(docker.tags):
            docker("rmi", tag, check=False)


@pytest.fixture(scope="module")
def built() -> set:
    """The example tags built so far by both tools (a case and its dependants share builds)."""
    return set()


def build_both(env, name: str, tag: str, build_args: dict[str, str], target: str | None, built: set) -> str:
    """Build example `name` with both tools as PREFIX/tag (its dependencies first); the image name."""
    docker, store, work = env
    image = prefixed(tag)
    if tag in built:
        return image
    for dep in SPECS[name].get("depends_on", []):
        other = TAGS[dep]
        build_both(env, other, dep, SPECS[other]["build_args"], SPECS[other]["target"], built)
    ctx = prepare_context(name, work / "contexts")
    build_args = rewrite_args(build_args)
    args = ["build", "-t", image]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if target:
        args += ["--target", target]
    pybuild(*args, str(ctx), store=store)
    docker.build(ctx, image, build_args, target)
    built.add(tag)
    return image


def test_enough_examples():
    assert len({c.values[0] for c in cases()}) >= 8


def test_rewrite_dockerfile():
    text = ("ARG BASE_IMAGE=busybox:latest\nFROM ${BASE_IMAGE}\nFROM busybox:latest AS busybox\n"
            "FROM busybox AS b\nCOPY --from=busybox /bin/busybox /x\nCOPY --from=busybox:latest /a /b\n"
            "FROM onbuild-base:latest\nRUN echo busybox\n")
    assert rewrite_dockerfile(text, ["onbuild-base:latest"]) == (
        f"ARG BASE_IMAGE={BASE}\nFROM ${{BASE_IMAGE}}\nFROM {BASE} AS busybox\n"
        f"FROM {BASE} AS b\nCOPY --from=busybox /bin/busybox /x\nCOPY --from={BASE} /a /b\n"
        f"FROM {PREFIX}/onbuild-base:latest\nRUN echo busybox\n")


@pytest.mark.parametrize("name, tag, build_args, target", cases(KNOWN_CONFIG_DIFFERENCES))
def test_config_same_as_docker(env, built, name, tag, build_args, target):
    docker, store, work = env
    image = build_both(env, name, tag, build_args, target, built)
    problems = config_differences(docker_image_config(docker, image), pybuild_image_config(store, image))
    check(problems, KNOWN_CONFIG_DIFFERENCES.get(name), f"{name} ({image}): config differs from docker build:")


@pytest.mark.parametrize("name, tag, build_args, target", cases(KNOWN_FS_DIFFERENCES))
def test_files_same_as_docker(env, built, name, tag, build_args, target):
    docker, store, work = env
    image = build_both(env, name, tag, build_args, target, built)
    fs = fs_differences(docker_rootfs(docker, image), pybuild_rootfs(store, image, work))
    check(fs, KNOWN_FS_DIFFERENCES.get(name),
          f"{name} ({image}): {len(fs)} file system differences from docker build (first 30):")


def test_base_without_path(env):
    """A base image with no Env at all (a plain rootfs import): BuildKit adds the default PATH."""
    docker, store, work = env
    ctx = work / "contexts" / "no-path"
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(f"FROM {RAW_BASE}\nENV APP=1\nRUN true\n")
    image = f"{PREFIX}/no-path:latest"
    pybuild("build", "-t", image, str(ctx), store=store)
    docker.build(ctx, image, {}, None)
    problems = config_differences(docker_image_config(docker, image), pybuild_image_config(store, image))
    check(problems, None, "a base without PATH: config differs from docker build:")
