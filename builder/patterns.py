"""Path patterns, as Docker uses them: .dockerignore rules and COPY source globs.

Two pattern languages live here, both pure (no file system access):

* ``PatternMatcher`` ports the semantics of moby/patternmatcher, which decides
  what a .dockerignore excludes: ``**`` crosses directories, ``!`` re-includes,
  the last matching pattern wins, and a pattern matching a directory matches
  everything under it.  ``read_ignore`` ports its ``ignorefile.ReadAll``.
* ``glob_match`` is Go's ``filepath.Match``, which BuildKit uses for COPY/ADD
  wildcard sources: ``*`` and ``?`` never cross ``/``, and there is no ``**``.

Paths are slash-separated and relative (Linux only, so no Windows branches).
"""
from __future__ import annotations

import enum
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from grammar.errors import PybuildError


class PatternError(PybuildError):
    """A malformed pattern; `index` is its position in the list given, if known."""

    def __init__(self, message: str, pattern: str, index: int | None = None) -> None:
        super().__init__(message)
        self.pattern = pattern
        self.index = index


# --------------------------------------------------------------------------
# Go's path helpers, which the matcher leans on for its exact behaviour.


def clean(path: str) -> str:
    """Go's ``path.Clean``: the shortest equivalent path, purely lexical.

    Unlike ``posixpath.normpath`` it also folds a leading ``//`` into ``/``.
    """
    if path == "":
        return "."
    rooted = path.startswith("/")
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    joined = "/".join(out)
    if rooted:
        return "/" + joined
    return joined or "."


def dir_name(path: str) -> str:
    """Go's ``filepath.Dir``: everything before the last ``/``, cleaned."""
    return clean(path[: path.rfind("/") + 1])


# --------------------------------------------------------------------------
# Go's filepath.Match, for COPY wildcards and for validating ignore patterns.

_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _glob_escape(text: str, i: int, pattern: str) -> tuple[str, int]:
    """One character of a ``[...]`` range (Go's ``getEsc``); returns it and the next index."""
    if i >= len(text) or text[i] in "-]":
        raise PatternError(f"syntax error in pattern {pattern!r}: bad range in '[...]'", pattern)
    if text[i] == "\\":
        i += 1
        if i >= len(text):
            raise PatternError(f"syntax error in pattern {pattern!r}: '\\' at the end", pattern)
    if i + 1 >= len(text):
        raise PatternError(f"syntax error in pattern {pattern!r}: '[' is never closed", pattern)
    return text[i], i + 1


def _glob_class(pattern: str, i: int) -> tuple[str, int]:
    """Translate the ``[...]`` starting after the ``[`` at `i`; Go lets it match ``/``."""
    negated = i < len(pattern) and pattern[i] == "^"
    if negated:
        i += 1
    ranges: list[str] = []
    count = 0
    while True:
        if i < len(pattern) and pattern[i] == "]" and count > 0:
            i += 1
            break
        lo, i = _glob_escape(pattern, i, pattern)
        hi = lo
        if pattern[i] == "-":
            hi, i = _glob_escape(pattern, i + 1, pattern)
        count += 1
        if lo <= hi:  # Go accepts a reversed range; it simply matches nothing
            ranges.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    body = "".join(ranges)
    if not body:
        return ("(?s:.)" if negated else "(?!)"), i
    return f"[{'^' if negated else ''}{body}]", i


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Go glob into an anchored regex, checking its syntax fully."""
    cached = _GLOB_CACHE.get(pattern)
    if cached is not None:
        return cached
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            part, i = _glob_class(pattern, i)
            out.append(part)
        elif ch == "\\":
            if i >= len(pattern):
                raise PatternError(f"syntax error in pattern {pattern!r}: '\\' at the end", pattern)
            out.append(re.escape(pattern[i]))
            i += 1
        else:
            out.append(re.escape(ch))
    compiled = re.compile("".join(out) + r"\Z", re.DOTALL)
    _GLOB_CACHE[pattern] = compiled
    return compiled


def check_glob(pattern: str) -> None:
    """Raise `PatternError` if `pattern` is not valid ``filepath.Match`` syntax."""
    _glob_regex(pattern)


def glob_match(pattern: str, name: str) -> bool:
    """Go's ``filepath.Match(pattern, name)``: ``*``/``?`` stop at ``/``, ``\\`` escapes."""
    return _glob_regex(pattern).match(name) is not None


