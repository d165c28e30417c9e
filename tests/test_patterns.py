"""Ignore-pattern and COPY-glob semantics.

The tables marked "moby" are cases from moby/patternmatcher (patternmatcher_test.go,
ignorefile/ignorefile_test.go), Apache-2.0, rewritten as pytest parameters.
Go's deprecated ``Matches`` is exercised through ``matches_or_parent_matches``,
which agrees with it on every case here.
"""
from __future__ import annotations

import pytest

from builder.patterns import (
    MatchType,
    PatternError,
    PatternMatcher,
    clean,
    dir_name,
    glob_match,
    has_wildcards,
    matches_or_parent_matches,
    parse_ignore,
    read_ignore,
    split_wildcards,
)
from grammar.errors import PybuildError

FAIL, EXACT, INEXACT = "fail", "exact", "inexact"

# moby: TestMatches `tests` (plus the non-Windows escape cases)
MATCHES = [
    ("**", "file", EXACT),
    ("**", "file/", EXACT),
    ("**/", "file", EXACT),
    ("**/", "file/", EXACT),
    ("**", "/", EXACT),
    ("**/", "/", EXACT),
    ("**", "dir/file", EXACT),
    ("**/", "dir/file", EXACT),
    ("**", "dir/file/", EXACT),
    ("**/", "dir/file/", EXACT),
    ("**/**", "dir/file", EXACT),
    ("**/**", "dir/file/", EXACT),
    ("dir/**", "dir/file", EXACT),
    ("dir/**", "dir/file/", EXACT),
    ("dir/**", "dir/dir2/file", EXACT),
    ("dir/**", "dir/dir2/file/", EXACT),
    ("**/dir", "dir", EXACT),
    ("**/dir", "dir/file", INEXACT),
    ("**/dir2/*", "dir/dir2/file", EXACT),
    ("**/dir2/*", "dir/dir2/file/", INEXACT),
    ("**/dir2/**", "dir/dir2/dir3/file", EXACT),
    ("**/dir2/**", "dir/dir2/dir3/file/", EXACT),
    ("**file", "file", EXACT),
    ("**file", "dir/file", EXACT),
    ("**/file", "dir/file", EXACT),
    ("**file", "dir/dir/file", EXACT),
    ("**/file", "dir/dir/file", EXACT),
    ("**/file*", "dir/dir/file", EXACT),
    ("**/file*", "dir/dir/file.txt", EXACT),
    ("**/file*txt", "dir/dir/file.txt", EXACT),
    ("**/file*.txt", "dir/dir/file.txt", EXACT),
    ("**/file*.txt*", "dir/dir/file.txt", EXACT),
    ("**/**/*.txt", "dir/dir/file.txt", EXACT),
    ("**/**/*.txt2", "dir/dir/file.txt", FAIL),
    ("**/*.txt", "file.txt", EXACT),
    ("**/**/*.txt", "file.txt", EXACT),
    ("a**/*.txt", "a/file.txt", EXACT),
    ("a**/*.txt", "a/dir/file.txt", EXACT),
    ("a**/*.txt", "a/dir/dir/file.txt", EXACT),
    ("a/*.txt", "a/dir/file.txt", FAIL),
    ("a/*.txt", "a/file.txt", EXACT),
    ("a/*.txt**", "a/file.txt", EXACT),
    ("a[b-d]e", "ae", FAIL),
    ("a[b-d]e", "ace", EXACT),
    ("a[b-d]e", "aae", FAIL),
    ("a[^b-d]e", "aze", EXACT),
    (".*", ".foo", EXACT),
    (".*", "foo", FAIL),
    ("abc.def", "abcdef", FAIL),
    ("abc.def", "abc.def", EXACT),
    ("abc.def", "abcZdef", FAIL),
    ("abc?def", "abcZdef", EXACT),
    ("abc?def", "abcdef", FAIL),
    ("**/foo/bar", "foo/bar", EXACT),
    ("**/foo/bar", "dir/foo/bar", EXACT),
    ("**/foo/bar", "dir/dir2/foo/bar", EXACT),
    ("abc/**", "abc", FAIL),
    ("abc/**", "abc/def", EXACT),
    ("abc/**", "abc/def/ghi", EXACT),
    ("**/.foo", ".foo", EXACT),
    ("**/.foo", "bar.foo", FAIL),
    ("a(b)c/def", "a(b)c/def", EXACT),
    ("a(b)c/def", "a(b)c/xyz", FAIL),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", EXACT),
    (
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        EXACT,
    ),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", EXACT),
    ("a\\\\", "a\\", EXACT),
    ("a\\*b", "a*b", EXACT),
]

