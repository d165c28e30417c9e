"""The build context on real temp directories: sources, ignore rules, symlinks, stdin tars."""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

import builder.context as context_module
from builder.context import BuildContext, SourceMatch, find_ignore_file, resolve_sources, walk
from grammar.errors import PybuildError


def make_tree(root: Path, spec: dict[str, str | None]) -> Path:
    """Files from {path: content}; a path ending in '/' is a directory, '-> x' a symlink."""
    for rel, content in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
        elif content is not None and content.startswith("-> "):
            path.symlink_to(content[3:])
        else:
            path.write_text(content or "")
    return root


@pytest.fixture
def ctx_dir(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM scratch\n",
            "a.txt": "a",
            "b.txt": "b",
            "c.md": "c",
            "src/main.go": "package main",
            "src/util.go": "package main",
            "src/sub/deep.go": "package sub",
            "docs/README.md": "readme",
            "docs/guide.md": "guide",
            "docs/img/logo.png": "png",
            "empty/": None,
        },
    )


def paths(matches: list[SourceMatch]) -> list[str]:
    return [m.path for m in matches]


def walked(match: SourceMatch) -> list[str]:
    return [rel for rel, _ in walk(match)]


# ------------------------------------------------------------- plain sources


def test_file_directory_and_root(ctx_dir: Path) -> None:
    ctx = BuildContext.from_dir(ctx_dir)
    f, d, root = resolve_sources(ctx, ["a.txt", "src", "."])
    assert (f.path, f.is_dir, f.abs_path) == ("a.txt", False, ctx_dir.resolve() / "a.txt")
    assert (d.path, d.is_dir) == ("src", True)
    assert (root.path, root.is_dir, root.abs_path) == (".", True, ctx_dir.resolve())


@pytest.mark.parametrize("src", ["/a.txt", "./a.txt", "src/../a.txt", "//a.txt"])
def test_sources_are_relative_to_the_root(ctx_dir: Path, src: str) -> None:
    (match,) = BuildContext.from_dir(ctx_dir).resolve_sources([src])
    assert match.path == "a.txt"


def test_missing_source_names_dockerignore(ctx_dir: Path) -> None:
    with pytest.raises(PybuildError) as caught:
        BuildContext.from_dir(ctx_dir).resolve_sources(["nope.txt"])
    message = caught.value.message
    assert message.startswith(
        "COPY failed: file not found in build context or excluded by .dockerignore: stat nope.txt"
    )
    assert "check" in message


def test_file_used_as_directory_is_missing(ctx_dir: Path) -> None:
    with pytest.raises(PybuildError, match="file not found"):
        BuildContext.from_dir(ctx_dir).resolve_sources(["a.txt/x"], instruction="ADD")


def test_context_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="not found"):
        BuildContext.from_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PybuildError, match="not a directory"):
        BuildContext.from_dir(tmp_path / "file")


# ------------------------------------------------------------- wildcards


def test_wildcards_expand_sorted_and_stay_in_one_level(ctx_dir: Path) -> None:
    ctx = BuildContext.from_dir(ctx_dir)
    assert paths(ctx.resolve_sources(["*.txt"])) == ["a.txt", "b.txt"]
    assert paths(ctx.resolve_sources(["src/*.go"])) == ["src/main.go", "src/util.go"]
    assert paths(ctx.resolve_sources(["*/*.go"])) == ["src/main.go", "src/util.go"]
    assert paths(ctx.resolve_sources(["s?c/su[a-c]"])) == ["src/sub"]
    assert paths(ctx.resolve_sources(["[ab].txt", "c.*"])) == ["a.txt", "b.txt", "c.md"]


def test_wildcard_matching_a_directory_is_not_searched(ctx_dir: Path) -> None:
    matches = BuildContext.from_dir(ctx_dir).resolve_sources(["d*"])
    assert [(m.path, m.is_dir) for m in matches] == [("docs", True)]


def test_wildcard_without_match_fails(ctx_dir: Path) -> None:
    ctx = BuildContext.from_dir(ctx_dir)
    with pytest.raises(PybuildError, match=r"no source files were specified.*\*\.rs"):
        ctx.resolve_sources(["*.rs"])
    with pytest.raises(PybuildError, match="no source files"):
        ctx.resolve_sources(["missing/*.go"])