def has_wildcards(name: str) -> bool:
    """True if `name` has an unescaped ``*``, ``?`` or ``[`` (BuildKit's ``containsWildcards``)."""
    i = 0
    while i < len(name):
        if name[i] == "\\":
            i += 2
            continue
        if name[i] in "*?[":
            return True
        i += 1
    return False


def split_wildcards(path: str) -> tuple[str, str]:
    """Split at the first element with a wildcard: (literal base, glob rest).

    ``"src/*/x.go"`` gives ``("src", "*/x.go")``; with no wildcard the rest is ``""``.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for n, part in enumerate(parts):
        if has_wildcards(part):
            return "/".join(parts[:n]) or ".", "/".join(parts[n:])
    return "/".join(parts) or ".", ""


# --------------------------------------------------------------------------
# moby/patternmatcher


class MatchType(enum.Enum):
    """How a compiled ignore pattern is tested; the cheap kinds avoid a regex."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    REGEXP = "regexp"


_REGEX_META = frozenset(".+()|{}$")  # regex specials with no meaning in a glob


def compile_pattern(pattern: str) -> tuple[MatchType, str]:
    """Classify a cleaned pattern and build its Go-flavoured regex (``""`` unless REGEXP).

    Mirrors patternmatcher's ``compile``, quirks included: ``[`` and ``]`` pass
    through to the regex verbatim, and ``**`` first in the pattern is a suffix test.
    """
    regex = "^"
    kind = MatchType.EXACT
    i = 0
    step = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":  # "**/" is treated as "**"
                    i += 1
                if i == n:  # trailing "**" matches everything below, like .gitignore
                    if kind is MatchType.EXACT:
                        kind = MatchType.PREFIX
                    else:
                        regex += ".*"
                        kind = MatchType.REGEXP
                else:  # any number of directories, even none
                    regex += "(.*/)?"
                    kind = MatchType.REGEXP
                if step == 0:
                    kind = MatchType.SUFFIX
            else:
                regex += "[^/]*"
                kind = MatchType.REGEXP
        elif ch == "?":
            regex += "[^/]"
            kind = MatchType.REGEXP
        elif ch in _REGEX_META:
            regex += "\\" + ch
        elif ch == "\\":
            if i < n:
                regex += "\\" + pattern[i]
                i += 1
                kind = MatchType.REGEXP
            else:
                regex += "\\"
        elif ch in "[]":
            regex += ch
            kind = MatchType.REGEXP
        else:
            regex += ch
        step += 1
    if kind is MatchType.REGEXP:
        return kind, regex + "$"
    return kind, ""


def _go_regex_to_python(src: str) -> str:
    """Rewrite the few Go RE2 spellings that Python's `re` reads differently.

    ``$``/``^`` become ``\\Z``/``\\A`` (Go's ``$`` does not match before a final
    newline), and inside ``[...]`` a ``]`` right after the opening and any
    ``[ & ~ |`` are escaped so Python sees the same set Go does.
    """
    out: list[str] = []
    i = 0
    n = len(src)
    while i < n:
        ch = src[i]
        if ch == "\\":
            if i + 1 >= n:
                raise re.error("trailing backslash at end of expression")
            out.append(src[i : i + 2])
            i += 2
        elif ch == "[":
            out.append("[")
            i += 1
            if i < n and src[i] == "^":
                out.append("^")
                i += 1
            first = True
            while True:
                if i >= n:
                    raise re.error("missing closing ]")
                c = src[i]
                if c == "]" and not first:
                    out.append("]")
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n:
                        raise re.error("missing closing ]")
                    out.append(src[i : i + 2])
                    i += 2
                elif c in "]&~|[":
                    out.append("\\" + c)
                    i += 1
                else:
                    out.append(c)
                    i += 1
                first = False
        elif ch == "^":
            out.append(r"\A")
            i += 1
        elif ch == "$":
            out.append(r"\Z")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@dataclass
