"""Raw nodes -> typed instructions, with every flag either carried or rejected.

Values stay unexpanded here: expansion depends on ARG/ENV state, which the
stage walker (grammar/dag.py) and the executor track. What is checked here is
everything that does not depend on that state: instruction names, arity,
flag names and values, `--mount` options, heredoc placement.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Union

from grammar.errors import PybuildError
from grammar.lexer import Heredoc
from grammar.parser import Node, ParseResult

STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9-_.]*$")
ALL_INSTRUCTIONS = ("ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
                    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR")


@dataclass(frozen=True)
class Location:
    """Where an instruction is: file name, first and last line, the text as written."""

    filename: str
    start: int
    end: int
    source: str = ""

    @property
    def place(self) -> str:
        return f"{self.filename}:{self.start}"

    def error(self, message: str) -> PybuildError:
        return PybuildError(message, place=self.place, source=self.source)


@dataclass(frozen=True)
class Command:
    """RUN/CMD/ENTRYPOINT argument: exec form (argv list) or shell form (one string)."""

    args: tuple[str, ...]
    exec_form: bool

    @property
    def shell_text(self) -> str:
        return self.args[0] if self.args and not self.exec_form else ""


@dataclass(frozen=True)
class MountSpec:
    """One `RUN --mount=...`, options validated, values unexpanded."""

    type: str
    target: str = ""
    source: str = ""
    from_: str = ""
    readonly: bool = False
    id: str = ""
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    required: bool = False
    env: str = ""


@dataclass(frozen=True)
class Instruction:
    loc: Location
    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return type(self).__name__.upper()


@dataclass(frozen=True)
class From(Instruction):
    image: str
    stage_name: str | None = None
    platform: str | None = None


@dataclass(frozen=True)
class Run(Instruction):
    command: Command
    heredocs: tuple[Heredoc, ...] = ()
    mounts: tuple[MountSpec, ...] = ()
    network: str | None = None
    security: str | None = None


@dataclass(frozen=True)
class Cmd(Instruction):
    command: Command


@dataclass(frozen=True)
class Entrypoint(Instruction):
    command: Command


@dataclass(frozen=True)
class Shell(Instruction):
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Env(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Label(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Maintainer(Instruction):
    maintainer: str


@dataclass(frozen=True)
class Arg(Instruction):
    args: tuple[tuple[str, str | None], ...]  # (name, default) ; default None when absent


@dataclass(frozen=True)
class Expose(Instruction):
    ports: tuple[str, ...]


@dataclass(frozen=True)
class Volume(Instruction):
    paths: tuple[str, ...]


@dataclass(frozen=True)
class User(Instruction):
    user: str


@dataclass(frozen=True)
class Workdir(Instruction):
    path: str


@dataclass(frozen=True)
class Stopsignal(Instruction):
    signal: str


@dataclass(frozen=True)
class Healthcheck(Instruction):
    test: tuple[str, ...]  # ("NONE",) | ("CMD", argv...) | ("CMD-SHELL", cmd)
    interval: int = 0  # nanoseconds, 0 = inherit/default
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(frozen=True)
class Copy(Instruction):
    sources: tuple[str, ...]
    dest: str
    heredocs: tuple[Heredoc, ...] = ()
    from_: str | None = None
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Add(Instruction):
    sources: tuple[str, ...]
    dest: str
    heredocs: tuple[Heredoc, ...] = ()
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    checksum: str | None = None
    keep_git_dir: bool = False
    unpack: bool | None = None
    excludes: tuple[str, ...] = ()
    parents: bool = False


@dataclass(frozen=True)
class Onbuild(Instruction):
    expression: str  # the trigger as written, stored in the image config
    trigger: "AnyInstruction"


AnyInstruction = Union[From, Run, Cmd, Entrypoint, Shell, Env, Label, Maintainer, Arg, Expose, Volume,
                       User, Workdir, Stopsignal, Healthcheck, Copy, Add, Onbuild]


# -- flags ------------------------------------------------------------------------------

FLAGS: dict[str, dict[str, str]] = {
    "from": {"platform": "str"},
    "run": {"mount": "list", "network": "str", "security": "str"},
    "copy": {"from": "str", "chown": "str", "chmod": "str", "link": "bool", "parents": "bool", "exclude": "list"},
    "add": {"chown": "str", "chmod": "str", "link": "bool", "checksum": "str", "keep-git-dir": "bool",
            "unpack": "bool", "exclude": "list", "parents": "bool"},
    "healthcheck": {"interval": "str", "timeout": "str", "start-period": "str", "start-interval": "str",
                    "retries": "str"},
}


def parse_flags(node: Node, loc: Location) -> dict[str, object]:
    """Validate `--x[=y]` words against the instruction's flag table (BuildKit's BFlags rules)."""
    allowed = FLAGS.get(node.name, {})
    values: dict[str, object] = {}
    for raw in node.flags:
        if not raw.startswith("--"):
            raise loc.error(f"bad flag {raw!r}: flags start with --")
        name, has_value, value = raw[2:].partition("=")
        kind = allowed.get(name)
        if kind is None:
            hint = f"; {node.keyword.upper()} accepts " + ", ".join("--" + k for k in allowed) if allowed \
                else f"; {node.keyword.upper()} takes no flags"
            raise loc.error(f"unknown flag: --{name}{hint}")
        if kind == "list":
            if not has_value or value == "":
                raise loc.error(f"missing a value on flag: --{name}")
            values.setdefault(name, [])
            values[name].append(value)  # type: ignore[union-attr]
            continue
        if name in values:
            raise loc.error(f"duplicate flag specified: --{name}")
        if kind == "bool":
            if not has_value:
                values[name] = True
            elif value.lower() in ("true", "false"):
                values[name] = value.lower() == "true"
            else:
                raise loc.error(f"expecting boolean value for flag --{name}, not: {value}")
        else:
            if not has_value:
                raise loc.error(f"missing a value on flag: --{name}")
            values[name] = value
    return values


# -- RUN --mount --------------------------------------------------------------------------

MOUNT_KEYS = {
    "bind": {"type", "target", "source", "from", "readonly", "readwrite"},
    "cache": {"type", "target", "source", "from", "readonly", "id", "sharing", "mode", "uid", "gid"},
    "tmpfs": {"type", "target", "size"},
    "secret": {"type", "target", "id", "required", "mode", "uid", "gid", "env"},
    "ssh": {"type", "target", "id", "required", "mode", "uid", "gid"},
}
MOUNT_ALIASES = {"dst": "target", "destination": "target", "src": "source", "ro": "readonly", "rw": "readwrite"}


def parse_mount(value: str, loc: Location) -> MountSpec:
    """`type=cache,target=/root/.cache,id=pip` -> MountSpec, with BuildKit's keys and defaults."""
    fields: dict[str, str | None] = {}
    for item in _split_csv(value):
        key, eq, val = item.partition("=")
        key = MOUNT_ALIASES.get(key.strip().lower(), key.strip().lower())
        fields[key] = val if eq else None
    mtype = (fields.get("type") or "bind").lower()
    if mtype not in MOUNT_KEYS:
        raise loc.error(f"unsupported mount type {mtype!r} in --mount={value}: use bind, cache, tmpfs, secret or ssh")
    for key in fields:
        if key not in MOUNT_KEYS[mtype]:
            raise loc.error(f"unexpected key {key!r} for a {mtype} mount in --mount={value}; "
                            f"allowed: {', '.join(sorted(MOUNT_KEYS[mtype]))}")

    def boolean(key: str, default: bool) -> bool:
        if key not in fields:
            return default
        raw = fields[key]
        if raw is None or raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise loc.error(f"invalid value {raw!r} for {key} in --mount={value}: use true or false")

    def integer(key: str, base: int = 10) -> int | None:
        raw = fields.get(key)
        if raw is None:
            return None
        try:
            return int(raw, base)
        except ValueError:
            raise loc.error(f"invalid {key} {raw!r} in --mount={value}: expected a number") from None

    target = fields.get("target") or ""
    ident = fields.get("id") or ""
    if mtype in ("secret", "ssh"):
        if mtype == "secret" and not ident and target:
            ident = target.rsplit("/", 1)[-1]
        if mtype == "secret" and not ident:
            raise loc.error(f"a secret mount needs id= or target= in --mount={value}")
        if not target and not fields.get("env"):
            target = f"/run/secrets/{ident}" if mtype == "secret" else "/run/buildkit/ssh_agent.0"
    elif not target:
        raise loc.error(f"--mount={value} needs a target (target=/path inside the container)")
    readonly = boolean("readonly", mtype == "bind") and not boolean("readwrite", False)
    sharing = (fields.get("sharing") or "shared").lower()
    if sharing not in ("shared", "private", "locked"):
        raise loc.error(f"invalid sharing {sharing!r} in --mount={value}: use shared, private or locked")
    size = None
    if fields.get("size"):
        size = _parse_size(fields["size"] or "", loc, value)
    return MountSpec(
        type=mtype, target=target, source=fields.get("source") or "", from_=fields.get("from") or "",
        readonly=readonly, id=ident or (target if mtype == "cache" else ""), sharing=sharing,
        mode=integer("mode", 8), uid=integer("uid"), gid=integer("gid"), size=size,
        required=boolean("required", False), env=fields.get("env") or "",
    )