def test_bad_wildcard_is_reported(ctx_dir: Path) -> None:
    with pytest.raises(PybuildError, match="bad wildcard"):
        BuildContext.from_dir(ctx_dir).resolve_sources(["[a-"])


def test_escaped_and_disabled_wildcards_are_literal(ctx_dir: Path) -> None:
    (ctx_dir / "star*").write_text("x")
    ctx = BuildContext.from_dir(ctx_dir)
    assert paths(ctx.resolve_sources(["star*"], allow_wildcards=False)) == ["star*"]
    with pytest.raises(PybuildError, match="file not found"):
        ctx.resolve_sources(["*.txt"], allow_wildcards=False)


# ------------------------------------------------------------- walking


def test_walk_directory_sorted_depth_first(ctx_dir: Path) -> None:
    (src,) = BuildContext.from_dir(ctx_dir).resolve_sources(["src"])
    assert walked(src) == [".", "main.go", "sub", "sub/deep.go", "util.go"]


def test_walk_file_and_stats(ctx_dir: Path) -> None:
    (f,) = BuildContext.from_dir(ctx_dir).resolve_sources(["a.txt"])
    ((rel, st),) = list(walk(f))
    assert rel == "." and stat.S_ISREG(st.st_mode) and st.st_size == 1


def test_walk_root_sees_everything_without_ignore(ctx_dir: Path) -> None:
    (root,) = BuildContext.from_dir(ctx_dir).resolve_sources(["."])
    assert "docs/img/logo.png" in walked(root) and "empty" in walked(root)


# ------------------------------------------------------------- .dockerignore