# moby: TestMatches `multiPatternTests`
MULTI = [
    (["**", "!util/docker/web"], "util/docker/web/foo", FAIL),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", EXACT),
    (
        ["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        FAIL,
    ),
    (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", FAIL),
]


def _ids(cases: list[tuple]) -> list[str]:
    return [f"{c[0]!s}~{c[1]}" for c in cases]


@pytest.mark.parametrize(("pattern", "text", "want"), MATCHES, ids=_ids(MATCHES))
def test_matches_exact(pattern: str, text: str, want: str) -> None:
    assert PatternMatcher([pattern]).matches_exact(text) is (want == EXACT)


@pytest.mark.parametrize(("pattern", "text", "want"), MATCHES, ids=_ids(MATCHES))
def test_matches_or_parent_matches(pattern: str, text: str, want: str) -> None:
    assert PatternMatcher([pattern]).matches_or_parent_matches(text) is (want != FAIL)


def _using_parent_results(pm: PatternMatcher, text: str) -> bool:
    """moby's check: feed each parent directory's MatchInfo to the next level."""
    info: tuple[bool, ...] = ()
    parent = dir_name(text)
    if parent != ".":
        dirs = parent.split("/")
        for i in range(len(dirs)):
            _, info = pm.matches_using_parent_results("/".join(dirs[: i + 1]), info)
    return pm.matches_using_parent_results(text, info)[0]


@pytest.mark.parametrize(("patterns", "text", "want"), [([p], t, w) for p, t, w in MATCHES] + MULTI,
                         ids=_ids(MATCHES) + _ids(MULTI))
def test_matches_using_parent_results(patterns: list[str], text: str, want: str) -> None:
    pm = PatternMatcher(patterns)
    assert _using_parent_results(pm, text) is (want != FAIL)
    assert pm.matches_using_parent_results(text)[0] is (want != FAIL)  # "NoContext"


@pytest.mark.parametrize(("patterns", "text", "want"), MULTI, ids=_ids(MULTI))
def test_multi_pattern_or_parent_matches(patterns: list[str], text: str, want: str) -> None:
    assert PatternMatcher(patterns).matches_or_parent_matches(text) is (want != FAIL)


# moby: the single-function tests at the top of patternmatcher_test.go
@pytest.mark.parametrize(
    ("file", "patterns", "want"),
    [
        ("fileutils.go", ["*"], True),  # TestWildcardMatches
        ("fileutils.go", ["*.go"], True),  # TestPatternMatches
        ("fileutils.go", ["!fileutils.go", "*.go"], True),  # ...PatternBefore
        ("docs/README.md", ["docs", "!docs/README.md"], False),  # ...FolderExclusions
        ("docs/README.md", ["docs/", "!docs/README.md"], False),  # ...FolderWithSlashExclusions
        ("docs/README.md", ["docs/*", "!docs/README.md"], False),  # ...FolderWildcardExclusions
        ("fileutils.go", ["*.go", "!fileutils.go"], False),  # ...PatternAfter
        (".", ["*.go"], False),  # TestExclusionPatternMatchesWholeDirectory
        ("/any/path/there", [], False),  # TestMatchesWithNoPatterns
    ],
)
def test_simple_matches(file: str, patterns: list[str], want: bool) -> None:
    assert matches_or_parent_matches(file, patterns) is want


@pytest.mark.parametrize("patterns", [["!"], ["["]])  # TestSingleExclamationError, ...MalformedPatterns
def test_bad_patterns_rejected(patterns: list[str]) -> None:
    with pytest.raises(PatternError) as caught:
        matches_or_parent_matches("fileutils.go", patterns)
    assert isinstance(caught.value, PybuildError)
    assert caught.value.index == 0


def test_clean_patterns() -> None:  # TestCleanPatterns*
    assert len(PatternMatcher(["docs", "config"]).patterns) == 2
    assert len(PatternMatcher(["docs", "config", ""]).patterns) == 2
    assert PatternMatcher(["docs", "!docs/README.md"]).exclusions
    assert PatternMatcher(["docs", "  !docs/README.md"]).exclusions
    assert PatternMatcher(["docs", "!docs/README.md  "]).exclusions
    assert not PatternMatcher(["docs"]).exclusions


# moby: matchTests ("stolen from go's filepath Match tests"), via Matches(s, [pattern])
GO_MATCH = [
    ("abc", "abc", True),
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ab/c", True),
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True),
    ("a*b?c*x", "abxbbxdbxebxczzy", False),
    ("ab[c]", "abc", True),
    ("ab[b-d]", "abc", True),
    ("ab[e-g]", "abc", False),
    ("ab[^c]", "abc", False),
    ("ab[^b-d]", "abc", False),
    ("ab[^e-g]", "abc", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "ab", False),
    ("a?b", "a☺b", True),
    ("a[^a]b", "a☺b", True),
    ("a???b", "a☺b", False),
    ("a[^a][^a][^a]b", "a☺b", False),
    ("[a-ζ]*", "α", True),
    ("*[a-ζ]", "A", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("[\\]a]", "]", True),
    ("[\\-]", "-", True),
    ("[x\\-]", "x", True),
    ("[x\\-]", "-", True),
    ("[x\\-]", "z", False),
    ("[\\-x]", "x", True),
    ("[\\-x]", "-", True),
    ("[\\-x]", "a", False),
    ("*x", "xxx", True),
]
GO_MATCH_BAD = [
    ("[]a]", "]"),
    ("[-]", "-"),
    ("[x-]", "x"),
    ("[x-]", "-"),
    ("[x-]", "z"),
    ("[-x]", "x"),
    ("[-x]", "-"),
    ("[-x]", "a"),
    ("\\", "a"),
    ("[a-b-c]", "a"),
    ("[", "a"),
    ("[^", "a"),
    ("[^bc", "a"),
    ("a[", "a"),
    ("a[", "ab"),
]


@pytest.mark.parametrize(("pattern", "name", "want"), GO_MATCH, ids=_ids(GO_MATCH))
def test_go_match_table(pattern: str, name: str, want: bool) -> None:
    assert matches_or_parent_matches(name, [pattern]) is want


@pytest.mark.parametrize(("pattern", "name"), GO_MATCH_BAD, ids=_ids(GO_MATCH_BAD))
def test_go_match_table_errors(pattern: str, name: str) -> None:
    with pytest.raises(PatternError):
        matches_or_parent_matches(name, [pattern])


# moby: compileTests (the "/" separator column)
COMPILE = [
    ("*", MatchType.REGEXP, r"^[^/]*$"),
    ("file*", MatchType.REGEXP, r"^file[^/]*$"),
    ("*file", MatchType.REGEXP, r"^[^/]*file$"),
    ("a*/b", MatchType.REGEXP, r"^a[^/]*/b$"),
    ("**", MatchType.SUFFIX, ""),
    ("**/**", MatchType.REGEXP, r"^(.*/)?.*$"),
    ("dir/**", MatchType.PREFIX, ""),
    ("**/dir", MatchType.SUFFIX, ""),
    ("**/dir2/*", MatchType.REGEXP, r"^(.*/)?dir2/[^/]*$"),
    ("**/dir2/**", MatchType.REGEXP, r"^(.*/)?dir2/.*$"),
    ("**file", MatchType.SUFFIX, ""),
    ("**/file*txt", MatchType.REGEXP, r"^(.*/)?file[^/]*txt$"),
    ("**/**/*.txt", MatchType.REGEXP, r"^(.*/)?(.*/)?[^/]*\.txt$"),
    ("a[b-d]e", MatchType.REGEXP, r"^a[b-d]e$"),
    (".*", MatchType.REGEXP, r"^\.[^/]*$"),
    ("abc.def", MatchType.EXACT, ""),
    ("abc?def", MatchType.REGEXP, r"^abc[^/]def$"),
    ("**/foo/bar", MatchType.SUFFIX, ""),
    ("a(b)c/def", MatchType.EXACT, ""),
    ("a.|)$(}+{bc", MatchType.EXACT, ""),
    ("dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", MatchType.EXACT, ""),
]


@pytest.mark.parametrize(("pattern", "kind", "regex"), COMPILE, ids=[c[0] for c in COMPILE])
def test_compile(pattern: str, kind: MatchType, regex: str) -> None:
    compiled = PatternMatcher([pattern]).patterns[0]
    assert compiled.kind is kind
    assert compiled.regex_source == regex


def test_malformed_regex_fails_at_match_time_every_time() -> None:
    # moby: TestMatchesOrParentMatchesMalformedPatternDoesNotPanicOnRepeatedCall
    pm = PatternMatcher(["[Local-Only]/"])  # valid glob syntax, invalid regex range
    for _ in range(2):
        with pytest.raises(PatternError):
            pm.matches_or_parent_matches("x")


def test_exclusion_re_includes_inside_excluded_dir() -> None:
    pm = PatternMatcher(["docs", "!docs/keep/**"])
    assert pm.matches_or_parent_matches("docs/other.md")
    assert not pm.matches_or_parent_matches("docs/keep/a.md")
    assert pm.may_reinclude_under("docs")
    assert not pm.may_reinclude_under("src")


def test_reinclude_pruning_gives_up_on_wildcard_exceptions() -> None:
    assert PatternMatcher(["*", "!**/*.go"]).may_reinclude_under("anything")
    assert not PatternMatcher(["node_modules"]).may_reinclude_under("node_modules")


# moby: ignorefile TestReadAll
def test_read_ignore_moby() -> None:
    content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! "
    assert read_ignore(content) == ["test1", "test2", "a/file/here", "lastfile", "!inverted/abs/path", "!", "!"]
    assert read_ignore("") == []


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("\ufeffnode_modules\n", ["node_modules"]),  # BOM stripped
        (b"\xef\xbb\xbf*.pyc\r\n.git\r\n", ["*.pyc", ".git"]),  # bytes, CRLF
        ("  # not a comment\n", ["# not a comment"]),  # '#' only in column one
        ("./a/../b/\n", ["b"]),
        ("!./keep\n", ["!keep"]),
        ("/\n", ["/"]),
        ("\t spaced \t\n", ["spaced"]),
    ],
)
def test_read_ignore_rules(text: str | bytes, want: list[str]) -> None:
    assert read_ignore(text) == want


