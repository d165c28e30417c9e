"""builder.snapshot on real files: overlay-format dirs <-> layer tars, ADD unpacking, flattening."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from builder.snapshot import (
    LayerInfo,
    export_rootfs,
    merged_tree,
    write_layer_tar,
)
from builder.tarstream import is_archive
from builder.unpack import unpack_archive_into, unpack_layer_tar
from grammar.errors import PybuildError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, mknod and trusted.* xattrs")

T0 = 1_600_000_000  # a fixed mtime, so trees built at different moments tar the same
LONG_NAME = "n" * 150  # > 100 bytes: ustar prefix split
LONG_DIRS = ("p" * 120, "q" * 120)  # with LONG_LEAF the path is > 255 bytes: PAX path
LONG_LEAF = "r" * 90
# VFS_CAP_REVISION_2 with the effective flag, permitting CAP_NET_BIND_SERVICE
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def tar_bytes(layer: Path, **kw) -> tuple[bytes, LayerInfo]:
    out = io.BytesIO()
    info = write_layer_tar(layer, out, **kw)
    return out.getvalue(), info


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def settle_times(root: Path, mtime: int = T0) -> None:
    """Give every path a fixed mtime (children first, so dirs keep theirs)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything a layer dir says about each path, hard links as groups, overlay opacity included."""
    out: dict[str, tuple] = {}
    first_path: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in os.listxattr(path, follow_symlinks=False)
                if not k.startswith("trusted.overlay.") or k == "trusted.overlay.opaque"
            )
            content = target = ""
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            link_group = ""
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                link_group = first_path.setdefault((st.st_dev, st.st_ino), rel)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns // 10**9, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                        content, target, st.st_rdev, tuple(xattrs), link_group)
    return out


def make_rich_layer(root: Path, *, shuffled: bool = False) -> Path:
    """An overlay-format layer with every kind of entry write_layer_tar must carry.

    `shuffled` creates things in another order, to show the output does not depend on it.
    """
    steps = []
    root.mkdir(parents=True)

    def step(fn):
        steps.append(fn)
        return fn

    @step
    def files():
        (root / "etc").mkdir()
        (root / "etc/hostname").write_text("box\n")
        (root / "empty").write_bytes(b"")
        (root / "big.bin").write_bytes(bytes(range(256)) * 6000)  # > 1 MiB: the chunked path
        (root / "héllo-ünïcode").write_text("utf-8 name\n")

    @step
    def links():
        (root / "data").mkdir()
        (root / "data/original").write_text("shared inode\n")
        os.link(root / "data/original", root / "hardlink")
        os.link(root / "data/original", root / "etc/another-hardlink")
        os.symlink("/etc/hostname", root / "abs-symlink")
        os.symlink("../etc/hostname", root / "data/rel-symlink")
        os.symlink("nowhere", root / "dangling")

    @step
    def specials():
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chmod(root / "null", 0o666)

    @step
    def long_names():
        (root / LONG_NAME).write_text("long name\n")
        deep = root.joinpath(*LONG_DIRS)
        deep.mkdir(parents=True)
        (deep / LONG_LEAF).write_text("very long path\n")
        os.link(deep / LONG_LEAF, root / "link-to-long")

    @step
    def owners_and_modes():
        (root / "bin").mkdir()
        (root / "bin/suid").write_bytes(b"#!/bin/sh\n")
        os.chown(root / "bin/suid", 1234, 5678)
        os.chmod(root / "bin/suid", 0o4755)
        (root / "shared").mkdir()
        os.chown(root / "shared", 1234, 5678)
        os.chmod(root / "shared", 0o2775)
        (root / "tmp").mkdir()
        os.chmod(root / "tmp", 0o1777)
        os.chown(root / "dangling", 1234, 5678, follow_symlinks=False)

    @step
    def xattrs():
        os.setxattr(root / "etc/hostname", "user.note", b"binary\x00\xff value")
        os.setxattr(root / "etc", "user.dir", b"on a dir")
        (root / "bin/ping").write_bytes(b"\x7fELF")
        os.setxattr(root / "bin/ping", "security.capability", CAPABILITY)

    @step
    def overlay_bits():
        os.mknod(root / "deleted", stat.S_IFCHR, 0)  # a whiteout
        os.chown(root / "deleted", 1234, 5678)
        (root / "replaced").mkdir()  # an opaque dir
        os.setxattr(root / "replaced", "trusted.overlay.opaque", b"y")
        (root / "replaced/fresh").write_text("new contents\n")

    order = [6, 2, 3, 0, 1, 4, 5] if shuffled else range(len(steps))  # dependencies still come first
    for i in order:
        steps[i]()
    settle_times(root)
    return root


# ----------------------------------------------------------------------------- round trip


@root_only
def test_round_trip_gives_identical_tree_and_digest(tmp_path: Path) -> None:
    layer = make_rich_layer(tmp_path / "layer")
    data, info = tar_bytes(layer)
    assert info == LayerInfo("sha256:" + hashlib.sha256(data).hexdigest(), len(data))

    dest = tmp_path / "unpacked"
    assert unpack_layer_tar(io.BytesIO(data), dest) == info
    assert snapshot(dest) == snapshot(layer)
    again, info2 = tar_bytes(dest)
    assert info2 == info and again == data


def test_empty_layer_has_dockers_empty_diff_id(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    data, info = tar_bytes(tmp_path / "empty")
    assert data == bytes(1024)
    assert info.diff_id == "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    layer = os.fsencode(tmp_path / "layer")
    os.makedirs(layer + b"/dir-\xff")
    Path(os.fsdecode(layer + b"/dir-\xff/file-\xfe")).write_text("latin-1 bytes")
    os.symlink(b"target-\xfa", layer + b"/link")
    data, info = tar_bytes(Path(os.fsdecode(layer)))
    dest = tmp_path / "out"
    assert unpack_layer_tar(io.BytesIO(data), dest) == info
    assert sorted(os.listdir(os.fsencode(dest))) == [b"dir-\xff", b"link"]
    assert os.readlink(os.fsencode(dest) + b"/link") == b"target-\xfa"
    assert tar_bytes(dest)[0] == data


@root_only
def test_layer_tar_entries(tmp_path: Path) -> None:
    layer = make_rich_layer(tmp_path / "layer")
    data, _ = tar_bytes(layer)
    by_name = {m.name: m for m in members(data)}

    assert by_name[".wh.deleted"].isreg() and by_name[".wh.deleted"].size == 0
    assert "deleted" not in by_name
    names = [m.name for m in members(data)]
    assert names[names.index("replaced") + 1] == "replaced/.wh..wh..opq"  # right after its dir
    assert "trusted.overlay.opaque" not in str(by_name["replaced"].pax_headers)

    hard = [by_name[n] for n in ("etc/another-hardlink", "hardlink")]
    first = by_name["data/original"]
    assert first.isreg() and first.size == len("shared inode\n")
    assert all(m.islnk() and m.linkname == "data/original" for m in hard)
    long_link = by_name["/".join((*LONG_DIRS, LONG_LEAF))]  # sorts after link-to-long, so it is the link
    assert long_link.islnk() and long_link.linkname == "link-to-long" and "path" in long_link.pax_headers

    assert by_name["bin/suid"].mode == 0o4755 and (by_name["bin/suid"].uid, by_name["bin/suid"].gid) == (1234, 5678)
    assert by_name["shared"].mode == 0o2775 and by_name["tmp"].mode == 0o1777
    assert all(m.uname == "" and m.gname == "" for m in by_name.values())
    assert by_name["null"].ischr() and (by_name["null"].devmajor, by_name["null"].devminor) == (1, 3)
    assert by_name["loop0"].isblk() and by_name["fifo"].isfifo()
    assert by_name["abs-symlink"].issym() and by_name["abs-symlink"].linkname == "/etc/hostname"
    capability = by_name["bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert capability.encode("utf-8", "surrogateescape") == CAPABILITY
    assert all(m.mtime == T0 for m in by_name.values())
    for m in by_name.values():  # no atime/ctime anywhere
        assert "atime" not in m.pax_headers and "ctime" not in m.pax_headers


@root_only
def test_order_is_depth_first_by_name_bytes(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    for d in ("a", "a/z", "b"):
        (layer / d).mkdir(parents=True)
    for f in ("a-b", "a.txt", "a/y", "a/z/x", "B", "b/c", "_"):
        (layer / f).write_text(f)
    os.mknod(layer / "a/gone", stat.S_IFCHR, 0)
    names = [m.name for m in members(tar_bytes(layer)[0])]
    assert names == ["B", "_", "a", "a/.wh.gone", "a/y", "a/z", "a/z/x", "a-b", "a.txt", "b", "b/c"]


def test_pax_headers_only_when_needed(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "d").mkdir(parents=True)
    (layer / "d/plain").write_text("x")
    (layer / ("x" * 100)).write_text("exactly 100 bytes")
    prefix_split = layer / ("s" * 60) / ("u" * 60) / ("t" * 99)  # every level fits ustar's prefix + name
    prefix_split.parent.mkdir(parents=True)
    prefix_split.write_text("ustar prefix")
    plain = {m.name: m for m in members(tar_bytes(layer)[0])}
    assert all(m.pax_headers == {} for m in plain.values())
    assert prefix_split.relative_to(layer).as_posix() in plain

    deep = layer.joinpath(*LONG_DIRS) / LONG_LEAF
    deep.parent.mkdir(parents=True)
    deep.write_text("deep")
    os.setxattr(layer / "d/plain", "user.k", b"v")
    with_pax = {m.name: m for m in members(tar_bytes(layer)[0])}
    assert set(with_pax[deep.relative_to(layer).as_posix()].pax_headers) == {"path"}
    assert set(with_pax["d/plain"].pax_headers) == {"SCHILY.xattr.user.k"}
    assert with_pax["d"].pax_headers == {}


@root_only
def test_big_ids_go_to_pax(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_text("x")
    os.chown(layer / "f", 3_000_000, 4_000_000)
    data, _ = tar_bytes(layer)
    (m,) = members(data)
    assert (m.uid, m.gid) == (3_000_000, 4_000_000) and set(m.pax_headers) == {"uid", "gid"}
    dest = tmp_path / "out"
    unpack_layer_tar(io.BytesIO(data), dest)
    assert (os.lstat(dest / "f").st_uid, os.lstat(dest / "f").st_gid) == (3_000_000, 4_000_000)


@root_only
def test_same_tree_built_differently_tars_identically(tmp_path: Path) -> None:
    one = make_rich_layer(tmp_path / "one")
    two = make_rich_layer(tmp_path / "two", shuffled=True)
    for path in (two / "etc/hostname", two / "big.bin"):  # reading changes atimes only
        os.utime(path, ns=(12345 * 10**9, T0 * 10**9))
    a, info_a = tar_bytes(one)
    b, info_b = tar_bytes(two)
    assert info_a == info_b and a == b


@root_only
def test_overlay_bookkeeping_xattrs_stay_out(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "dir").mkdir(parents=True)
    (layer / "dir/file").write_text("x")
    os.setxattr(layer / "dir/file", "trusted.overlay.origin", b"\x00\xfb\x21")
    os.setxattr(layer / "dir", "trusted.overlay.impure", b"y")
    os.setxattr(layer / "dir", "trusted.overlay.opaque", b"x")  # "x" means has-whiteouts, not opaque
    os.setxattr(layer / "dir", "user.kept", b"1")
    data, _ = tar_bytes(layer)
    assert b"trusted.overlay" not in data
    assert [m.name for m in members(data)] == ["dir", "dir/file"]
    assert members(data)[0].pax_headers == {"SCHILY.xattr.user.kept": "1"}


def test_clamp_mtime(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "old").write_text("o")
    (layer / "new").write_text("n")
    os.utime(layer / "old", (1000, 1000))
    os.utime(layer / "new", (T0 + 500, T0 + 500))
    clamped = {m.name: m.mtime for m in members(tar_bytes(layer, clamp_mtime=T0)[0])}
    assert clamped == {"new": T0, "old": 1000}
    assert {m.name: m.mtime for m in members(tar_bytes(layer)[0])} == {"new": T0 + 500, "old": 1000}


def test_reserved_whiteout_names_are_refused(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / ".wh.sneaky").write_text("would read as a deletion")
    with pytest.raises(PybuildError, match=r"\.wh\.sneaky"):
        tar_bytes(layer)


@root_only
def test_gnu_tar_reads_the_layer(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    layer = make_rich_layer(tmp_path / "layer")
    archive = tmp_path / "layer.tar"
    with open(archive, "wb") as f:
        write_layer_tar(layer, f)
    listing = subprocess.run(["tar", "-tvf", archive], capture_output=True, text=True, check=True).stdout
    long_path = "/".join((*LONG_DIRS, LONG_LEAF))
    for name in (".wh.deleted", "replaced/.wh..wh..opq", long_path, LONG_NAME, "hardlink link to data/original"):
        assert name in listing
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", archive, "-C", out],
                   check=True, capture_output=True)
    assert (out / long_path).read_text() == "very long path\n"
    assert os.getxattr(out / "etc/hostname", "user.note") == b"binary\x00\xff value"
    assert stat.S_IMODE(os.lstat(out / "bin/suid").st_mode) == 0o4755


@root_only
def test_umoci_reads_the_layer(tmp_path: Path) -> None:
    """umoci insert puts our tar into an OCI image and unpacks it with its own (Go) tar reader."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc/motd").write_text("hello from a pybuild layer\n")
    os.symlink("motd", layer / "etc/motd.link")
    archive = tmp_path / "layer.tar"
    with open(archive, "wb") as f:
        write_layer_tar(layer, f)
    image = tmp_path / "image"
    run = lambda *args: subprocess.run(["umoci", *args], check=True, capture_output=True)  # noqa: E731
    run("init", "--layout", str(image))
    run("new", "--image", f"{image}:t")
    run("raw", "add-layer", "--image", f"{image}:t", str(archive))
    bundle = tmp_path / "bundle"
    run("unpack", "--image", f"{image}:t", str(bundle))
    assert (bundle / "rootfs/etc/motd").read_text() == "hello from a pybuild layer\n"
    assert os.readlink(bundle / "rootfs/etc/motd.link") == "motd"


