"""Regenerates the archives this example ADDs (run once at authoring time).

    python3 make-archives.py

Every member gets uid/gid 0, a fixed mtime and an explicit mode, so the
archives are byte-for-byte reproducible and the image they produce is
deterministic. Not used by the build itself.
"""
import gzip
import io
import lzma
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MTIME = 1700000000  # 2023-11-14, any fixed value will do


def member(name: str, data: bytes | None = None, mode: int = 0o644, link: str | None = None) -> tuple:
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = MTIME
    info.mode = mode
    if link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = link
    elif data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    return info, (io.BytesIO(data) if data is not None else None)


def tar_bytes(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, fileobj in members:
            tar.addfile(info, fileobj)
    return buf.getvalue()


def main() -> None:
    # site.tar: plain (uncompressed) tar, with an executable file.
    (HERE / "site.tar").write_bytes(tar_bytes([
        member("site", mode=0o755),
        member("site/index.txt", b"from site.tar\n"),
        member("site/bin", mode=0o755),
        member("site/bin/run.sh", b"#!/bin/sh\necho run.sh from site.tar\n", mode=0o755),
    ]))
    # docs.tar.gz: gzip-compressed tar, with a symlink.
    docs = tar_bytes([
        member("docs", mode=0o755),
        member("docs/README.txt", b"from docs.tar.gz\n"),
        member("docs/latest", mode=0o777, link="README.txt"),
    ])
    (HERE / "docs.tar.gz").write_bytes(gzip.compress(docs, mtime=0))
    # data.tar.xz: xz-compressed tar.
    data = tar_bytes([
        member("data", mode=0o755),
        member("data/numbers.txt", b"1\n2\n3\n"),
    ])
    (HERE / "data.tar.xz").write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    # notes.txt.gz: gzip of a plain text file, NOT a tar: ADD copies it as is.
    (HERE / "notes.txt.gz").write_bytes(gzip.compress(b"compressed notes, not a tar\n", mtime=0))


if __name__ == "__main__":
    main()
