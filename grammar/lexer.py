"""The line-oriented half of the front end: Dockerfile text -> tokens for the Lark grammar.

A Dockerfile is not a context-free language at the character level: the escape
character is chosen by a directive, a backslash at the end of a line joins lines,
comment lines vanish inside continuations, heredoc bodies are raw text, and
whether `[...]` is JSON depends on whether it decodes. This module does that
work exactly as BuildKit's parser does (same rules, same quirks) and hands the
LALR grammar in ``dockerfile.lark`` one token stream per logical instruction.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterator

from lark import Token
from lark.lexer import Lexer

from grammar.errors import PybuildError

DIRECTIVE_RE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})
WHITESPACE_RE = re.compile(r"[\t\v\f\r ]+")
SIMPLE_FLAGS_RE = re.compile(r"((?:--[^\s'\"\\]*(?:[ \t]+|$))*)(?=[^-'\"\\]|-[^-]|$)")
HEREDOC_RE = re.compile(r"^(\d*)<<(-?)([^<]*)$")
BOM = "\ufeff"

# How each instruction's arguments are split (BuildKit's dispatch table).
ARG_FORMS: dict[str, str] = {
    "add": "json_or_words", "copy": "json_or_words", "volume": "json_or_words",
    "cmd": "json_or_string", "entrypoint": "json_or_string", "run": "json_or_string",
    "shell": "json_or_string",
    "env": "pairs", "label": "pairs",
    "arg": "quoted_words",
    "expose": "words", "from": "words",
    "healthcheck": "health",
    "maintainer": "string", "stopsignal": "string", "user": "string", "workdir": "string",
    "onbuild": "subcommand",
}
HEREDOC_INSTRUCTIONS = frozenset({"add", "copy", "run"})
# Keyword token types (their payload is (LineSpan, flags)).
ARG_FORM_TYPES = frozenset(k.upper() for k in ARG_FORMS) | {"UNKNOWN", "ONBUILD_EMPTY"}


class PayloadToken(Token):
    """A token that carries a decoded value (JSON list, heredoc, line span) beside its text."""

    __slots__ = ("payload",)


@dataclass(frozen=True)
class Heredoc:
    """A here-document attached to RUN/COPY/ADD: `<<[-]NAME` plus the raw body lines."""

    name: str
    content: str
    expand: bool = True
    chomp: bool = False
    fd: int = 0

    @property
    def text(self) -> str:
        """The body as the instruction sees it (leading tabs removed for `<<-`)."""
        return re.sub(r"(?m)^\t+", "", self.content) if self.chomp else self.content


@dataclass(frozen=True)
class LineSpan:
    """Where a logical instruction sits in the file, and its joined text."""

    start: int
    end: int
    original: str


@dataclass
class Directives:
    escape: str = "\\"
    values: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)


class ParseError(PybuildError):
    """A Dockerfile that cannot be parsed; `line` is 1-based."""

    def __init__(self, message: str, line: int, source: str | None = None, filename: str = "Dockerfile") -> None:
        super().__init__(message, place=f"{filename}:{line}", source=source)
        self.line = line


def go_fields(text: str) -> list[str]:
    """BuildKit's whitespace split (regexp ``[\\t\\v\\f\\r ]+``), no empty fields at the ends."""
    if not text:
        return []
    return WHITESPACE_RE.split(text)


def split_command(line: str) -> tuple[str, list[str], str]:
    """`KEYWORD [--flags] rest` -> (keyword, flags, rest) as BuildKit's splitCommand."""
    parts = WHITESPACE_RE.split(line.strip(), maxsplit=1)
    if len(parts) < 2:
        return parts[0], [], ""
    if "--" not in parts[1]:
        return parts[0], [], parts[1].strip()
    simple = SIMPLE_FLAGS_RE.match(parts[1])
    if simple:  # no quotes or backslashes in the flags: a plain split gives the same words
        flags = simple.group(1).split()
        rest = parts[1][simple.end():]
        if flags and flags[-1] == "--":
            flags.pop()
        return parts[0], flags, rest.strip()
    rest, flags = extract_flags(parts[1])
    return parts[0], flags, rest.strip()