# ----------------------------------------------------------------------------- unpacking layers


@root_only
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_unpacks_what_gnu_tar_writes(tmp_path: Path, fmt: str) -> None:
    """GNU long-name headers ('L'/'K') and PAX with sub-second times, atime and ctime."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    layer = make_rich_layer(tmp_path / "layer")
    os.unlink(layer / "deleted")  # GNU tar would store whiteouts as devices we refuse
    os.removexattr(layer / "replaced", "trusted.overlay.opaque")
    os.utime(layer / "empty", ns=(T0 * 10**9, T0 * 10**9 + 123_456_789), follow_symlinks=False)
    settle_times(layer / "replaced")
    archive = tmp_path / "gnu.tar"
    subprocess.run(["tar", f"--format={fmt}", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "-C", layer, "-cf", archive, "."], check=True, capture_output=True)
    with open(archive, "rb") as f:
        info = unpack_layer_tar(f, tmp_path / "out")
    assert info.diff_id == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    expected = snapshot(layer)
    if fmt == "gnu":  # GNU format has no xattrs
        expected = {k: (*v[:9], tuple(x for x in v[9] if x[0] == "user.never"), v[10]) for k, v in expected.items()}
        got = {k: (*v[:9], (), v[10]) for k, v in snapshot(tmp_path / "out").items()}
    else:
        got = snapshot(tmp_path / "out")
    assert got == expected
    if fmt == "posix":
        assert os.lstat(tmp_path / "out/empty").st_mtime_ns == T0 * 10**9 + 123_456_789


def build_tar(entries: list[tuple], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar from (name, kind, extra) rows, written by tarfile as other tools would."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, kind, *extra in entries:
            info = tarfile.TarInfo(name)
            info.mtime = T0
            if kind == "file":
                data = extra[0] if extra else b""
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            if kind in ("symlink", "link"):
                info.linkname = extra[0]
            if kind == "chr":
                info.devmajor, info.devminor = extra
            info.mode = 0o755
            tf.addfile(info)
    return out.getvalue()


@root_only
def test_whiteouts_and_opaque_markers_become_overlay_format(tmp_path: Path) -> None:
    data = build_tar([
        ("d", "dir"),
        ("d/.wh..wh..opq", "file"),
        ("d/kept", "file", b"k"),
        ("etc/.wh.passwd", "file"),
        (".wh..wh.plnk", "dir"),  # AUFS metadata: skipped
        (".wh..wh.plnk/123", "file", b"x"),
    ])
    dest = tmp_path / "layer"
    info = unpack_layer_tar(io.BytesIO(data), dest)
    assert info.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert os.getxattr(dest / "d", "trusted.overlay.opaque") == b"y"
    st = os.lstat(dest / "etc/passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert sorted(os.listdir(dest)) == ["d", "etc"] and os.listdir(dest / "d") == ["kept"]


@root_only
def test_later_entries_override_earlier_ones(tmp_path: Path) -> None:
    data = build_tar([
        ("f", "file", b"first"),
        ("f", "file", b"second"),
        ("d", "file", b"a file first"),
        ("d", "dir"),
        ("d/x", "file", b"x"),
        ("s", "dir"),
        ("s/inner", "file", b"gone with the dir"),
        ("s", "symlink", "d"),
        (".wh.w", "file"),
        ("w", "file", b"back again"),
    ])
    dest = tmp_path / "layer"
    unpack_layer_tar(io.BytesIO(data), dest)
    assert (dest / "f").read_bytes() == b"second"
    assert (dest / "d").is_dir() and (dest / "d/x").read_bytes() == b"x"
    assert os.readlink(dest / "s") == "d"
    assert (dest / "w").read_bytes() == b"back again"


def test_unpack_refuses_a_non_empty_dest(tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("x")
    with pytest.raises(ValueError):
        unpack_layer_tar(io.BytesIO(build_tar([("f", "file", b"x")])), tmp_path)


MALICIOUS = {  # case: (entries, the entry the error must name)
    "absolute path": ([("/OUTSIDE/evil", "file", b"pwned")], "/OUTSIDE/evil"),
    "dot-dot": ([("../outside/evil", "file", b"pwned")], "../outside/evil"),
    "dot-dot inside": ([("a/../../outside/evil", "file", b"pwned")], "a/../../outside/evil"),
    "write through a symlink": ([("link", "symlink", "OUTSIDE"), ("link/evil", "file", b"pwned")], "link/evil"),
    "write through a relative symlink": (
        [("link", "symlink", "../outside"), ("link/evil", "file", b"pwned")], "link/evil"),
    "path through a symlinked parent": (
        [("real", "dir"), ("alias", "symlink", "real"), ("alias/sub/evil", "file", b"pwned")], "alias/sub/evil"),
    "hard link to an absolute path": ([("hl", "link", "OUTSIDE/canary")], "hl"),
    "hard link climbing out": ([("hl", "link", "../outside/canary")], "hl"),
    "hard link through a symlink": ([("link", "symlink", "OUTSIDE"), ("hl", "link", "link/canary")], "hl"),
    "hard link to a later entry": ([("hl", "link", "later"), ("later", "file", b"x")], "hl"),
    "char device 0:0": ([("dev", "chr", 0, 0)], "dev"),
}


@root_only
@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layer_tars_are_refused(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    rows, culprit = MALICIOUS[case]
    entries = [tuple(v.replace("OUTSIDE", str(outside)) if isinstance(v, str) else v for v in row) for row in rows]
    with pytest.raises(PybuildError) as err:
        unpack_layer_tar(io.BytesIO(build_tar(entries)), tmp_path / "layer")
    assert repr(culprit.replace("OUTSIDE", str(outside))) in str(err.value)
    assert sorted(os.listdir(outside)) == ["canary"]
    assert (outside / "canary").read_text() == "untouched" and os.lstat(outside / "canary").st_nlink == 1
    assert sorted(os.listdir(tmp_path)) == ["layer", "outside"]


def test_broken_tars_are_user_errors(tmp_path: Path) -> None:
    good = build_tar([("f", "file", b"x" * 5000)])
    with pytest.raises(PybuildError, match="unexpected end"):
        unpack_layer_tar(io.BytesIO(good[:2048]), tmp_path / "truncated")
    bad = bytearray(good)
    bad[0] ^= 0x01  # the name changes, the checksum no longer matches
    with pytest.raises(PybuildError, match="checksum"):
        unpack_layer_tar(io.BytesIO(bytes(bad)), tmp_path / "corrupt")
    with pytest.raises(PybuildError, match="gzip"):
        unpack_layer_tar(io.BytesIO(gzip.compress(good)[:-30]), tmp_path / "short-gzip")


COMPRESSORS = {
    "gzip": gzip.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
    "xz": lzma.compress,
    "bzip2": bz2.compress,
}


@root_only
@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_layers_unpack_with_the_uncompressed_digest(tmp_path: Path, kind: str) -> None:
    layer = make_rich_layer(tmp_path / "layer")
    data, info = tar_bytes(layer)
    packed = tmp_path / f"layer.tar.{kind}"
    packed.write_bytes(COMPRESSORS[kind](data))
    assert is_archive(packed)
    with open(packed, "rb") as f:
        assert unpack_layer_tar(f, tmp_path / "out") == info
    assert snapshot(tmp_path / "out") == snapshot(layer)


# ----------------------------------------------------------------------------- ADD archives


def test_is_archive(tmp_path: Path) -> None:
    tar = tmp_path / "a.tar"
    tar.write_bytes(build_tar([("f", "file", b"x")]))
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    (tmp_path / "a.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar.read_bytes()))
    (tmp_path / "ustar-gnu.tar").write_bytes(build_tar([("f", "file", b"x")], fmt=tarfile.GNU_FORMAT))
    (tmp_path / "text.tar.gz").write_bytes(gzip.compress(b"not a tar at all\n" * 100))
    (tmp_path / "readme.txt").write_text("hello\n" * 200)
    (tmp_path / "empty.tar").write_bytes(bytes(1024))
    (tmp_path / "zero").write_bytes(b"")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08garbage")
    os.symlink("a.tar", tmp_path / "link.tar")
    (tmp_path / "dir.tar").mkdir()
    found = {p.name for p in tmp_path.iterdir() if is_archive(p)}
    assert found == {"a.tar", "a.tar.gz", "a.tar.zst", "ustar-gnu.tar"}


@root_only
def test_add_unpacks_like_docker(tmp_path: Path) -> None:
    dest = tmp_path / "rootfs/app"
    (tmp_path / "rootfs/usr/lib").mkdir(parents=True)
    dest.mkdir()
    (dest / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", dest / "lib")  # merged-usr style link already in the destination
    (dest / "existing").write_text("old")
    data = build_tar([
        ("/abs/file", "file", b"rebased"),
        ("lib", "dir"),
        ("lib/libc.so", "file", b"elf"),
        ("existing", "file", b"new"),
        (".wh.not-a-whiteout", "file", b"plain file"),
        ("dev", "chr", 1, 3),
        ("hl", "link", "/abs/file"),
    ])
    names = unpack_archive_into(io.BytesIO(gzip.compress(data)), dest, chown=(1000, 1001))
    assert names == ["abs/file", "lib", "lib/libc.so", "existing", ".wh.not-a-whiteout", "dev", "hl"]
    assert (dest / "abs/file").read_bytes() == b"rebased"
    assert os.readlink(dest / "lib") == "usr/lib" and (dest / "usr/lib/libc.so").read_bytes() == b"elf"
    assert (dest / "existing").read_text() == "new"
    assert (dest / ".wh.not-a-whiteout").read_bytes() == b"plain file"
    assert os.stat(dest / "hl").st_ino == os.stat(dest / "abs/file").st_ino
    assert stat.S_ISCHR(os.lstat(dest / "dev").st_mode)
    for rel in ("abs/file", "usr/lib/libc.so", "existing", "dev"):
        st = os.lstat(dest / rel)
        assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert not (tmp_path / "rootfs/usr/lib/libc.so").exists()


@root_only
def test_add_keeps_archive_owners_without_chown(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        info = tarfile.TarInfo("owned")
        info.uid, info.gid, info.mode = 33, 44, 0o4711
        tf.addfile(info, io.BytesIO(b""))
    unpack_archive_into(io.BytesIO(out.getvalue()), tmp_path / "d")
    st = os.lstat(tmp_path / "d/owned")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (33, 44, 0o4711)


@root_only
@pytest.mark.parametrize("entries", [
    [("../evil", "file", b"x")],
    [("a/../../evil", "file", b"x")],
    [("up", "symlink", "../.."), ("up/evil", "file", b"x")],
    [("hl", "link", "../outside/canary")],
], ids=["dot-dot", "dot-dot-inside", "escaping-symlink", "hard-link-out"])
def test_add_refuses_escapes(tmp_path: Path, entries: list[tuple]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    with pytest.raises(PybuildError):
        unpack_archive_into(io.BytesIO(build_tar(entries)), tmp_path / "dest")
    assert sorted(os.listdir(outside)) == ["canary"] and os.lstat(outside / "canary").st_nlink == 1
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]


@root_only
def test_add_resolves_absolute_symlinks_inside_dest(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    data = build_tar([("link", "symlink", str(victim)), ("link/evil", "file", b"x")])
    unpack_archive_into(io.BytesIO(data), tmp_path / "dest")
    assert os.listdir(victim) == []
    assert (tmp_path / "dest" / str(victim).lstrip("/") / "evil").read_bytes() == b"x"


# ----------------------------------------------------------------------------- stacks


def tar_contents(data: bytes) -> dict[str, tuple]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.type, m.linkname, tf.extractfile(m).read() if m.isreg() else b"") for m in tf}


@root_only
def test_export_rootfs_applies_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    base = tmp_path / "base"
    for d in ("etc", "var/cache", "opt/app"):
        (base / d).mkdir(parents=True)
    (base / "etc/passwd").write_text("root\n")
    (base / "etc/shadow").write_text("secret\n")
    (base / "var/cache/junk").write_text("junk\n")
    (base / "opt/app/v1").write_text("1\n")
    (base / "was-file").write_text("f\n")

    top = tmp_path / "top"
    for d in ("etc", "var/cache", "was-file", "opt"):
        (top / d).mkdir(parents=True)
    os.mknod(top / "etc/shadow", stat.S_IFCHR, 0)
    (top / "etc/hosts").write_text("127.0.0.1\n")
    os.setxattr(top / "var/cache", "trusted.overlay.opaque", b"y")
    (top / "var/cache/fresh").write_text("fresh\n")
    (top / "was-file/inside").write_text("now a dir\n")
    (top / "opt/app").write_text("app became a file\n")

    out = io.BytesIO()
    export_rootfs([base, top], out)
    contents = tar_contents(out.getvalue())
    assert sorted(contents) == ["etc", "etc/hosts", "etc/passwd", "opt", "opt/app", "var", "var/cache",
                                "var/cache/fresh", "was-file", "was-file/inside"]
    assert contents["opt/app"][2] == b"app became a file\n"
    assert b".wh." not in out.getvalue()
    tree = merged_tree([base, top])
    assert sorted(tree) == sorted(contents)
    assert tree["etc/passwd"].kind == "file" and tree["was-file"].kind == "dir"


@root_only
def test_overlay_upper_dir_is_the_next_layer(tmp_path: Path) -> None:
    """Mount a real overlay on an unpacked layer, change it from a shell, tar the upper dir."""
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    base = make_rich_layer(tmp_path / "base")
    (base / "dir/sub").mkdir(parents=True)
    (base / "dir/sub/old").write_text("old\n")
    (base / "doomed").write_text("doomed\n")
    os.unlink(base / "deleted")  # a bottom layer has nothing to delete
    os.removexattr(base / "replaced", "trusted.overlay.opaque")
    settle_times(base)
    unpack_layer_tar(io.BytesIO(tar_bytes(base)[0]), lower)
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work},index=off,redirect_dir=off,metacopy=off,xino=off"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["sh", "-c", "rm doomed empty && rm -rf dir && mkdir dir && echo new > dir/new"
                                    " && echo more >> etc/hostname && chmod 600 etc/hostname"],
                       cwd=merged, check=True)
        seen_through_mount = merged_tree([merged])
    finally:
        subprocess.run(["umount", str(merged)], check=True)

    left_by_kernel = {k for p in upper.rglob("*") for k in os.listxattr(p, follow_symlinks=False)}
    assert "trusted.overlay.opaque" in left_by_kernel  # and, on most filesystems, origin and impure
    data, _ = tar_bytes(upper)
    assert b"trusted.overlay" not in data
    names = [m.name for m in members(data)]
    assert names == [".wh.doomed", ".wh.empty", "dir", "dir/.wh..wh..opq", "dir/new", "etc", "etc/hostname"]
    assert all(m.isreg() for m in members(data) if ".wh." in m.name)  # the kernel shares one whiteout inode
    listing = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True).stdout
    assert b".wh.doomed" in listing

    # the diff applied as a layer gives what the kernel showed, and the same flattened rootfs
    layer2 = tmp_path / "layer2"
    unpack_layer_tar(io.BytesIO(data), layer2)
    assert merged_tree([lower, upper]) == seen_through_mount
    assert merged_tree([lower, layer2]) == seen_through_mount
    flat_kernel, flat_ours = io.BytesIO(), io.BytesIO()
    export_rootfs([lower, upper], flat_kernel)
    export_rootfs([lower, layer2], flat_ours)
    assert flat_kernel.getvalue() == flat_ours.getvalue()
    assert "doomed" not in seen_through_mount and "dir/sub" not in seen_through_mount
