"""Word expansion: BuildKit's own vectors, the used-name report, and robustness."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grammar.errors import PybuildError
from grammar.shell import (
    EXPANDING_INSTRUCTIONS,
    WORD_SPLITTING_INSTRUCTIONS,
    Expansion,
    ShellError,
    expand,
    expand_word,
    expand_words,
    expands,
)

VECTORS = Path(__file__).parent / "data" / "buildkit" / "shell"
# The environment BuildKit's TestShellParser4EnvVars uses for every line.
ENV_VAR_TEST_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def _lines(name: str) -> list[tuple[int, str]]:
    # Split on \n only: str.splitlines would also split on \x1c, \u2028 ...
    lines = (VECTORS / name).read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":  # the final newline ends a line, it does not start one
        lines.pop()
    return [(number, line.removesuffix("\r")) for number, line in enumerate(lines, 1)]


def _env_var_cases() -> list[object]:
    """envVarTest lines for all platforms (A) and unix (U), parsed as lex_test.go does."""
    cases = []
    for number, line in _lines("envVarTest"):
        if line.startswith("#") or not line.strip():
            continue
        platform, source, expected = (field.strip() for field in line.strip().split("|"))
        assert platform in ("A", "U", "W"), f"bad platform tag on line {number}"
        if platform != "W":
            cases.append(pytest.param(source, expected, id=f"L{number}:{source}"))
    return cases


def _words_cases() -> list[object]:
    """wordsTest lines with the environment built by the ENV lines above each."""
    cases = []
    env: dict[str, str] = {}
    for number, line in _lines("wordsTest"):
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            # Trailing spaces of the value are significant, leading ones are not.
            key, _, value = line[3:].lstrip(" ").partition("=")
            env = {**env, key: value}
            continue
        source, expected = line.split("|")
        source = source.strip()
        cases.append(pytest.param(source, expected.lstrip(" ").split(","), env, id=f"L{number}:{source}"))
    return cases


ENV_VAR_CASES = _env_var_cases()
WORDS_CASES = _words_cases()


def test_vector_files_are_complete() -> None:
    # Guards against a parsing slip silently dropping vectors.
    assert len(ENV_VAR_CASES) == 228
    assert len(WORDS_CASES) == 24


@pytest.mark.parametrize(("source", "expected"), ENV_VAR_CASES)
def test_buildkit_env_var_vectors(source: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(ShellError):
            expand_word(source, ENV_VAR_TEST_ENV)
    else:
        assert expand_word(source, ENV_VAR_TEST_ENV) == expected


@pytest.mark.parametrize(("source", "expected", "env"), WORDS_CASES)
def test_buildkit_words_vectors(source: str, expected: list[str], env: dict[str, str]) -> None:
    try:
        result = expand_words(source, env)
    except ShellError:
        result = ["error"]
    assert result == expected


def test_trailing_spaces_in_words_vectors_survived() -> None:
    # The ENV trailing=... line and one expectation end in three spaces.
    (trailing_env,) = {case.values[2]["trailing"] for case in WORDS_CASES if "trailing" in case.values[2]}
    assert trailing_env == "ab c   "
    assert ["helloab c   "] in [case.values[1] for case in WORDS_CASES]


# The cases of BuildKit's TestProcessWithMatches: value, found names, missing names.
MATCH_CASES = [
    ("x", {"DUMMY": "dummy"}, "x", set(), set()),
    ("x ${UNUSED}", {"DUMMY": "dummy"}, "x ", set(), {"UNUSED"}),
    ("x ${FOO}", {"FOO": "y"}, "x y", {"FOO"}, set()),
    ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx  ccc", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx bbb ccc", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:-}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${FOO:-}", {}, "", set(), {"FOO"}),
    ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa bbb ", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa  ", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${BAR?bbb}", {"FOO": "xxx", "BAR": ""}, "", {"BAR"}, set()),
    ("${FOO:?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${FOO#()[]{\\}^$.\\*\\?|\\\\}", {"FOO": "()[]{}^$.*?|\\x"}, "x", {"FOO"}, set()),
    ("${FOO%%\\**}", {"FOO": "xx**"}, "xx", {"FOO"}, set()),
    ("${FOO#*x*y}", {"FOO": "xxyy"}, "y", {"FOO"}, set()),
    ("${FOO#*}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": "x"}, "xyy", {"FOO", "BAR"}, set()),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}, set()),
    ("${FOO#}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO##*x}", {"FOO": "xxyy"}, "yy", {"FOO"}, set()),
    ("${FOO##}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO#?\\?}", {"FOO": "???y"}, "?y", {"FOO"}, set()),
    ("${ABC:-.}${FOO%x}${ABC:-.}", {"FOO": "xxyy"}, ".xxyy.", {"FOO"}, {"ABC"}),
    ("${FOO%%\\**\\*}", {"FOO": "a***yy*"}, "a", {"FOO"}, set()),
    ("${FOO%}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO%%$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}, set()),
    (
        "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
        {"FOO": "/foo*/*/*.txt", "NEEDLE": "\\*/"},
        "/foo.*/*.txt - /foo..*.txt",
        {"FOO", "NEEDLE"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
        {"FOO": "/tmp/tmp/bar.txt", "NEEDLE": "/tmp"},
        "/tmp/bar.txt - /bar.txt",
        {"FOO", "NEEDLE"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
        {"FOO": "/a/foo/b/c.txt", "NEEDLE": "/?/", "REPLACEMENT": "/"},
        "/foo/b/c.txt - /foo/c.txt",
        {"FOO", "NEEDLE", "REPLACEMENT"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT}",
        {"FOO": "http://google.de", "NEEDLE": "http://", "REPLACEMENT": "https://"},
        "https://google.de",
        {"FOO", "NEEDLE", "REPLACEMENT"},
        set(),
    ),
    ("${FOO//\\//\\/}", {"FOO": "/tmp/foo.txt"}, "\\/tmp\\/foo.txt", {"FOO"}, set()),
    ("${FOO/$BAR/ww}", {"FOO": "xxyy", "BAR": ""}, "wwxxyy", {"FOO", "BAR"}, set()),
    ("${FOO///}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO///}", {}, "", set(), {"FOO"}),
    (
        "something-${VERSION}.${TARGETOS}-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}.tar.gz",
        {"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm", "TARGETVARIANT": "v7"},
        "something-v1.2.3.linux-arm-v7.tar.gz",
        {"VERSION", "TARGETOS", "TARGETARCH", "TARGETVARIANT"},
        set(),
    ),
]


@pytest.mark.parametrize(("source", "env", "value", "used", "unset"), MATCH_CASES, ids=[c[0] for c in MATCH_CASES])
def test_used_and_unset_names(source: str, env: dict[str, str], value: str, used: set[str], unset: set[str]) -> None:
    result = expand(source, env)
    assert result == Expansion(value, result.words, frozenset(used), frozenset(unset))
    assert result.referenced == used | unset


@pytest.mark.parametrize(
    "source",
    ["${BAZ?ccc}", "${BAR:?bbb}", "${BAZ:?ccc}", "${BAZ:?}", "${FOO=aaa}", "${FOO=:aaa}", "${FOO=}", "${FOO//ww}", "${FOO//}"],
)
def test_buildkit_match_errors(source: str) -> None:
    with pytest.raises(ShellError):
        expand(source, {"FOO": "xxyy", "BAR": ""})


def test_names_in_defaults_count_even_when_unused() -> None:
    # BuildKit expands the default before deciding whether it is needed.
    result = expand("${PWD:-$OTHER}", {"PWD": "/"})
    assert (result.value, result.used, result.unset) == ("/", {"PWD"}, {"OTHER"})


def test_positional_and_special_parameters_are_reported_unset() -> None:
    assert expand("$1${@}$$.$", {}).unset == {"1", "@", "$"}
    assert expand("$. $ \\$X '$Y'", {}).referenced == frozenset()


def test_lookup_is_case_sensitive() -> None:
    result = expand("$pwd", {"PWD": "/home"})
    assert (result.value, result.unset) == ("", {"pwd"})


def test_mandatory_message_is_expanded() -> None:
    # TestShellParserMandatoryEnvVars
    for env in ({"VAR": "", "ARG": "x"}, {"ARG": "x"}):
        with pytest.raises(ShellError, match="message herex"):
            expand_word("${VAR:?message here$ARG}", env)
    with pytest.raises(ShellError, match="message herex"):
        expand_word("${VAR?message here$ARG}", {"ARG": "x"})
    assert expand_word("${VAR?message here$ARG}", {"VAR": "", "ARG": "x"}) == ""
    assert expand_word("${VAR:?message here$ARG}", {"VAR": "plain"}) == "plain"


def test_error_is_a_pybuild_error_with_the_word_and_reason() -> None:
    with pytest.raises(PybuildError) as caught:
        expand_word("${NAME:?must be set}", {})
    error = caught.value
    assert isinstance(error, ShellError)
    assert (error.detail, error.word, error.place) == ("NAME: must be set", "${NAME:?must be set}", None)
    assert str(error) == 'failed to process "${NAME:?must be set}": NAME: must be set'
    error.place = "Dockerfile:3"
    assert str(error).startswith("Dockerfile:3: failed to process")


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ('"abc', "unexpected end of statement while looking for matching double-quote"),
        ("'abc", "unexpected end of statement while looking for matching single-quote"),
        ("${}", "syntax error: bad substitution"),
        ("${", "syntax error: missing '}'"),
        ("${X", "syntax error: missing '}'"),
        ("${X:-a", "syntax error: missing '}'"),
        ("${X/a", "syntax error: missing '/' in ${}"),
        ("${X:=a}", "unsupported modifier (:=) in substitution"),
        ("${X:?}", "X: is not allowed to be unset"),
        ("${NULL:?}", "NULL: is not allowed to be empty"),
        ("${X#a\\b}", "invalid pattern (a\\b) in substitution: invalid escape '\\b'"),
        ("${X:-${Y:?oops}}", "Y: oops"),
    ],
)
def test_error_details(source: str, detail: str) -> None:
    with pytest.raises(ShellError) as caught:
        expand_word(source, {"NULL": ""})
    assert caught.value.detail == detail


def test_error_message_quotes_like_go() -> None:
    with pytest.raises(ShellError) as caught:
        expand_word('a\t"\\\x01é', {})
    assert caught.value.message.startswith('failed to process "a\\t\\"\\\\\\x01é":')


def test_backtick_escape() -> None:
    env = {"PWD": "/home"}
    assert expand_word("he`$PWD", env, "`") == "he$PWD"
    assert expand_word("he$PWD", env, "`") == "he/home"
    assert expand_word("a\\b", env, "`") == "a\\b"  # backslash is an ordinary character
    assert expand_word('"a`"b"', env, "`") == 'a"b'
    assert expand_word('"a\\$PWD"', env, "`") == "a\\/home"
    assert expand_word('"a`x"', env, "`") == "a`x"  # escape only escapes " $ and itself
    assert expand_word("a``", env, "`") == "a`"
    assert expand_word("hello`", env, "`") == "hello"
    assert expand_words("a` b c", env, "`") == ["a b", "c"]
    with pytest.raises(ValueError):
        expand_word("x", env, "/")


def test_words_split_only_unquoted_whitespace() -> None:
    env = {"V": " a  b ", "N": "x\xa0y"}
    assert expand_words('$V "$V" \'$V\'', env) == ["a", "b", " a  b ", "$V"]
    assert expand_words('"" a "" b', env) == ["a", "b"]
    assert expand_words("$N", env) == ["x", "y"]  # NBSP is white space to Go
    assert expand_words("a\x1cb", env) == ["a\x1cb"]  # but not U+001C, unlike str.isspace
    assert expand("$V x", env).value == " a  b  x"


def test_pattern_operators() -> None:
    env = {"P": "/usr/local/lib/file.tar.gz"}
    assert expand_word("${P#*/}", env) == "usr/local/lib/file.tar.gz"
    assert expand_word("${P##*/}", env) == "file.tar.gz"
    assert expand_word("${P%.*}", env) == "/usr/local/lib/file.tar"
    assert expand_word("${P%%.*}", env) == "/usr/local/lib/file"
    assert expand_word("${P:#/usr}", env) == "/local/lib/file.tar.gz"  # ':' is accepted and ignored
    assert expand_word("${P/l?b/LIB}", env) == "/usr/local/LIB/file.tar.gz"
    assert expand_word("${P//l/L}", env) == "/usr/LocaL/Lib/fiLe.tar.gz"
    assert expand_word("${UNSET#x}", env) == ""


def test_replace_all_follows_go_regexp_rules() -> None:
    env = {"V": "abc", "R": "[$0]", "D": "$$ ${0} $x $"}
    # An empty match right after a match is not replaced (re.sub would give "--").
    assert expand_word("${V//*/-}", env) == "-"
    # In a replace-all, $0 in the replacement is the match; a single replace is literal.
    assert expand_word("${V//b/$R}", env) == "a[b]c"
    assert expand_word("${V/b/$R}", env) == "a[$0]c"
    assert expand_word("${V//b/$D}", env) == "a$ b  $c"
    # The kept escape of \$ leaves a backslash in front of the expanded group.
    assert expand_word("${V//b/\\$0}", env) == "a\\bc"


def test_options_for_step_names_and_heredocs() -> None:
    env = {"A": "1"}
    assert expand_word("x '$A' \"$A\"", env) == "x $A 1"
    assert expand("x '$A' \"$A\"", env, raw_quotes=True).value == "x '$A' \"1\""
    assert expand("x '$A' \"$A\"", env, skip_quotes=True).value == "x '1' \"1\""
    assert expand("a\\$A\\b", env, raw_escapes=True).value == "a\\$A\\b"
    kept = expand("$A $B ${C} ${D:-x} ${E/a/b}", env, keep_unset=True)
    assert kept.value == "1 $B ${C} ${D:-x} ${E/a/b}"
    assert kept.unset == {"B", "C", "D", "E"}


def test_leading_byte_order_mark_is_dropped() -> None:
    # Go's text/scanner skips a BOM at the start, and only there.
    assert expand_word("\ufeffa\ufeff", {}) == "a\ufeff"


def test_deep_nesting_is_a_shell_error() -> None:
    with pytest.raises(ShellError):
        expand_word("${A:-" * 2000 + "}" * 2000, {})


def test_expanding_instructions() -> None:
    assert {"ENV", "ARG", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "FROM"} <= EXPANDING_INSTRUCTIONS
    assert not {"RUN", "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK", "ONBUILD", "MAINTAINER"} & EXPANDING_INSTRUCTIONS
    assert WORD_SPLITTING_INSTRUCTIONS <= EXPANDING_INSTRUCTIONS
    assert expands("workdir") and expands("Copy") and not expands("run")


_SHELLISH = st.text(alphabet=st.sampled_from(list("${}:-+?#%/\\`'\" \tab1_@.*\n")) | st.characters(), max_size=60)


@given(word=_SHELLISH, escape=st.sampled_from(["\\", "`"]), value=st.text(max_size=8))
def test_expansion_returns_text_or_shell_error(word: str, escape: str, value: str) -> None:
    env = {"a": value, "b": "", "ab": "x y"}
    try:
        result = expand(word, env, escape)
    except ShellError as error:
        assert error.word == word and error.detail
        return
    assert isinstance(result.value, str)
    assert all(w and isinstance(w, str) for w in result.words)
    assert result.used <= env.keys() and not (result.unset & env.keys())
    assert expand_word(word, env, escape) == result.value


@given(word=st.text(max_size=80))
def test_expand_word_on_any_text(word: str) -> None:
    try:
        assert isinstance(expand_word(word, {"PWD": "/home"}), str)
    except ShellError:
        pass
