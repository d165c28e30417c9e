"""Dockerfile text -> raw instruction nodes (the parse before any expansion).

The raw parse matches BuildKit's parser node for node, so the reference test
vectors apply and `pybuild debug dump-ast` prints the same S-expressions.
Typed instructions are built from these nodes in grammar/instructions.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Transformer
from lark.exceptions import UnexpectedInput, VisitError

from grammar.errors import PybuildError
from grammar.lexer import DockerfileLexer, Heredoc, LineSpan, ParseError, Scanner

GRAMMAR = Path(__file__).with_name("dockerfile.lark")


@dataclass(frozen=True)
class Node:
    """One instruction as written: keyword, flags, arguments, heredocs, line span.

    `args` follows the reference layout: ENV/LABEL give (key, value, sep)
    triples flattened, HEALTHCHECK gives its type word then the command.
    `trigger` is ONBUILD's instruction.
    """

    keyword: str
    flags: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    json: bool = False
    trigger: "Node | None" = None
    heredocs: tuple[Heredoc, ...] = ()
    start_line: int = 0
    end_line: int = 0
    original: str = ""

    @property
    def name(self) -> str:
        """The instruction name, lower-case (`run`, `copy` ...)."""
        return self.keyword.lower()


@dataclass(frozen=True)
class ParseResult:
    nodes: tuple[Node, ...]
    escape: str = "\\"
    directives: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()

    def source_of(self, node: Node) -> str:
        """The node's lines as written in the file (for error messages)."""
        return "".join(self.lines[node.start_line - 1:node.end_line]) or node.original


class _ToNodes(Transformer):
    """Lark callbacks (run inline by the LALR parser, so no tree is built)."""

    def start(self, children):
        return children

    def _instruction(self, children):
        keyword, *rest = children
        span: LineSpan = keyword.payload[0]
        flags = tuple(keyword.payload[1])
        args: list[str] = []
        is_json = False
        heredocs: list[Heredoc] = []
        trigger = None
        for part in rest:
            if isinstance(part, Node):
                trigger = part
            elif part.type == "HEREDOC":
                heredocs.append(part.payload)
            else:
                args.extend(part.payload)
                is_json = is_json or part.type == "JSON"
        return Node(str(keyword), flags, tuple(args), is_json, trigger, tuple(heredocs),
                    span.start, span.end, span.original)

    from_ = run = cmd = entrypoint = shell = add = copy = volume = _instruction
    env = label = arg = expose = maintainer = stopsignal = user = workdir = _instruction
    onbuild = unknown = healthcheck = _instruction


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    # cache=True keeps the compiled LALR tables in the temp dir: start-up matters for a CLI.
    return Lark(GRAMMAR.read_text(), parser="lalr", lexer=DockerfileLexer, transformer=_ToNodes(),
                maybe_placeholders=False, cache=True)


def parse(text: str | bytes, filename: str = "Dockerfile") -> ParseResult:
    """Parse Dockerfile text; raises ParseError (a PybuildError) naming the line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="surrogateescape")
    scan = Scanner(text, filename)
    try:
        nodes = _lark().parse(scan)
    except VisitError as exc:  # a lexer/transformer error wrapped by Lark
        if isinstance(exc.orig_exc, PybuildError):
            raise exc.orig_exc from None
        raise
    except UnexpectedInput as exc:
        line = getattr(exc, "line", 0) or 0
        token = getattr(exc, "token", None)
        raise ParseError(f"cannot parse this instruction (unexpected {token!s})", line, None, filename) from None
    lines = tuple(text.split("\n"))
    if not nodes:
        raise ParseError("file with no instructions: a Dockerfile needs at least a FROM line",
                         max(len(lines), 1), None, filename)
    return ParseResult(tuple(nodes), scan.directives.escape, dict(scan.directives.values),
                       tuple(scan.warnings), tuple(line + "\n" for line in lines))


def parse_file(path: str | Path) -> ParseResult:
    """Parse a Dockerfile on disk; a missing file is a user error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PybuildError(f"Dockerfile not found: {path} (use -f to name another file)") from None
    except IsADirectoryError:
        raise PybuildError(f"{path} is a directory, not a Dockerfile (use -f to name the file)") from None
    return parse(data, str(path))


# -- the reference S-expression dump ---------------------------------------------------

def go_quote(text: str) -> str:
    """Go's strconv.Quote: the reference vectors are written with it."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable() and code > 0x7F:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def dump_node(node: Node) -> str:
    parts = [node.name]
    if node.flags:
        parts.append("[" + " ".join(go_quote(f) for f in node.flags) + "]")
    if node.trigger is not None:
        parts.append("(" + dump_node(node.trigger) + ")")
    parts.extend(go_quote(a) for a in node.args)
    return " ".join(parts)


def dump(result: ParseResult) -> str:
    """One `(instr ["--flag"] "arg" ...)` line per instruction, as BuildKit's Node.Dump."""
    return "".join(f"({dump_node(n)})\n" for n in result.nodes)
