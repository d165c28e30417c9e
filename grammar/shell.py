"""Shell-style word expansion of Dockerfile arguments, as BuildKit's frontend does it.

A faithful re-implementation of the behaviour of BuildKit's
``frontend/dockerfile/shell/lex.go``: quotes, the escape character, ``$V``,
``${V}``, the ``${V:-x}`` family, ``#``/``%`` trimming and ``/`` replacement
with shell glob patterns.  It is deliberately *not* a POSIX shell: no command
substitution, no globbing, no ``${#V}``; positional and special parameters
(``$1``, ``$@``, ``$$`` ...) are looked up like names (and are never set), and
``$`` not followed by a name stays literal (``$.``).  Quirks of BuildKit are
kept on purpose, because a Dockerfile must mean the same thing here as there.

One pass yields both the single-word result (ENV, WORKDIR, COPY ... use it)
and the whitespace-split words (EXPOSE uses them), plus the names that were
looked up, which the cache key and ``pybuild outline`` need.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from grammar.errors import PybuildError

# Instructions whose arguments the builder expands (BuildKit: the commands with
# an ``Expand`` method, plus EXPOSE and FROM which the dispatcher expands itself):
#   ADD/COPY     sources, destination, --chown (ADD also --checksum); not --chmod,
#                not COPY --from; unquoted-delimiter heredoc bodies are expanded
#                with ``skip_quotes=True`` and the escape ``\`` whatever the
#                Dockerfile's escape directive says;
#   ARG          name and default (BuildKit expands them when dispatching ARG,
#                because a --build-arg value may override the default);
#   ENV, LABEL   every key and value;
#   EXPOSE       every port, split into words (see WORD_SPLITTING_INSTRUCTIONS);
#   FROM         image name and --platform, with the global (pre-FROM) ARGs only;
#   STOPSIGNAL, USER, VOLUME, WORKDIR   the whole value.
# Never expanded: RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK (the shell in the
# container does it at run time; RUN only expands its --mount option values),
# ONBUILD (its trigger is expanded when it fires in the child build), MAINTAINER.
EXPANDING_INSTRUCTIONS: frozenset[str] = frozenset(
    {"ADD", "ARG", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
)
# Instructions that take `Expansion.words` (BuildKit's ProcessWords) rather than `.value`.
WORD_SPLITTING_INSTRUCTIONS: frozenset[str] = frozenset({"EXPOSE"})

ESCAPE_CHARS = ("\\", "`")  # the only escapes the ``# escape=`` directive allows

# Go's unicode.IsSpace (the White_Space property), which splits words; Python's
# str.isspace also counts U+001C..U+001F, which BuildKit keeps inside a word.
_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_SPECIAL_PARAMS = frozenset("@*#?-$!0")  # POSIX special parameters: one char each
_BOM = "\ufeff"  # Go's text/scanner drops one at the start of what it scans


class ShellError(PybuildError):
    """An argument could not be expanded: bad quoting, bad ``${}``, ``${V?msg}``.

    `detail` is the bare reason (``syntax error: missing '}'``, ``V: msg``), `word`
    the argument as written; the message names both, as BuildKit's does.
    """

    def __init__(self, detail: str, word: str, place: str | None = None, source: str | None = None) -> None:
        super().__init__(f"failed to process {_go_quote(word)}: {detail}", place, source)
        self.detail = detail
        self.word = word


@dataclass(frozen=True)
class Expansion:
    """The result of expanding one argument.

    `value` is the argument as one word (BuildKit's ProcessWord); `words` the
    same text split on unquoted whitespace that came from the argument itself
    or from a variable (ProcessWords; empty quoted words vanish).  `used` holds
    the names looked up and found in the environment, `unset` those looked up
    and absent, including positional/special ones like ``1`` or ``@``.
    """

    value: str
    words: tuple[str, ...]
    used: frozenset[str]
    unset: frozenset[str]

    @property
    def referenced(self) -> frozenset[str]:
        """Every name the argument mentions, set or not."""
        return self.used | self.unset


def expand(
    word: str,
    env: Mapping[str, str],
    escape: str = "\\",
    *,
    raw_quotes: bool = False,
    raw_escapes: bool = False,
    skip_quotes: bool = False,
    keep_unset: bool = False,
) -> Expansion:
    """Expand `word` against `env` (case-sensitive names, as BuildKit on unix).

    The flags mirror BuildKit's Lex options for its special uses: `raw_quotes`
    keeps quote characters (step names, heredoc detection), `raw_escapes` keeps
    escape characters (heredoc bodies in Buildah), `skip_quotes` treats quotes
    as ordinary characters (COPY/ADD heredoc bodies), `keep_unset` leaves
    references to unset variables as written (step names).
    """
    if escape not in ESCAPE_CHARS:
        raise ValueError(f"escape must be one of {ESCAPE_CHARS}, not {escape!r}")
    lexer = _Lexer(word, env, escape, raw_quotes=raw_quotes, skip_quotes=skip_quotes, keep_unset=keep_unset)
    try:
        value, words = lexer.until(None, raw_escapes)
    except _Fail as failure:
        raise ShellError(str(failure), word) from None
    except RecursionError:
        # Go's growable stacks accept any nesting; Python's do not.
        raise ShellError("substitutions nested too deeply", word) from None
    return Expansion(value, tuple(words), frozenset(lexer.used), frozenset(lexer.unset))


def expand_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """`word` expanded into one string (ENV, LABEL, WORKDIR, COPY ... arguments)."""
    return expand(word, env, escape).value


def expand_words(word: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """`word` expanded and split on unquoted whitespace (EXPOSE arguments)."""
    return list(expand(word, env, escape).words)


def expands(instruction: str) -> bool:
    """Whether the builder expands variables in `instruction`'s arguments."""
    return instruction.upper() in EXPANDING_INSTRUCTIONS


class _Fail(Exception):
    """A reason expansion failed; `expand` wraps it into a ShellError."""


class _Words:
    """Accumulates ProcessWords' split words alongside the single-word result."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.current: list[str] = []

    def add_raw(self, text: str) -> None:
        """Text that stays in the current word whatever it contains (quoted, escaped)."""
        if text:
            self.current.append(text)

    def add_split(self, text: str) -> None:
        """Text whose whitespace separates words (unquoted literal or variable value)."""
        for ch in text:
            if ch in _SPACE:
                self._flush()
            else:
                self.current.append(ch)

    def finish(self) -> list[str]:
        self._flush()
        return self.words

    def _flush(self) -> None:
        if self.current:
            self.words.append("".join(self.current))
            self.current = []


class _Lexer:
    """One expansion: a cursor over the word, plus the names looked up so far.

    The methods follow lex.go's functions one for one, so that where the cursor
    stands when something fails (which decides some error messages) matches too.
    """

    def __init__(
        self, text: str, env: Mapping[str, str], escape: str, *, raw_quotes: bool, skip_quotes: bool, keep_unset: bool
    ) -> None:
        self.text = text[1:] if text.startswith(_BOM) else text
        self.pos = 0
        self.env = env
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.skip_quotes = skip_quotes
        self.keep_unset = keep_unset
        self.used: set[str] = set()
        self.unset: set[str] = set()

    def peek(self) -> str:
        """The next character, or "" at the end."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        self.pos += bool(ch)
        return ch

    def lookup(self, name: str) -> tuple[str, bool]:
        value = self.env.get(name)
        if value is None:
            self.unset.add(name)
            return "", False
        self.used.add(name)
        return value, True

    def until(self, stop: str | None, raw_escapes: bool) -> tuple[str, list[str]]:
        """Expand up to and past `stop` (None: to the end); the text and its words."""
        result: list[str] = []
        words = _Words()
        while ch := self.peek():
            if ch == stop:
                self.next()
                return "".join(result), words.finish()
            if ch == "$":
                text = self.dollar()
                result.append(text)
                words.add_split(text)
            elif ch in "'\"" and not self.skip_quotes:
                text = self.single_quoted() if ch == "'" else self.double_quoted(raw_escapes)
                result.append(text)
                words.add_raw(text)
            else:
                self.next()
                if ch == self.escape:
                    if raw_escapes:
                        words.add_raw(ch)
                        result.append(ch)
                    ch = self.next()
                    if not ch:  # a trailing escape escapes nothing and vanishes
                        break
                    words.add_raw(ch)
                else:
                    words.add_split(ch)
                result.append(ch)
        if stop is not None:
            raise _Fail(f"unexpected end of statement while looking for matching {stop}")
        return "".join(result), words.finish()

    def single_quoted(self) -> str:
        """Everything up to the next ``'`` as is; nothing escapes inside."""
        quote = self.next()
        out = [quote] if self.raw_quotes else []
        while True:
            ch = self.next()
            if not ch:
                raise _Fail("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if self.raw_quotes:
                    out.append(ch)
                return "".join(out)
            out.append(ch)

    def double_quoted(self, raw_escapes: bool) -> str:
        """Up to the next unescaped ``"``: variables expand, the escape only
        escapes ``"``, ``$`` and itself (elsewhere it stays literal)."""
        quote = self.next()
        out = [quote] if self.raw_quotes else []
        while True:
            ch = self.peek()
            if not ch:
                raise _Fail("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.next()
                if self.raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.next()
            if ch == self.escape:
                if raw_escapes:
                    out.append(ch)
                following = self.peek()
                if not following:
                    continue  # the loop then fails on the missing quote
                if following in ('"', "$", self.escape):
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        """A variable name: letters/digits/_, or all digits, or one special char."""
        out: list[str] = []
        while ch := self.peek():
            if not out and _is_digit(ch):
                while (ch := self.peek()) and _is_digit(ch):
                    out.append(self.next())
                return "".join(out)
            if not out and ch in _SPECIAL_PARAMS:
                return self.next()
            if not (_is_letter(ch) or _is_digit(ch) or ch == "_"):
                break
            out.append(self.next())
        return "".join(out)

    def dollar(self) -> str:
        """Expand the ``$...`` at the cursor."""
        self.next()
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            value, found = self.lookup(name)
            return "$" + name if not found and self.keep_unset else value

        self.next()
        ch = self.peek()
        if not ch:
            raise _Fail("syntax error: missing '}'")
        if ch in "{}:":
            raise _Fail("syntax error: bad substitution")
        name = self.name()
        ch = self.next()
        if ch == "}":
            value, found = self.lookup(name)
            return "${%s}" % name if not found and self.keep_unset else value
        if ch == "/":
            return self.replaced(name)
        if ch and ch in ":+-?#%":
            return self.modified(name, ch)
        # BuildKit says "unsupported modifier (\uFFFD)" at the end; say what is wrong.
        raise _Fail(f"unsupported modifier ({ch}) in substitution" if ch else "syntax error: missing '}'")

    def until_closing(self, stop: str, raw_escapes: bool, missing: str) -> str:
        """The text up to `stop`; running out of input first fails with `missing`."""
        try:
            return self.until(stop, raw_escapes)[0]
        except _Fail:
            if not self.peek():
                raise _Fail(missing) from None
            raise

    def modified(self, name: str, op: str) -> str:
        """``${name<op>word}`` for op in ``- + ? # %`` and their ``:`` forms."""
        null_is_unset = op == ":"
        if null_is_unset:
            op += self.next()
        modifier = op[-1]
        # #/% keep escapes so that the pattern can tell \* from *.
        word = self.until_closing("}", modifier in "#%", "syntax error: missing '}'")

        value, found = self.lookup(name)
        if not found and self.keep_unset:
            return "${%s%s%s}" % (name, op, word)
        empty = not found or (null_is_unset and value == "")
        if modifier == "-":
            return word if empty else value
        if modifier == "+":
            return "" if empty else word
        if modifier == "?":
            if not found:
                raise _Fail(f"{name}: {word or 'is not allowed to be unset'}")
            if empty:
                raise _Fail(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if modifier in "#%":
            greedy = word.startswith(modifier)  # ## and %% remove the longest match
            if greedy:
                word = word[1:]
            return _trim_suffix(word, value, greedy) if modifier == "%" else _trim_prefix(word, value, greedy)
        raise _Fail(f"unsupported modifier ({op}) in substitution")

    def replaced(self, name: str) -> str:
        """``${name/pattern/replacement}``, or ``//`` to replace every match."""
        replace_all = self.peek() == "/"
        if replace_all:
            self.next()
        pattern = self.until_closing("/", True, "syntax error: missing '/' in ${}")
        replacement = self.until_closing("}", True, "syntax error: missing '}'")

        value, found = self.lookup(name)
        if not found and self.keep_unset:
            return "${%s/%s/%s}" % (name, pattern, replacement)
        regex = _pattern_regex(pattern, greedy=True, anchored=False)
        if replace_all:
            return _replace_all(regex, value, replacement)
        match = regex.search(value)
        return value[: match.start()] + replacement + value[match.end() :] if match else value


def _is_digit(ch: str) -> bool:
    """Go's unicode.IsDigit: decimal digits of any script."""
    return "0" <= ch <= "9" or (ch > "\x7f" and unicodedata.category(ch) == "Nd")


def _is_letter(ch: str) -> bool:
    """Go's unicode.IsLetter: any L* category."""
    return ch.isascii() and ch.isalpha() or (ch > "\x7f" and unicodedata.category(ch)[0] == "L")


def _pattern_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A shell glob (``*``, ``?``, ``\\`` escapes; no brackets) as a regex.

    A backslash before ``}`` or ``/`` only protected it from ending the
    ``${}``; before ``*``, ``?`` or ``\\`` it makes them literal; elsewhere it
    is an error, as in BuildKit.
    """
    if pattern.startswith(_BOM):
        pattern = pattern[1:]
    parts = ["^"] if anchored else []
    star = ".*" if greedy else ".*?"
    chars = iter(pattern)
    for ch in chars:
        if ch == "*":
            parts.append(star)
        elif ch == "?":
            parts.append(".")
        elif ch == "\\":
            following = next(chars, "")
            if following and following in "}/*?\\":
                parts.append(re.escape(following))
            else:
                raise _Fail(f"invalid pattern ({pattern}) in substitution: invalid escape '\\{following}'")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _pattern_regex(pattern, greedy=greedy, anchored=True).search(value)
    return value[match.end() :] if match else value


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # A regex finds leftmost matches only, so search the reversed value with
    # the reversed pattern (escape pairs kept in order: a\*c -> c\*a).
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]


def _reverse_pattern(pattern: str) -> str:
    out = [""] * len(pattern)
    last = len(pattern) - 1
    i = 0
    while i <= last:
        at = last - i
        if pattern[i] == "\\" and i != last:
            out[at - 1], out[at] = "\\", pattern[i + 1]
            i += 2
        else:
            out[at] = pattern[i]
            i += 1
    return "".join(out)


def _replace_all(regex: re.Pattern[str], value: str, template: str) -> str:
    """Go's Regexp.ReplaceAllString, which differs from re.sub in two ways.

    An empty match right after a match is skipped (re.sub replaces it), and
    ``$`` in the replacement refers to groups: ``$0``/``${0}`` is the match,
    ``$$`` a dollar, other names empty (the pattern has no groups).
    """
    out: list[str] = []
    last_end = search = 0
    while search <= len(value):
        match = regex.search(value, search)
        if match is None:
            break
        start, end = match.span()
        out.append(value[last_end:start])
        if end > last_end or start == 0:
            out.append(_expand_template(template, match.group()))
        last_end = end
        search = end if end > search else search + 1
    out.append(value[last_end:])
    return "".join(out)


def _expand_template(template: str, matched: str) -> str:
    """Go's Regexp.Expand for a pattern whose only group is the whole match."""
    out: list[str] = []
    rest = template
    while (at := rest.find("$")) >= 0:
        out.append(rest[:at])
        rest = rest[at + 1 :]
        if rest.startswith("$"):
            out.append("$")
            rest = rest[1:]
            continue
        braced = rest.startswith("{")
        body = rest[1:] if braced else rest
        size = 0
        while size < len(body) and (_is_letter(body[size]) or _is_digit(body[size]) or body[size] == "_"):
            size += 1
        if size == 0 or (braced and body[size : size + 1] != "}"):
            out.append("$")  # malformed: the dollar is literal
            continue
        if body[:size] == "0":
            out.append(matched)
        rest = body[size + 1 :] if braced else body[size:]
    out.append(rest)
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str) -> str:
    """`text` as Go's %q shows it, so messages read as BuildKit's do."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)