def test_parse_ignore_keeps_line_numbers() -> None:
    lines = parse_ignore("# c\n\nfoo\n  \n!bar\n")
    assert [(e.line, e.pattern) for e in lines] == [(3, "foo"), (5, "!bar")]


@pytest.mark.parametrize(
    ("path", "want"),
    [("", "."), ("a//b/./c/", "a/b/c"), ("../a", "../a"), ("/../a", "/a"), ("//a", "/a"), ("a/b/../../..", "..")],
)
def test_clean_matches_go(path: str, want: str) -> None:
    assert clean(path) == want


# ------------------------------------------------------------- COPY globs


@pytest.mark.parametrize(("pattern", "name", "want"), GO_MATCH, ids=_ids(GO_MATCH))
def test_glob_match_go_table(pattern: str, name: str, want: bool) -> None:
    # filepath.Match proper has no parent logic: "a*" against "ab/c" is false.
    expected = want and not (pattern == "a*" and name == "ab/c")
    assert glob_match(pattern, name) is expected


@pytest.mark.parametrize(("pattern", "name"), GO_MATCH_BAD, ids=_ids(GO_MATCH_BAD))
def test_glob_match_bad(pattern: str, name: str) -> None:
    with pytest.raises(PatternError):
        glob_match(pattern, name)


@pytest.mark.parametrize(
    ("pattern", "name", "want"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", "d/a.txt", False),
        ("*/*.txt", "d/a.txt", True),
        ("**", "d/a", False),  # no '**' in filepath.Match
        ("file[0-9]", "file7", True),
        ("[^a]", "/", True),  # Go lets a class match '/'
        ("a[z-a]b", "amb", False),  # a reversed range is legal and matches nothing
    ],
)
def test_glob_match_cases(pattern: str, name: str, want: bool) -> None:
    assert glob_match(pattern, name) is want


@pytest.mark.parametrize(
    ("name", "want"),
    [("a*b", True), ("a?b", True), ("a[b]", True), ("plain", False), ("a\\*b", False), ("a\\\\*", True)],
)
def test_has_wildcards(name: str, want: bool) -> None:
    assert has_wildcards(name) is want


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("src/*/x.go", ("src", "*/x.go")),
        ("*.txt", (".", "*.txt")),
        ("a/b/c", ("a/b/c", "")),
        ("./a/[xy]/b*", ("a", "[xy]/b*")),
    ],
)
def test_split_wildcards(path: str, want: tuple[str, str]) -> None:
    assert split_wildcards(path) == want
