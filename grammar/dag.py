"""Typed instructions -> build stages and the edges between them.

A stage starts at FROM; its base is `scratch`, an earlier stage, or an image
reference. Edges come from `FROM <stage>`, `COPY --from=<stage|index>` and
`RUN --mount=from=<stage>`. Global ARGs (before the first FROM) are usable in
FROM lines; inside a stage an ARG must be declared to be seen. `--target`
prunes the graph to the stages the target needs.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping

from grammar import instructions as ins
from grammar.errors import PybuildError
from grammar.parser import ParseResult
from grammar.shell import ShellError, expand

# Proxy args reach RUN without an ARG line and are kept out of the image history.
PROXY_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
              "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


@dataclass
class Scope:
    """The variables an instruction's words are expanded against (ARG and ENV, in order).

    `build_args` are the user's --build-arg values; `meta` the global ARGs'
    values. An ARG inside a stage takes, in order: the build arg, the global
    ARG of the same name (when declared without a default), its own default.
    ENV wins over ARG of the same name. Pure: the executor drives it too.
    """

    build_args: Mapping[str, str]
    meta: Mapping[str, str]
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    used_args: set[str] = field(default_factory=set)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}

    def expand(self, word: str, escape: str, loc: ins.Location) -> str:
        return self.expand_full(word, escape, loc).value

    def expand_full(self, word: str, escape: str, loc: ins.Location):
        try:
            result = expand(word, self.variables(), escape)
        except ShellError as exc:
            raise PybuildError(exc.message, loc.place, loc.source) from None
        self.used_args.update(n for n in result.used if n in self.args and n not in self.env)
        return result

    def declare_arg(self, name: str, default: str | None, escape: str, loc: ins.Location) -> str | None:
        if name in self.build_args:
            value: str | None = self.build_args[name]
        elif default is not None:
            value = self.expand(default, escape, loc)
        else:
            value = self.meta.get(name)
        if value is not None:
            self.args[name] = value
        return value


@dataclass(frozen=True)
class ArgDecl:
    """An ARG a stage declares: name, default as written, line."""

    name: str
    default: str | None
    line: int


@dataclass(frozen=True)
class Stage:
    index: int
    name: str | None
    from_: ins.From
    base: str  # the FROM argument after expansion
    platform: str | None
    parent: int | None  # index of the stage it is built on, when FROM names a stage
    instructions: tuple[ins.AnyInstruction, ...]
    deps: tuple[int, ...]  # stages it reads from (parent, COPY --from, RUN --mount from=)
    image_deps: tuple[str, ...]  # images it reads from besides its base (COPY --from=image)
    args: tuple[ArgDecl, ...]
    meta_args_used: tuple[str, ...]  # global ARGs its FROM line uses

    @property
    def label(self) -> str:
        return self.name or str(self.index)

    @property
    def is_scratch(self) -> bool:
        return self.parent is None and self.base.lower() == "scratch"


@dataclass(frozen=True)
class BuildGraph:
    stages: tuple[Stage, ...]
    meta_args: tuple[ArgDecl, ...]
    meta_values: Mapping[str, str]
    escape: str = "\\"
    filename: str = "Dockerfile"

    def find(self, ref: str) -> Stage | None:
        """A stage by name (case-insensitive) or by index."""
        lowered = ref.lower()
        for stage in self.stages:
            if stage.name == lowered:
                return stage
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None

    def target(self, name: str | None) -> Stage:
        if not name:
            return self.stages[-1]
        stage = self.find(name)
        if stage is None:
            names = [s.name for s in self.stages if s.name]
            known = ", ".join(names) if names else "none (name stages with FROM <image> AS <name>)"
            raise PybuildError(f"target stage {name!r} could not be found; stages: {known}")
        return stage

    def needed(self, target: Stage) -> list[Stage]:
        """The stages `target` needs, dependencies first."""
        order: list[Stage] = []
        seen: set[int] = set()

        def visit(index: int) -> None:
            if index in seen:
                return
            seen.add(index)
            for dep in self.stages[index].deps:
                visit(dep)
            order.append(self.stages[index])

        visit(target.index)
        return order


def default_platform_args(platform: str) -> dict[str, str]:
    """TARGET*/BUILD* values for `os/arch[/variant]`."""
    parts = platform.split("/")
    os_, arch = parts[0], parts[1] if len(parts) > 1 else ""
    variant = parts[2] if len(parts) > 2 else ""
    values = {}
    for prefix in ("TARGET", "BUILD"):
        values[f"{prefix}PLATFORM"] = platform
        values[f"{prefix}OS"] = os_
        values[f"{prefix}ARCH"] = arch
        values[f"{prefix}VARIANT"] = variant
    return values


def build_graph(result: ParseResult, build_args: Mapping[str, str] | None = None,
                platform: str = "linux/amd64", filename: str = "Dockerfile") -> BuildGraph:
    """Stages, edges and ARG scoping for a parsed Dockerfile; errors name the line."""
    build_args = dict(build_args or {})
    escape = result.escape
    instructions = ins.convert(result, filename)
    platform_values = default_platform_args(platform)

    meta_scope = Scope(build_args, {})
    meta_scope.args.update(platform_values)
    meta_decls: list[ArgDecl] = []
    position = 0
    while position < len(instructions) and not isinstance(instructions[position], ins.From):
        item = instructions[position]
        if not isinstance(item, ins.Arg):
            raise item.loc.error(f"{item.name} cannot come before the first FROM: only ARG may precede FROM "
                                 "(add a FROM line above it)")
        for name, default in item.args:
            meta_decls.append(ArgDecl(name, default, item.loc.start))
            meta_scope.declare_arg(name, default, escape, item.loc)
        position += 1
    if position == len(instructions):
        last = instructions[-1].loc if instructions else ins.Location(filename, 1, 1)
        raise last.error("no FROM instruction: a Dockerfile must start a stage with FROM <image> "
                         "(FROM scratch for an empty one)")
    meta_values = dict(meta_scope.args)

    # Split into stages.
    chunks: list[tuple[ins.From, list[ins.AnyInstruction]]] = []
    for item in instructions[position:]:
        if isinstance(item, ins.From):
            chunks.append((item, []))
        else:
            chunks[-1][1].append(item)

    names: dict[str, int] = {}
    for index, (frm, _) in enumerate(chunks):
        if frm.stage_name:
            if frm.stage_name in names:
                raise frm.loc.error(f"duplicate stage name {frm.stage_name!r}: it is already used on line "
                                    f"{chunks[names[frm.stage_name]][0].loc.start}")
            names[frm.stage_name] = index

    stages: list[Stage] = []
    for index, (frm, body) in enumerate(chunks):
        scope = Scope(build_args, meta_values)
        scope.args.update(meta_values)
        base_exp = scope.expand_full(frm.image, escape, frm.loc)
        base = base_exp.value
        used_meta = set(n for n in base_exp.used if n in meta_values)
        stage_platform = None
        if frm.platform:
            plat = scope.expand_full(frm.platform, escape, frm.loc)
            stage_platform = plat.value
            used_meta.update(n for n in plat.used if n in meta_values)
        if not base:
            raise frm.loc.error(f"FROM {frm.image!r} expands to an empty image name: set the build arg "
                                "(--build-arg) or give the ARG a default")
        parent = names.get(base.lower())
        if parent is not None and parent >= index:
            parent = None  # a later stage's name is an image reference, as in BuildKit
        deps: set[int] = {parent} if parent is not None else set()
        image_deps: list[str] = []
        # Inside the stage only declared ARGs are visible; walk them in order for --from expansion.
        stage_scope = Scope(build_args, meta_values)
        if parent is not None:
            stage_scope.env.update(_env_of(stages[parent]))
        decls: list[ArgDecl] = []
        for item in body:
            if isinstance(item, ins.Arg):
                for name, default in item.args:
                    decls.append(ArgDecl(name, default, item.loc.start))
                    stage_scope.declare_arg(name, default, escape, item.loc)
            elif isinstance(item, ins.Env):
                for key, value in item.pairs:
                    stage_scope.env[stage_scope.expand(key, escape, item.loc)] = stage_scope.expand(
                        value, escape, item.loc)
            refs: list[str] = []
            if isinstance(item, ins.Copy) and item.from_:
                refs.append(stage_scope.expand(item.from_, escape, item.loc))
            if isinstance(item, ins.Run):
                refs.extend(stage_scope.expand(m.from_, escape, item.loc) for m in item.mounts if m.from_)
            for ref in refs:
                dep = _resolve_from(ref, names, len(chunks), item, index)
                if dep is None:
                    image_deps.append(ref)
                else:
                    deps.add(dep)
        stages.append(Stage(index, frm.stage_name, frm, base, stage_platform, parent, tuple(body),
                            tuple(sorted(deps)), tuple(image_deps), tuple(decls), tuple(sorted(used_meta))))

    graph = BuildGraph(tuple(stages), tuple(meta_decls), meta_values, escape, filename)
    _check_cycles(graph)
    return graph


def _env_of(stage: Stage) -> dict[str, str]:
    """The literal ENV a stage sets (for --from expansion in child stages; best effort)."""
    env: dict[str, str] = {}
    for item in stage.instructions:
        if isinstance(item, ins.Env):
            env.update(item.pairs)
    return env


def _resolve_from(ref: str, names: Mapping[str, int], count: int, item: ins.AnyInstruction,
                  current: int) -> int | None:
    """A `--from` value -> stage index, or None for an image reference."""
    if ref.lower() in names:
        return names[ref.lower()]
    if ref.isdigit():
        index = int(ref)
        if index >= count:
            raise item.loc.error(f"--from={ref}: there is no stage {index}; stages are numbered 0 to {count - 1}")
        return index
    if "/" not in ref and ":" not in ref and "@" not in ref:
        close = difflib.get_close_matches(ref.lower(), list(names), n=1, cutoff=0.75)
        if close:
            raise item.loc.error(f"--from={ref}: no stage named {ref!r} (did you mean {close[0]!r}?); "
                                 "to copy from an image, write its reference with a tag, e.g. name:latest")
    return None


def _check_cycles(graph: BuildGraph) -> None:
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done

    def visit(index: int, path: list[int]) -> None:
        if state.get(index) == 2:
            return
        if state.get(index) == 1:
            cycle = path[path.index(index):] + [index]
            stage = graph.stages[index]
            chain = " -> ".join(graph.stages[i].label for i in cycle)
            raise stage.from_.loc.error(f"circular dependency between stages: {chain}")
        state[index] = 1
        for dep in graph.stages[index].deps:
            visit(dep, path + [index])
        state[index] = 2

    for stage in graph.stages:
        visit(stage.index, [])


def describe(graph: BuildGraph, target: str | None = None) -> dict:
    """The outline a CI system or editor consumes: stages, dependencies, build args."""
    chosen = graph.target(target)
    needed = {s.index for s in graph.needed(chosen)}
    return {
        "target": chosen.label,
        "args": [{"name": a.name, "default": a.default, "line": a.line} for a in graph.meta_args],
        "stages": [
            {
                "index": s.index,
                "name": s.name,
                "base": s.base,
                "base_kind": "scratch" if s.is_scratch else ("stage" if s.parent is not None else "image"),
                "platform": s.platform,
                "line": s.from_.loc.start,
                "depends_on": [graph.stages[d].label for d in s.deps],
                "images": list(s.image_deps),
                "args": [{"name": a.name, "default": a.default, "line": a.line} for a in s.args],
                "global_args": list(s.meta_args_used),
                "needed": s.index in needed,
            }
            for s in graph.stages
        ],
    }
