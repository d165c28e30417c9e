"""`pybuild build --output type=...,dest=...`: where a built image goes besides the store.

  type=image             the store only (the default); push=true also pushes it
  type=oci,dest=F        an OCI image layout tar (skopeo oci-archive:, umoci)
  type=docker,dest=F     a docker-archive (docker load)
  type=tar,dest=F        the image's root file system as one tar
  type=local,dest=DIR    the root file system unpacked into DIR
dest=- writes a tar type to stdout.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder.store import Image, Store
from grammar.errors import PybuildError

TYPES = ("image", "oci", "docker", "tar", "local")


@dataclass(frozen=True)
class Output:
    type: str
    dest: str = ""
    push: bool = False
    name: str = ""


def parse_output(text: str) -> Output:
    """`type=oci,dest=out.tar` (docker build's syntax; a bare path means type=local)."""
    if "=" not in text:
        return Output("local", text)
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise PybuildError(f"--output {text!r}: {item!r} is not KEY=VALUE")
        fields[key.strip()] = value.strip()
    kind = fields.pop("type", "local" if "dest" in fields else "")
    if kind not in TYPES:
        raise PybuildError(f"--output {text!r}: type must be one of {', '.join(TYPES)}")
    dest = fields.pop("dest", "")
    push = fields.pop("push", "false").lower() in ("true", "1")
    name = fields.pop("name", "")
    if fields:
        raise PybuildError(f"--output {text!r}: unknown option(s) {', '.join(sorted(fields))}")
    if kind not in ("image",) and not dest:
        raise PybuildError(f"--output type={kind} needs dest=PATH (or dest=- for stdout)")
    if kind == "local" and dest == "-":
        raise PybuildError("--output type=local needs a directory, not -; use type=tar,dest=- for a stream")
    return Output(kind, dest, push, name)


def write_output(store: Store, image: Image, output: Output) -> None:
    if output.type == "image":
        return
    if output.type == "local":
        _write_local(store, image, Path(output.dest))
        return
    if output.dest == "-":
        _write_stream(store, image, output.type, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    tmp = Path(output.dest + ".tmp")
    with open(tmp, "wb") as out:
        _write_stream(store, image, output.type, out)
    os.replace(tmp, output.dest)  # a half-written archive never carries the final name


def _write_stream(store: Store, image: Image, kind: str, out: BinaryIO) -> None:
    from builder import archive, snapshot

    refs = list(image.names) or [image]  # by name: archives record the names they were saved under
    if kind == "oci":
        archive.save_oci_archive(store, refs, out)
    elif kind == "docker":
        archive.save_docker_archive(store, refs, out)
    else:
        snapshot.export_rootfs(store.layer_dirs(image), out)


def _write_local(store: Store, image: Image, dest: Path) -> None:
    import tempfile

    from builder import snapshot
    from builder.unpack import unpack_archive_into

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as tar:
        snapshot.export_rootfs(store.layer_dirs(image), tar)
        tar.seek(0)
        unpack_archive_into(tar, dest)