class Pattern:
    """One cleaned ignore pattern; compiled on first use, as Go does."""

    cleaned: str
    exclusion: bool = False
    _kind: MatchType | None = field(default=None, repr=False)
    _regex_source: str = field(default="", repr=False)
    _regex: re.Pattern[str] | None = field(default=None, repr=False)
    _broken: bool = field(default=False, repr=False)

    def __str__(self) -> str:
        return self.cleaned

    @property
    def kind(self) -> MatchType:
        self._compile()
        assert self._kind is not None
        return self._kind

    @property
    def regex_source(self) -> str:
        """The regex as Go would spell it (``""`` unless the kind is REGEXP)."""
        self._compile()
        return self._regex_source

    def _compile(self) -> None:
        if self._kind is not None:
            return
        self._kind, self._regex_source = compile_pattern(self.cleaned)
        if self._kind is MatchType.REGEXP:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "possible set difference" et al.
                    self._regex = re.compile(_go_regex_to_python(self._regex_source), re.ASCII)
            except re.error:
                self._broken = True

    def match(self, path: str) -> bool:
        """Whether `path` itself matches (no parent-directory logic here)."""
        self._compile()
        if self._broken:
            raise PatternError(
                f"syntax error in pattern {self.cleaned!r}: it is not a valid pattern; "
                "escape special characters such as '[' with '\\'",
                self.cleaned,
            )
        kind = self._kind
        if kind is MatchType.EXACT:
            return path == self.cleaned
        if kind is MatchType.PREFIX:
            return path.startswith(self.cleaned[:-2])
        if kind is MatchType.SUFFIX:
            suffix = self.cleaned[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]  # "**/foo" matches "foo"
        assert self._regex is not None
        return self._regex.search(path) is not None

    def literal_prefix(self) -> str:
        """The pattern minus a trailing ``/**`` or ``/*`` (fsutil's walk pruning)."""
        text = self.cleaned
        for tail in ("/**", "/*"):
            if text.endswith(tail):
                text = text[: -len(tail)]
        return text


MatchInfo = tuple[bool, ...]
"""Per pattern, whether it matched a parent directory; ``()`` means unknown."""

_PATTERN_CHARS = frozenset("*[]?^\\")


def _split_parents(file: str) -> list[str] | None:
    """The parent directories of `file`, shortest first; None if it has none."""
    parent = dir_name(file)
    if parent == ".":
        return None
    dirs = parent.split("/")
    return ["/".join(dirs[: i + 1]) for i in range(len(dirs))]