def _split_csv(value: str) -> list[str]:
    """Comma-separated fields, double quotes protecting commas (Go's encoding/csv, one record)."""
    items, buf, quoted = [], [], False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    items.append("".join(buf))
    return [i for i in items if i.strip()]


def _parse_size(raw: str, loc: Location, value: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)i?b?", raw.strip().lower())
    if not match:
        raise loc.error(f"invalid size {raw!r} in --mount={value}: use bytes or a k/m/g suffix")
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")


# -- durations (HEALTHCHECK) ------------------------------------------------------------------

_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
                   "m": 60_000_000_000, "h": 3_600_000_000_000}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int | None:
    """Go's time.ParseDuration, in nanoseconds; None when malformed."""
    if text in ("0", "+0", "-0"):
        return 0
    pos, total = 0, 0.0
    body = text.lstrip("+")
    if not body or body.startswith("-"):
        return None
    while pos < len(body):
        match = _DURATION_RE.match(body, pos)
        if not match:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return int(total)


# -- conversion -----------------------------------------------------------------------------

def convert(result: ParseResult, filename: str = "Dockerfile") -> list[AnyInstruction]:
    """Typed instructions for a whole file; the first mistake raises PybuildError with its line."""
    out: list[AnyInstruction] = []
    for node in result.nodes:
        loc = Location(filename, node.start_line, node.end_line, result.source_of(node))
        out.append(convert_node(node, loc))
    return out


