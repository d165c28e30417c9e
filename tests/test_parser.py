"""The raw parse against BuildKit's vectors, dockerfile-parse as an oracle, and fuzzing."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grammar.errors import PybuildError
from grammar.parser import dump, parse

DATA = Path(__file__).parent / "data" / "buildkit"
EXAMPLES = Path(__file__).parent.parent / "examples" / "Dockerfiles"
CASES = sorted(p.parent.name for p in (DATA / "parser").glob("*/Dockerfile"))
NEGATIVE = sorted(p.parent.name for p in (DATA / "parser-negative").glob("*/Dockerfile"))

# Files where dockerfile-parse itself departs from the reference parser (our dump
# equals BuildKit's result for all of them): it keeps comment lines and blank
# lines inside continuations as instructions or text, joins an escaped trailing
# backslash, and drops a continuation ending at EOF.
ORACLE_DIVERGES = {
    "brimstone-consuldock", "brimstone-docker-consul", "continue-at-eof", "continueIndent",
    "env", "escapes", "trailing-backslash",
}


def test_all_vectors_present():
    assert len(CASES) == 33 and len(NEGATIVE) == 4


@pytest.mark.parametrize("case", CASES)
def test_reference_vector(case):
    folder = DATA / "parser" / case
    assert dump(parse((folder / "Dockerfile").read_bytes())) == (folder / "result").read_text()


@pytest.mark.parametrize("case", NEGATIVE)
def test_reference_negative(case):
    with pytest.raises(PybuildError) as info:
        parse((DATA / "parser-negative" / case / "Dockerfile").read_bytes())
    assert "Dockerfile:" in str(info.value)


def oracle_files():
    files = [DATA / "parser" / c / "Dockerfile" for c in CASES if c not in ORACLE_DIVERGES]
    files += sorted(EXAMPLES.glob("*/Dockerfile")) + sorted(EXAMPLES.glob("*.Dockerfile"))
    return [f for f in files if b"<<" not in f.read_bytes()]  # dockerfile-parse has no heredocs


@pytest.mark.parametrize("path", oracle_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dockerfile_parse_oracle(path):
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    data = path.read_bytes()
    ours = parse(data).nodes
    theirs = [s for s in dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(data)).structure
              if s["instruction"] != "COMMENT"]
    assert [n.keyword.upper() for n in ours] == [s["instruction"] for s in theirs]
    for node, other in zip(ours, theirs):
        assert (node.start_line, node.end_line) == (other["startline"] + 1, other["endline"] + 1)
        assert node.original.strip()[len(node.keyword):].strip() == other["value"]


def test_oracle_covers_examples():
    assert len(oracle_files()) >= 26 + 5


def test_crlf_and_bom():
    text = "\ufeffFROM a\r\nRUN echo \\\r\n  hi\r\n"
    assert dump(parse(text)) == '(from "a")\n(run "echo   hi")\n'


def test_heredocs():
    text = ("FROM a\nRUN <<EOF cat >/x && <<-'END' cat\necho $HOME\nEOF\n\t\tliteral $X\n\tEND\n"
            "COPY <<one.txt <<\"two\" /dest/\n1\none.txt\n2\ntwo\nRUN [\"echo\", \"<<EOF\"]\n")
    nodes = parse(text).nodes
    run = nodes[1]
    assert [(h.name, h.expand, h.chomp) for h in run.heredocs] == [("EOF", True, False), ("END", False, True)]
    assert run.heredocs[0].content == "echo $HOME\n"
    assert run.heredocs[1].text == "literal $X\n"
    assert (run.start_line, run.end_line) == (2, 6)
    copy = nodes[2]
    assert [(h.name, h.content, h.expand) for h in copy.heredocs] == [("one.txt", "1\n", True), ("two", "2\n", False)]
    assert nodes[3].json and not nodes[3].heredocs


def test_heredoc_in_onbuild():
    nodes = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n").nodes
    assert nodes[1].trigger.heredocs[0].content == "echo hi\n"


@pytest.mark.parametrize("text, line, words", [
    ("FROM a\nRUN <<EOF\necho hi\n", 2, "unterminated heredoc"),
    ("FROM a\n# escape=`\nRUN x\n", 2, "escape directive"),
    ("# escape=x\nFROM a\n", 1, "invalid escape token"),
    ("# escape=`\n# escape=\\\nFROM a\n", 2, "only one escape"),
    ('FROM a\nCMD ["a", 1]\n', 2, "strings only"),
    ("", 1, "no instructions"),
])
def test_parse_errors_name_the_line(text, line, words):
    with pytest.raises(PybuildError) as info:
        parse(text)
    assert f"Dockerfile:{line}:" in str(info.value)
    assert words in str(info.value)


def test_escape_backtick_everywhere():
    text = "# escape=`\nFROM a\nRUN dir c:\\ `\n  && echo done\nCOPY a\\b c:\\d\\\n"
    assert dump(parse(text)) == '(from "a")\n(run "dir c:\\\\   && echo done")\n(copy "a\\\\b" "c:\\\\d\\\\")\n'


def test_case_insensitive_keywords():
    assert dump(parse("from a AS b\nrUn x\n")) == '(from "a" "AS" "b")\n(run "x")\n'


KEYWORDS = ["FROM", "RUN", "CMD", "COPY", "ADD", "ENV", "ARG", "LABEL", "ONBUILD", "HEALTHCHECK",
            "SHELL", "USER", "WORKDIR", "EXPOSE", "VOLUME", "ENTRYPOINT", "STOPSIGNAL", "MAINTAINER", "BOGUS"]
pieces = st.one_of(
    st.sampled_from(KEYWORDS), st.sampled_from(["\\", "`", "\n", "\r\n", " ", "\t", "#", "<<EOF", "EOF", "<<-'X'",
                                                "[", "]", '"', "'", "=", "--", "--mount=type=cache", ",", "$", "${",
                                                "}", "# escape=`\n", "\ufeff"]),
    st.text(max_size=6),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(pieces, max_size=40))
def test_fuzz_parser_only_returns_or_raises_parse_error(parts):
    text = "".join(parts)
    try:
        result = parse(text)
    except PybuildError:
        return
    assert dump(result).count("\n") == len(result.nodes)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(CASES), st.integers(min_value=0, max_value=400), st.text(max_size=4))
def test_fuzz_mutated_vectors(case, offset, insert):
    text = (DATA / "parser" / case / "Dockerfile").read_text()
    offset = min(offset, len(text))
    mutated = text[:offset] + insert + text[offset + 1:]
    try:
        parse(mutated)
    except PybuildError:
        pass