class PatternMatcher:
    """An ordered list of ignore patterns; later patterns override earlier ones."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: list[Pattern] = []
        self.exclusions = False
        for index, raw in enumerate(patterns):
            text = _trim_space(raw)
            if not text:
                continue
            text = clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise PatternError(
                        'illegal exclusion pattern: "!" (a "!" must be followed by the path to re-include)',
                        raw,
                        index,
                    )
                text = text[1:]
                self.exclusions = True
            try:
                check_glob(text)
            except PatternError as err:
                raise PatternError(err.message, raw, index) from None
            self.patterns.append(Pattern(text, exclusion))
        # fsutil skips excluded directories unless an exception could reach inside;
        # with only literal exceptions that is a cheap prefix test.
        self._literal_exceptions: list[str] | None = [
            p.literal_prefix() + "/" for p in self.patterns if p.exclusion
        ]
        if any(_PATTERN_CHARS & set(p) for p in self._literal_exceptions):
            self._literal_exceptions = None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches_exact(self, file: str) -> bool:
        """True if `file` itself matches; parents are not considered."""
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            if pattern.match(file):
                matched = not pattern.exclusion
        return matched

    def matches_or_parent_matches(self, file: str) -> bool:
        """True if `file` or one of its parent directories is excluded, net of exceptions."""
        matched = False
        parents = _split_parents(file)
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            hit = pattern.match(file)
            if not hit and parents is not None:
                hit = any(pattern.match(parent) for parent in parents)
            if hit:
                matched = not pattern.exclusion
        return matched

    def matches_using_parent_results(self, file: str, parent: MatchInfo = ()) -> tuple[bool, MatchInfo]:
        """Like `matches_or_parent_matches`, reusing the parent directory's `MatchInfo`.

        This is what BuildKit's context walk uses; pass the returned info to the
        children of `file`.
        """
        if parent and len(parent) != len(self.patterns):
            raise ValueError("wrong number of values in parent MatchInfo")
        matched = False
        info: list[bool] = []
        for i, pattern in enumerate(self.patterns):
            hit = bool(parent) and parent[i]
            if not hit:
                if pattern.exclusion != matched:
                    info.append(False)
                    continue
                hit = pattern.match(file)
                if not hit and not parent:
                    parents = _split_parents(file)
                    if parents is not None:
                        hit = any(pattern.match(p) for p in parents)
            info.append(hit)
            if hit:
                matched = not pattern.exclusion
        return matched, tuple(info)

    def may_reinclude_under(self, directory: str) -> bool:
        """Whether an exception (``!``) could re-include something below excluded `directory`.

        False lets a walk skip the whole subtree, as fsutil does; it is only a
        shortcut, never a change in what is matched.
        """
        if not self.exclusions:
            return False
        if self._literal_exceptions is None:
            return True
        prefix = directory + "/"
        return any(p.startswith(prefix) for p in self._literal_exceptions)


def matches_or_parent_matches(file: str, patterns: Sequence[str]) -> bool:
    """One-shot `PatternMatcher.matches_or_parent_matches`; ``.`` (the root) never matches."""
    matcher = PatternMatcher(patterns)
    file = clean(file)
    if file == ".":
        return False  # excluding the whole context makes no sense
    return matcher.matches_or_parent_matches(file)


# --------------------------------------------------------------------------
# .dockerignore files (moby/patternmatcher/ignorefile)

_NOT_GO_SPACE = frozenset("\x1c\x1d\x1e\x1f")  # Python calls these space; Go does not


def _trim_space(text: str) -> str:
    """Go's ``strings.TrimSpace``."""
    start, end = 0, len(text)
    while start < end and text[start].isspace() and text[start] not in _NOT_GO_SPACE:
        start += 1
    while end > start and text[end - 1].isspace() and text[end - 1] not in _NOT_GO_SPACE:
        end -= 1
    return text[start:end]


@dataclass(frozen=True)
class IgnoreLine:
    """One pattern of an ignore file and the line it came from (for error messages)."""

    line: int
    pattern: str


def parse_ignore(text: str | bytes) -> list[IgnoreLine]:
    """Parse an ignore file: ``#`` comment lines, blank lines and a BOM are dropped.

    Each pattern is trimmed and cleaned, and a leading ``/`` removed (``!`` kept in
    front), so ``/a/../b`` and ``b`` are the same rule.  A bare ``!`` is kept, so
    that `PatternMatcher` reports it.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")  # same decoding as os.scandir names
    text = text.removeprefix("\ufeff")
    out: list[IgnoreLine] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.startswith("#"):  # only a '#' in the first column starts a comment
            continue
        pattern = _trim_space(line)
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = _trim_space(pattern[1:])
        if pattern:
            pattern = clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        out.append(IgnoreLine(number, "!" + pattern if invert else pattern))
    return out


def read_ignore(text: str | bytes) -> list[str]:
    """The patterns of an ignore file, in order (``ignorefile.ReadAll``)."""
    return [entry.pattern for entry in parse_ignore(text)]