def extract_flags(line: str) -> tuple[str, list[str]]:
    """Leading `--x[=y]` words; quotes and backslashes inside them are removed; `--` ends them."""
    words: list[str] = []
    pos, n = 0, len(line)
    while True:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos >= n:
            return "", words
        if not line.startswith("--", pos):
            return line[pos:], words
        word: list[str] = []
        quote = ""
        blank_ok = False
        while pos < n:
            ch = line[pos]
            if quote:
                if ch == quote:
                    quote = ""
                elif ch == "\\" and pos + 1 < n:
                    pos += 1
                    word.append(line[pos])
                elif ch != "\\":
                    word.append(ch)
                else:
                    quote = ""
                pos += 1
                continue
            if ch.isspace():
                break
            if ch in "'\"":
                quote, blank_ok = ch, True
            elif ch == "\\":
                if pos + 1 < n:
                    pos += 1
                    word.append(line[pos])
            else:
                word.append(ch)
            pos += 1
        text = "".join(word)
        if text == "--":
            return (line[pos:] if pos < n else ""), words
        if blank_ok or text:
            words.append(text)


def parse_words(rest: str, escape: str) -> list[str]:
    """Quote-aware split keeping quotes and escapes (BuildKit's parseWords, for ENV/LABEL/ARG)."""
    if "'" not in rest and '"' not in rest and escape not in rest:
        return rest.split()
    words: list[str] = []
    buf: list[str] = []
    quote = ""
    blank_ok = False
    in_word = False
    pos, n = 0, len(rest)
    while pos < n:
        ch = rest[pos]
        if not in_word:
            if ch.isspace():
                pos += 1
                continue
            in_word = True
        if quote:
            if ch == quote:
                quote = ""
            elif ch == escape and quote != "'":
                if pos + 1 == n:
                    pos += 1
                    continue
                buf.append(ch)
                pos += 1
                ch = rest[pos]
            buf.append(ch)
            pos += 1
            continue
        if ch.isspace():
            if blank_ok or buf:
                words.append("".join(buf))
            buf, blank_ok, in_word = [], False, False
            pos += 1
            continue
        if ch in "'\"":
            quote, blank_ok = ch, True
        if ch == escape:
            if pos + 1 == n:
                pos += 1
                continue
            buf.append(ch)
            pos += 1
            ch = rest[pos]
        buf.append(ch)
        pos += 1
    if in_word and (blank_ok or buf):
        words.append("".join(buf))
    return words


def parse_json_array(rest: str) -> list[str] | None:
    """The exec form: a JSON array of strings, or None when `rest` is not JSON (shell form).

    A valid JSON array holding anything but strings is an error, as in BuildKit.
    """
    text = rest.lstrip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(item, str) for item in value):
        raise ValueError("when using JSON array syntax, arrays must be comprised of strings only")
    return value


def parse_pairs(rest: str, keyword: str, escape: str) -> list[tuple[str, str, str]]:
    """ENV/LABEL: `key value` (old form, separator "") or `k=v k2=v2` (separator "=")."""
    words = parse_words(rest, escape)
    if not words:
        return []
    if "=" not in words[0]:
        parts = WHITESPACE_RE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise ValueError(f"{keyword.upper()} must have two arguments")
        return [(parts[0], parts[1], "")]
    pairs = []
    for word in words:
        if "=" not in word:
            raise ValueError(f"Syntax error - can't find = in {word!r}. Must be of the form: name=value")
        key, value = word.split("=", 1)
        pairs.append((key, value, "="))
    return pairs


def raw_shell_words(line: str) -> list[str]:
    """Split a line into shell words, keeping quotes and escapes (to spot heredoc markers)."""
    words: list[str] = []
    buf: list[str] = []
    quote = ""
    pos, n = 0, len(line)
    while pos < n:
        ch = line[pos]
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"' and pos + 1 < n:
                pos += 1
                buf.append(line[pos])
        elif ch.isspace():
            if buf:
                words.append("".join(buf))
                buf = []
        else:
            buf.append(ch)
            if ch in "'\"":
                quote = ch
            elif ch == "\\" and pos + 1 < n:
                pos += 1
                buf.append(line[pos])
        pos += 1
    if buf:
        words.append("".join(buf))
    return words


def unquote_word(word: str) -> list[str]:
    """Remove shell quotes and backslash escapes; split on unquoted blanks."""
    out: list[str] = []
    buf: list[str] = []
    quote = ""
    pos, n = 0, len(word)
    started = False
    while pos < n:
        ch = word[pos]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                buf.append(ch)
        elif quote == '"':
            if ch == '"':
                quote = ""
            elif ch == "\\" and pos + 1 < n and word[pos + 1] in '"\\$`':
                pos += 1
                buf.append(word[pos])
            else:
                buf.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "\\" and pos + 1 < n:
            pos += 1
            buf.append(word[pos])
            started = True
        elif ch.isspace():
            if buf or started:
                out.append("".join(buf))
            buf, started = [], False
        else:
            buf.append(ch)
            started = True
        pos += 1
    if quote:
        raise ValueError(f"unterminated quote in heredoc marker {word!r}")
    if buf or started:
        out.append("".join(buf))
    return out