def convert_node(node: Node, loc: Location) -> AnyInstruction:
    name = node.name
    builder = _BUILDERS.get(name)
    if builder is None:
        close = difflib.get_close_matches(node.keyword.upper(), ALL_INSTRUCTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise loc.error(f"unknown instruction: {node.keyword}{hint}")
    if node.heredocs and name not in ("run", "copy", "add"):
        raise loc.error(f"{name.upper()} does not accept heredocs")
    flags = parse_flags(node, loc)
    return builder(node, loc, flags)


def _require_args(node: Node, loc: Location, what: str = "at least one argument") -> None:
    if not node.args:
        raise loc.error(f"{node.keyword.upper()} requires {what}")


def _from(node: Node, loc: Location, flags: dict) -> From:
    args = node.args
    if len(args) == 1:
        return From(loc, node.flags, args[0], None, flags.get("platform"))
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not STAGE_NAME_RE.match(name):
            raise loc.error(f"invalid stage name {args[2]!r}: names must match ^[a-z][a-z0-9-_.]*$ "
                            "(start with a letter; letters, digits, '-', '_' and '.' only)")
        return From(loc, node.flags, args[0], name, flags.get("platform"))
    if not args:
        raise loc.error("FROM requires an image: FROM <image> [AS <name>]")
    raise loc.error("FROM requires either one or three arguments: FROM <image> [AS <name>]")


def _command(node: Node) -> Command:
    return Command(node.args, node.json)


def _run(node: Node, loc: Location, flags: dict) -> Run:
    _require_args(node, loc)
    mounts = tuple(parse_mount(m, loc) for m in flags.get("mount", []))
    network = flags.get("network")
    if network is not None and network not in ("default", "none", "host"):
        raise loc.error(f"invalid --network={network}: use default, none or host")
    security = flags.get("security")
    if security is not None and security not in ("sandbox", "insecure"):
        raise loc.error(f"invalid --security={security}: use sandbox or insecure")
    return Run(loc, node.flags, _command(node), node.heredocs, mounts, network, security)


def _cmd(node: Node, loc: Location, flags: dict) -> Cmd:
    return Cmd(loc, node.flags, _command(node))


def _entrypoint(node: Node, loc: Location, flags: dict) -> Entrypoint:
    return Entrypoint(loc, node.flags, _command(node))


def _shell(node: Node, loc: Location, flags: dict) -> Shell:
    if not node.json:
        raise loc.error('SHELL requires the arguments to be in JSON form, e.g. SHELL ["/bin/bash", "-c"]')
    if not node.args:
        raise loc.error("SHELL requires at least one argument")
    return Shell(loc, node.flags, node.args)


def _pairs(node: Node, loc: Location) -> tuple[tuple[str, str], ...]:
    _require_args(node, loc, "at least one argument (KEY=value)")
    args = node.args
    pairs = tuple((args[i], args[i + 1]) for i in range(0, len(args), 3))
    for key, _ in pairs:
        if not key:
            raise loc.error(f"{node.keyword.upper()} names cannot be empty")
    return pairs


def _env(node: Node, loc: Location, flags: dict) -> Env:
    return Env(loc, node.flags, _pairs(node, loc))


def _label(node: Node, loc: Location, flags: dict) -> Label:
    return Label(loc, node.flags, _pairs(node, loc))


def _maintainer(node: Node, loc: Location, flags: dict) -> Maintainer:
    _require_args(node, loc, "exactly one argument")
    return Maintainer(loc, node.flags, node.args[0])


def _arg(node: Node, loc: Location, flags: dict) -> Arg:
    _require_args(node, loc, "at least one argument: ARG NAME[=default]")
    args = []
    for word in node.args:
        name, eq, default = word.partition("=")
        if not name:
            raise loc.error(f"ARG names cannot be empty (in {word!r})")
        args.append((name, default if eq else None))
    return Arg(loc, node.flags, tuple(args))


def _expose(node: Node, loc: Location, flags: dict) -> Expose:
    _require_args(node, loc, "at least one port")
    return Expose(loc, node.flags, node.args)


def _volume(node: Node, loc: Location, flags: dict) -> Volume:
    _require_args(node, loc, "at least one path")
    if any(not p.strip() for p in node.args):
        raise loc.error("VOLUME specified can not be an empty string")
    return Volume(loc, node.flags, node.args)


def _single(cls, what: str):
    def build(node: Node, loc: Location, flags: dict):
        if not node.args:
            raise loc.error(f"{node.keyword.upper()} requires {what}")
        return cls(loc, node.flags, node.args[0])
    return build


def _healthcheck(node: Node, loc: Location, flags: dict) -> Healthcheck:
    if not node.args:
        raise loc.error("HEALTHCHECK requires NONE or CMD <command>")
    kind = node.args[0].upper()
    if kind == "NONE":
        if len(node.args) > 1:
            raise loc.error("HEALTHCHECK NONE takes no arguments")
        if node.flags:
            raise loc.error("HEALTHCHECK NONE takes no flags")
        return Healthcheck(loc, node.flags, ("NONE",))
    if kind != "CMD":
        raise loc.error(f"unknown type {node.args[0]!r} in HEALTHCHECK: use CMD <command> or NONE")
    cmd = node.args[1:]
    if not cmd:
        raise loc.error("HEALTHCHECK CMD requires a command")
    test = ("CMD",) + cmd if node.json else ("CMD-SHELL", cmd[0])
    durations = {}
    for key in ("interval", "timeout", "start-period", "start-interval"):
        raw = flags.get(key)
        if raw is None:
            durations[key] = 0
            continue
        value = parse_duration(raw)
        if value is None:
            raise loc.error(f"invalid --{key}={raw}: use a duration such as 30s, 1m30s or 500ms")
        if 0 < value < 1_000_000:
            raise loc.error(f"--{key} cannot be less than 1ms")
        durations[key] = value
    retries = 0
    if "retries" in flags:
        try:
            retries = int(flags["retries"])
        except ValueError:
            raise loc.error(f"invalid --retries={flags['retries']}: expected a whole number") from None
        if retries < 0:
            raise loc.error("--retries cannot be negative")
    return Healthcheck(loc, node.flags, test, durations["interval"], durations["timeout"],
                       durations["start-period"], durations["start-interval"], retries)


def _copy_args(node: Node, loc: Location) -> tuple[tuple[str, ...], str]:
    if len(node.args) < 2:
        raise loc.error(f"{node.keyword.upper()} requires at least two arguments, but only "
                        f"{len(node.args)} {'was' if len(node.args) == 1 else 'were'} provided: "
                        f"{node.keyword.upper()} <src>... <dest>")
    return node.args[:-1], node.args[-1]


def _check_chmod(flags: dict, loc: Location) -> None:
    chmod = flags.get("chmod")
    if chmod is not None and not re.fullmatch(r"[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*(,[ugoa]*[-+=][rwxXst]*)*", chmod):
        raise loc.error(f"invalid --chmod={chmod}: use an octal mode such as 755 or 0644")


def _copy(node: Node, loc: Location, flags: dict) -> Copy:
    sources, dest = _copy_args(node, loc)
    _check_chmod(flags, loc)
    return Copy(loc, node.flags, sources, dest, node.heredocs, flags.get("from"), flags.get("chown"),
                flags.get("chmod"), bool(flags.get("link", False)), bool(flags.get("parents", False)),
                tuple(flags.get("exclude", [])))


def _add(node: Node, loc: Location, flags: dict) -> Add:
    sources, dest = _copy_args(node, loc)
    _check_chmod(flags, loc)
    checksum = flags.get("checksum")
    if checksum is not None and not re.fullmatch(r"sha(256|384|512):[0-9a-f]+", checksum):
        raise loc.error(f"invalid --checksum={checksum}: use sha256:<hex digest>")
    return Add(loc, node.flags, sources, dest, node.heredocs, flags.get("chown"), flags.get("chmod"),
               bool(flags.get("link", False)), checksum, bool(flags.get("keep-git-dir", False)),
               flags.get("unpack"), tuple(flags.get("exclude", [])), bool(flags.get("parents", False)))


def _onbuild(node: Node, loc: Location, flags: dict) -> Onbuild:
    if node.trigger is None:
        raise loc.error("ONBUILD requires an instruction to run later, e.g. ONBUILD COPY . /app")
    tname = node.trigger.name
    if tname == "onbuild":
        raise loc.error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if tname in ("from", "maintainer"):
        raise loc.error(f"{tname.upper()} isn't allowed as an ONBUILD trigger")
    trigger = convert_node(node.trigger, loc)
    expression = node.original.strip()[len(node.keyword):].strip()
    return Onbuild(loc, node.flags, expression, trigger)


_BUILDERS = {
    "from": _from, "run": _run, "cmd": _cmd, "entrypoint": _entrypoint, "shell": _shell, "env": _env,
    "label": _label, "maintainer": _maintainer, "arg": _arg, "expose": _expose, "volume": _volume,
    "user": _single(User, "a user name or uid"), "workdir": _single(Workdir, "a path"),
    "stopsignal": _single(Stopsignal, "a signal name or number"), "healthcheck": _healthcheck,
    "copy": _copy, "add": _add, "onbuild": _onbuild,
}