def test_ignored_sources_and_wildcards(ctx_dir: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("# build junk\n*.md\ndocs\nsrc/sub\n")
    ctx = BuildContext.from_dir(ctx_dir)
    for src in ["c.md", "docs", "docs/README.md", "src/sub/deep.go"]:
        with pytest.raises(PybuildError, match="excluded by .dockerignore"):
            ctx.resolve_sources([src])
    with pytest.raises(PybuildError, match="no source files"):
        ctx.resolve_sources(["*.md"])
    assert paths(ctx.resolve_sources(["*"])) == [".dockerignore", "Dockerfile", "a.txt", "b.txt", "empty", "src"]
    (src,) = ctx.resolve_sources(["src"])
    assert walked(src) == [".", "main.go", "util.go"]
    (root,) = ctx.resolve_sources(["."])
    assert walked(root) == [".", ".dockerignore", "Dockerfile", "a.txt", "b.txt", "empty",
                            "src", "src/main.go", "src/util.go"]


def test_exceptions_reinclude_inside_excluded_directory(ctx_dir: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("docs\n!docs/README.md\n*.txt\n!b.txt\n")
    ctx = BuildContext.from_dir(ctx_dir)
    (docs,) = ctx.resolve_sources(["docs"])  # kept as the parent of README.md
    assert walked(docs) == [".", "README.md"]
    assert paths(ctx.resolve_sources(["docs/*"])) == ["docs/README.md"]
    assert paths(ctx.resolve_sources(["*.txt"])) == ["b.txt"]
    with pytest.raises(PybuildError, match="file not found"):
        ctx.resolve_sources(["docs/guide.md"])
    (root,) = ctx.resolve_sources(["."])
    assert [p for p in walked(root) if p.startswith("docs")] == ["docs", "docs/README.md"]


def test_wildcard_exception_reaches_deep(ctx_dir: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("*\n!**/*.go\n")
    ctx = BuildContext.from_dir(ctx_dir)
    (root,) = ctx.resolve_sources(["."])
    assert walked(root) == [".", "src", "src/main.go", "src/sub", "src/sub/deep.go", "src/util.go"]
    with pytest.raises(PybuildError):
        ctx.resolve_sources(["Dockerfile"])  # BuildKit: ignoring the Dockerfile hides it from COPY


def test_excluded_directory_is_not_read(ctx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(ctx_dir, {f"node_modules/pkg{i}/index.js": "" for i in range(3)})
    (ctx_dir / ".dockerignore").write_text("node_modules\n!src\n")
    scanned: list[str] = []
    real_scan = context_module._scan

    def spy(path: Path | str) -> list[os.DirEntry[str]]:
        scanned.append(str(path))
        return real_scan(path)

    monkeypatch.setattr(context_module, "_scan", spy)
    (root,) = BuildContext.from_dir(ctx_dir).resolve_sources(["."])
    assert "node_modules" not in walked(root)
    assert not [p for p in scanned if "node_modules" in p]


def test_dockerfile_specific_ignore_file_wins(ctx_dir: Path, tmp_path: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("a.txt\n")
    elsewhere = make_tree(tmp_path / "dockerfiles", {"app.Dockerfile": "FROM x\n",
                                                     "app.Dockerfile.dockerignore": "b.txt\n"})
    ctx = BuildContext.from_dir(ctx_dir, elsewhere / "app.Dockerfile")
    assert ctx.ignore_file == elsewhere / "app.Dockerfile.dockerignore"
    assert paths(ctx.resolve_sources(["*.txt"])) == ["a.txt"]
    assert find_ignore_file(ctx_dir, elsewhere / "other.Dockerfile") == ctx_dir / ".dockerignore"
    assert find_ignore_file(ctx_dir, "-") == ctx_dir / ".dockerignore"
    with pytest.raises(PybuildError, match="excluded by app.Dockerfile.dockerignore"):
        ctx.resolve_sources(["b.txt"])


def test_bad_ignore_pattern_points_at_its_line(ctx_dir: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("# ok\n*.txt\n!\n")
    with pytest.raises(PybuildError) as caught:
        BuildContext.from_dir(ctx_dir)
    assert caught.value.place == f"{ctx_dir.resolve() / '.dockerignore'}:3"
    assert "exclusion" in caught.value.message


def test_regex_error_in_ignore_file_surfaces_on_use(ctx_dir: Path) -> None:
    (ctx_dir / ".dockerignore").write_text("a.txt\n[Local-Only]\n")
    ctx = BuildContext.from_dir(ctx_dir)
    with pytest.raises(PybuildError) as caught:
        ctx.resolve_sources(["b.txt"])
    assert caught.value.place is not None and caught.value.place.endswith(".dockerignore:2")


# ------------------------------------------------------------- escaping and symlinks


@pytest.mark.parametrize("src", ["../outside", "a/../../outside", "/../outside", ".."])
def test_sources_outside_the_context_are_refused(ctx_dir: Path, src: str) -> None:
    (ctx_dir.parent / "outside").write_text("secret")
    with pytest.raises(PybuildError, match="forbidden path outside the build context"):
        BuildContext.from_dir(ctx_dir).resolve_sources([src])


def test_symlinks_inside_are_followed(ctx_dir: Path) -> None:
    make_tree(ctx_dir, {"link.txt": "-> a.txt", "srclink": "-> src", "nested/up": "-> ../src/sub"})
    ctx = BuildContext.from_dir(ctx_dir)
    f, d, up, through = ctx.resolve_sources(["link.txt", "srclink", "nested/up", "srclink/sub/deep.go"])
    assert (f.path, f.abs_path, f.is_dir, f.real_path) == ("link.txt", ctx.root / "a.txt", False, "a.txt")
    assert (d.path, d.is_dir) == ("srclink", True) and walked(d)[:2] == [".", "main.go"]
    assert up.real_path == "src/sub"
    assert through.abs_path == ctx.root / "src/sub/deep.go"


@pytest.mark.parametrize("target", ["../outside", "../../etc", "/etc/passwd", "src/../../outside"])
def test_symlinks_leaving_the_context_are_refused(ctx_dir: Path, target: str) -> None:
    (ctx_dir.parent / "outside").write_text("secret")
    (ctx_dir / "esc").symlink_to(target)
    ctx = BuildContext.from_dir(ctx_dir)
    with pytest.raises(PybuildError, match="points outside the build context"):
        ctx.resolve_sources(["esc"])
    with pytest.raises(PybuildError, match="points outside the build context"):
        ctx.resolve_sources(["es?"])


def test_escaping_symlink_inside_a_copied_directory_is_only_reported(ctx_dir: Path) -> None:
    (ctx_dir / "src/etc").symlink_to("/etc")
    (src,) = BuildContext.from_dir(ctx_dir).resolve_sources(["src"])
    entries = dict(walk(src))
    assert stat.S_ISLNK(entries["etc"].st_mode)
    assert not any(rel.startswith("etc/") for rel in entries)


def test_dangling_loop_and_ignored_target(ctx_dir: Path) -> None:
    make_tree(ctx_dir, {"dangling": "-> nowhere", "loop1": "-> loop2", "loop2": "-> loop1",
                        "secret.key": "k", "key": "-> secret.key", ".dockerignore": "*.key\n"})
    ctx = BuildContext.from_dir(ctx_dir)
    with pytest.raises(PybuildError, match="file not found"):
        ctx.resolve_sources(["dangling"])
    with pytest.raises(PybuildError, match="too many levels of symbolic links"):
        ctx.resolve_sources(["loop1"])
    with pytest.raises(PybuildError, match="file not found"):
        ctx.resolve_sources(["key"])  # the link is sent, its target is not


def test_context_root_may_itself_be_a_symlink(ctx_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(ctx_dir)
    ctx = BuildContext.from_dir(tmp_path / "alias")
    assert ctx.root == ctx_dir.resolve()
    assert paths(ctx.resolve_sources(["*.txt"])) == ["a.txt", "b.txt"]


# ------------------------------------------------------------- stdin tars


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for entry in entries:
            if isinstance(entry, tuple):
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(entry[1]))
            else:
                tar.addfile(entry)
    buf.seek(0)
    return buf


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_context(tmp_path: Path, mode: str) -> None:
    stream = tar_bytes(
        [
            special(".", tarfile.DIRTYPE),
            ("./Dockerfile", b"FROM scratch\n"),
            ("./Dockerfile.dockerignore", b"**/*.log\n"),  # "*.log" would only match at the top
            special("./app", tarfile.DIRTYPE),
            ("./app/main.py", b"print(1)\n"),
            ("./app/debug.log", b"noise"),
            special("./app/current", tarfile.SYMTYPE, "../app/main.py"),
            special("./app/hard", tarfile.LNKTYPE, "app/main.py"),
        ],
        mode,
    )
    ctx = BuildContext.from_tar(stream, tmp_path)
    assert ctx.root == (tmp_path / "context").resolve()
    assert ctx.ignore_file == ctx.root / "Dockerfile.dockerignore"
    (app,) = ctx.resolve_sources(["app"])
    assert walked(app) == [".", "current", "hard", "main.py"]
    (current,) = ctx.resolve_sources(["app/current"])
    assert current.abs_path.read_text() == "print(1)\n"
    assert stat.S_IMODE(os.stat(ctx.root).st_mode) == 0o700
    assert not (tmp_path / "context.tar").exists()


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (("../evil", b"x"), "'..'"),
        (("/abs/evil", b"x"), "absolute path"),
        (("a/../../evil", b"x"), "'..'"),
        (special("etc", tarfile.SYMTYPE, "/etc"), "absolute path"),
        (special("sub/up", tarfile.SYMTYPE, "../../evil"), "outside the context"),
        (special("null", tarfile.CHRTYPE), "device"),
        (special("disk", tarfile.BLKTYPE), "device"),
        (special("pipe", tarfile.FIFOTYPE), "named pipe"),
        (special("hard", tarfile.LNKTYPE, "../evil"), "'..'"),
        (special("hard", tarfile.LNKTYPE, "never-seen"), "hard link"),
    ],
)
def test_malicious_tar_members_are_refused(
    tmp_path: Path, member: tarfile.TarInfo | tuple[str, bytes], why: str
) -> None:
    stream = tar_bytes([("Dockerfile", b"FROM scratch\n"), member])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(PybuildError, match="refusing the build context") as caught:
        BuildContext.from_tar(stream, work)
    assert why in caught.value.message
    assert not (tmp_path / "evil").exists()
    assert not (work / "context" / "Dockerfile").exists()  # nothing extracted at all


def test_tar_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    stream = tar_bytes([special("dir", tarfile.SYMTYPE, "."), ("dir/x", b"x")])
    with pytest.raises(PybuildError, match="through a symlink"):
        BuildContext.from_tar(stream, tmp_path)
    stream = tar_bytes([("dir/x", b"x"), special("dir", tarfile.SYMTYPE, "other")])
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(PybuildError, match="earlier entry"):
        BuildContext.from_tar(stream, again)


def test_garbage_on_stdin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="cannot read the build context from stdin"):
        BuildContext.from_tar(io.BytesIO(b"this is not a tar archive" * 40), tmp_path)


def test_tar_dockerfile_must_stay_inside(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="outside the build context"):
        BuildContext.from_tar(tar_bytes([("Dockerfile", b"")]), tmp_path, dockerfile="../Dockerfile")