def heredoc_markers(line: str) -> list[tuple[str, bool, bool, int]]:
    """(name, expand, chomp, fd) for each `<<NAME` word of a RUN/COPY/ADD line."""
    markers = []
    for word in raw_shell_words(line):
        match = HEREDOC_RE.match(word)
        if not match or not match.group(3):
            continue
        rest = match.group(3)
        names = unquote_word(rest)
        if len(names) != 1:
            continue
        quoted = any(c in rest for c in "'\"")
        markers.append((names[0], not quoted, match.group(2) == "-", int(match.group(1) or 0)))
    return markers


class DockerfileLexer(Lexer):
    """Lark's view of the lexer: the input handed to Lark is a Scanner, not a str."""

    def __init__(self, lexer_conf) -> None:  # noqa: D107 - Lark's interface
        pass

    def lex(self, data: "Scanner") -> Iterator[Token]:  # type: ignore[override]
        return data.tokens()


class Scanner:
    """Does the line work for one file, then emits per-instruction tokens.

    Token stream per logical line (few tokens: the LALR driver costs per token)::

        KEYWORD [JSON | STRING | WORDS | PAIRS | HEALTH_TYPE ...] HEREDOC*

    The keyword token carries the instruction's LineSpan and flags, the others
    their decoded values. ONBUILD emits its trigger's tokens right after it. After the scan,
    `directives` and `warnings` hold what was found.
    """

    def __init__(self, text: str, filename: str = "Dockerfile") -> None:
        self.text = text
        self.filename = filename
        self.directives = Directives()
        self.warnings: list[str] = []

    # -- the physical-line scanner -------------------------------------------------

    def tokens(self) -> Iterator[Token]:
        lines = split_physical_lines(self.text)
        directives = self.directives
        continuation = continuation_regex(directives.escape)
        directives_done = False
        seen_instruction = False
        i, n = 0, len(lines)
        while i < n:
            raw = lines[i]
            if i == 0 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            i += 1
            lineno = i
            token = trim_newline(raw).lstrip()
            if not directives_done:
                found = DIRECTIVE_RE.match(token)
                key = found.group(1).lower() if found else ""
                if key in KNOWN_DIRECTIVES:
                    if key in directives.values:
                        raise ParseError(f"only one {key} parser directive can be used", lineno, raw, self.filename)
                    value = found.group(2)
                    if key == "escape":
                        if value not in ("\\", "`"):
                            raise ParseError(
                                f"invalid escape token '{value}' does not match ` or \\", lineno, raw, self.filename)
                        directives.escape = value
                        continuation = continuation_regex(value)
                    directives.values[key] = value
                    directives.lines[key] = lineno
                    continue
                directives_done = True
            elif seen_instruction and token.startswith("#"):
                found = DIRECTIVE_RE.match(token)
                if found and found.group(1).lower() == "escape":
                    raise ParseError(
                        "the escape directive must be at the very top of the file, before any instruction; "
                        "here it would only be a comment. Move it to the first line", lineno, raw, self.filename)
            if is_comment(token):
                token = ""
            line, done = trim_continuation(token, continuation)
            if done and not line:
                continue
            start = lineno
            pieces = [line]
            while not done and i < n:
                raw = lines[i]
                i += 1
                lineno = i
                if is_comment(raw):
                    continue
                text_line = trim_newline(raw)
                if not text_line.strip():
                    self.warnings.append(f"{self.filename}:{lineno}: empty continuation line")
                    continue
                text_line, done = trim_continuation(text_line, continuation)
                pieces.append(text_line)
            logical = "".join(pieces)
            seen_instruction = True
            pending: list[Token] = []
            span = LineSpan(start, lineno, logical)
            heredoc_owner = self.instruction_tokens(logical, span, pending)
            if heredoc_owner is not None and "<<" in logical:
                try:
                    markers = heredoc_markers(heredoc_owner)
                except ValueError as exc:
                    raise ParseError(str(exc), start, logical, self.filename) from None
                for name, expand, chomp, fd in markers:
                    body: list[str] = []
                    terminated = False
                    while i < n:
                        raw = lines[i]
                        i += 1
                        lineno = i
                        candidate = trim_newline(raw)
                        if chomp:
                            candidate = candidate.lstrip("\t")
                        if candidate == name:
                            terminated = True
                            break
                        body.append(raw)
                    if not terminated:
                        raise ParseError(
                            f"unterminated heredoc: no line '{name}' closes the <<{name} started here",
                            start, logical, self.filename)
                    pending.append(payload_token("HEREDOC", name, Heredoc(name, "".join(body), expand, chomp, fd),
                                                 start))
                if lineno != span.end:
                    span = LineSpan(start, lineno, logical)
                    for token in pending:
                        if token.type in ARG_FORM_TYPES:
                            token.payload = (span, token.payload[1])
            yield from pending

    # -- one logical line -> tokens --------------------------------------------------

    def instruction_tokens(self, line: str, span: LineSpan, out: list[Token]) -> str | None:
        """Append the tokens of one instruction; return the text to search for heredocs, if any."""
        keyword, flags, rest = split_command(line)
        lower = keyword.lower()
        kind = ARG_FORMS.get(lower)
        if kind == "subcommand" and not rest:
            lower = "onbuild_empty"
        out.append(payload_token(lower.upper() if kind else "UNKNOWN", keyword, (span, flags), span.start, span.end))
        if kind is None:
            return None
        try:
            return self.argument_tokens(lower, kind, rest, span, out)
        except ValueError as exc:
            raise ParseError(str(exc), span.start, line, self.filename) from None

    def argument_tokens(self, lower: str, kind: str, rest: str, span: LineSpan, out: list[Token]) -> str | None:
        escape = self.directives.escape
        line = span.start
        if kind == "subcommand":
            return self.instruction_tokens(rest, span, out) if rest else None
        if kind in ("json_or_string", "json_or_words"):
            if kind == "json_or_words" or rest:
                items = parse_json_array(rest)
                if items is not None:
                    out.append(payload_token("JSON", rest, items, line))
                    return None
            if kind == "json_or_string":
                if rest:
                    out.append(payload_token("STRING", rest, [rest], line))
            elif rest:
                out.append(payload_token("WORDS", rest, go_fields(rest), line))
            return rest if lower in HEREDOC_INSTRUCTIONS else None
        if kind == "words":
            if rest:
                out.append(payload_token("WORDS", rest, go_fields(rest), line))
        elif kind == "quoted_words":
            words = parse_words(rest, escape)
            if words:
                out.append(payload_token("WORDS", rest, words, line))
        elif kind == "string":
            if rest:
                out.append(payload_token("STRING", rest, [rest], line))
        elif kind == "pairs":
            pairs = parse_pairs(rest, lower, escape)
            if pairs:
                out.append(payload_token("PAIRS", rest, [part for pair in pairs for part in pair], line))
        elif kind == "health":
            fields = rest.split(None, 1) if rest and not rest[0].isspace() else []
            if fields:
                out.append(payload_token("HEALTH_TYPE", fields[0], [fields[0]], line))
                cmd = rest[len(fields[0]):].lstrip()
                if cmd:
                    items = parse_json_array(cmd)
                    if items is not None:
                        out.append(payload_token("JSON", cmd, items, line))
                    else:
                        out.append(payload_token("STRING", cmd, [cmd], line))
        return None


def payload_token(kind: str, text: str, payload: object, line: int, end_line: int | None = None) -> PayloadToken:
    # Token.__new__ costs more than the parse step itself; fill the slots directly.
    token = str.__new__(PayloadToken, text)
    token.type, token.value, token.payload = kind, text, payload
    token.line, token.end_line = line, end_line if end_line is not None else line
    token.start_pos = token.column = token.end_column = token.end_pos = None
    return token


def split_physical_lines(text: str) -> list[str]:
    """Lines with their endings kept (only `\\n` ends a line, as in BuildKit)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def trim_newline(line: str) -> str:
    return line.rstrip("\r\n")


def is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def continuation_regex(escape: str) -> re.Pattern[str]:
    """The escape char ends a line as a continuation unless it is itself escaped."""
    e = re.escape(escape)
    return re.compile(rf"([^{e}]){e}[ \t]*$|^{e}[ \t]*$")


def trim_continuation(line: str, regex: re.Pattern[str]) -> tuple[str, bool]:
    """(line without its continuation mark, whether the instruction ends here)."""
    if regex.search(line):
        return regex.sub(r"\1", line, count=1), False
    return line, True
