"""The build: Dockerfile + context -> stages run in order -> an image in the store.

Metadata instructions change the config (an `empty_layer` history entry);
RUN runs in the namespace sandbox on an overlay of the parent layers and
COPY/ADD write through the same overlay, so each step's upper dir *is* the
new layer. Only the stages the target needs are built.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from builder.context import BuildContext
from builder.patterns import PatternMatcher, has_wildcards
from cache.digests import DigestMemo, file_sha256
from cache.explain import explain
from cache.index import CacheIndex, StepResult
from cache.keys import entry_line, step_key, tree_digest
from builder.image import HistoryEntry, ImageConfig, config_to_dict, format_time, host_platform
from builder.metadata import DEFAULT_PATH, DEFAULT_SHELL, apply_instruction
from builder.progress import Progress
from builder.store import Image, Store
from grammar import instructions as ins
from grammar.dag import PROXY_ARGS, BuildGraph, Scope, Stage, build_graph
from grammar.errors import PybuildError
from grammar.lexer import heredoc_markers
from grammar.parser import parse, parse_file
from grammar.shell import expand

if TYPE_CHECKING:
    from builder import sandbox



@dataclass(frozen=True)
class BuildRequest:
    context: Path
    dockerfile: Path
    tags: tuple[str, ...] = ()
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()
    network: str = "host"
    source_date_epoch: int | None = None  # SOURCE_DATE_EPOCH: clamp times for reproducible images
    pull: bool = False  # check the registry for a newer base even when one is in the store
    platform: str | None = None  # for pulling bases (pybuild runs RUN natively: the host's by default)
    insecure_registries: tuple[str, ...] = ()
    ca_cert: str | None = None
    secrets: dict[str, bytes] = field(default_factory=dict)  # --secret id -> value (never in a key or layer)
    ssh: dict[str, str] = field(default_factory=dict)  # --ssh id -> agent socket path


@dataclass
class StageState:
    """What a stage has built so far: its config, layers and the variables in scope."""

    stage: Stage
    config: ImageConfig
    layers: list[Path]  # unpacked layer dirs, bottom first
    scope: Scope
    key: str = ""  # cache key of the last step (the base's identity before any step)
    base_id: str = ""
    inherited_cmd: bool = True  # CMD came from the base; ENTRYPOINT then resets it

    @property
    def lowers(self) -> list[Path]:
        return list(reversed(self.layers))


@dataclass
class Prepared:
    """A layer step ready to run: what its key hashes, what --explain compares, how to run it."""

    inputs: dict
    record: dict
    created_by: str
    execute: Callable[[Path, Path], None]  # (upper, work) -> None; writes the step's changes into upper
    cleanup: Callable[[], None] = lambda: None


class Builder:
    def __init__(self, store: Store, progress: Progress, index: CacheIndex | None = None,
                 explain_misses: bool = False) -> None:
        self.store = store
        self.progress = progress
        self.index = index
        self.explain_misses = explain_misses
        self.digests = DigestMemo(index.load_digests if index else None)
        self.epoch: int | None = None
        self.insecure: tuple[str, ...] = ()
        self.ca_cert: str | None = None

    def now(self) -> str:
        """History times: the clock, or SOURCE_DATE_EPOCH for a reproducible build."""
        return format_time(self.epoch)

    # -- whole build ------------------------------------------------------------------

    def build(self, request: BuildRequest) -> Image:
        self.epoch = request.source_date_epoch
        self.insecure, self.ca_cert = request.insecure_registries, request.ca_cert
        result = parse_file(request.dockerfile)
        platform = host_platform()
        graph = build_graph(result, request.build_args, platform=str(platform),
                            filename=str(request.dockerfile.name))
        context = BuildContext.from_dir(request.context, request.dockerfile)
        self.dockerfile_id = os.path.realpath(request.dockerfile)
        target = graph.target(request.target)
        built: dict[int, StageState] = {}
        for stage in graph.needed(target):
            built[stage.index] = self.build_stage(graph, stage, built, context, request)
        final = built[target.index]
        config = final.config
        for key, value in request.labels.items():
            config.config.labels[key] = value
        # The newest step's time, not the clock: a rebuild from cache gives the same image id.
        config.created = max((h.created for h in config.history if h.created), default=config.created)
        if self.epoch is not None:
            config.created = format_time(self.epoch)
        if self.index is not None:
            self.index.save_digests(self.digests.pending)
            self.digests.pending = {}
        image = self.store.put_image(config)
        for tag in request.tags:
            self.store.tag(image, tag)
        return image

    def build_stage(self, graph: BuildGraph, stage: Stage, built: dict[int, StageState],
                    context: BuildContext, request: BuildRequest) -> StageState:
        state = self.base_state(graph, stage, built, request)
        steps = list(stage.instructions)
        triggers = self.onbuild_triggers(state, graph)
        state.config.config.on_build = []
        total = len(triggers) + len(steps)
        for number, item in enumerate(triggers + steps, start=1):
            title = f"[{_stage_title(stage)} {number}/{total}] {_describe(item)}"
            started = time.monotonic()
            self.progress.step_start(title)
            identity = f"{self.dockerfile_id}\0{_stage_title(stage)}\0{number}"
            use_cache = not request.no_cache and not {stage.label, _stage_title(stage)} & set(request.no_cache_filter)
            try:
                cached = self.step(state, item, graph, built, context, request, identity, use_cache)
            except PybuildError as exc:
                if exc.place:
                    raise
                raise item.loc.error(exc.message) from None  # name the instruction that failed
            self.progress.step_done(title, time.monotonic() - started, cached)
        return state

    def step(self, state: StageState, item: ins.AnyInstruction, graph: BuildGraph, built: dict[int, StageState],
             context: BuildContext, request: BuildRequest, identity: str, use_cache: bool) -> bool:
        """Run or reuse one instruction; True when its result came from the cache."""
        if isinstance(item, ins.Workdir):
            apply_instruction(state.config, state.scope, item, graph.escape, state)  # history: the layer step's
            prepared = self.prepare_workdir(state)
        elif not isinstance(item, (ins.Run, ins.Copy, ins.Add)):
            self.dispatch(state, item, graph.escape)
            if isinstance(item, ins.Arg):
                return False  # an ARG changes only what later steps read, and they key on that
            # The container config after the step (not the history: it holds times).
            key = step_key(state.key, item.name, {"config": config_to_dict(state.config).get("config"),
                                                  "author": state.config.author})
            created_by = state.config.history[-1].created_by
            hit = self.index.lookup(key) if self.index and use_cache else None
            if hit is not None:
                state.config.history[-1].created = hit.created  # keep the image id stable
            elif self.index is not None:
                self.index.record(StepResult(key, None, state.config.history[-1].created, created_by), None, None)
            state.key = key
            return False
        elif isinstance(item, ins.Run):
            prepared = self.prepare_run(state, item, graph, built, context, request)
        else:
            prepared = self.prepare_copy(state, item, graph, built, context)
        try:
            key = step_key(state.key, item.name, prepared.inputs)
            record = {**prepared.record, "parent": state.key, "base": state.base_id,
                      "base_name": state.stage.base, "instruction": item.loc.source.strip(),
                      "other": step_key("", item.name, _options(prepared.inputs))}
            hit = self.index.lookup(key) if self.index and use_cache else None
            if hit is not None and (hit.diff_id is None or self.store.layer_path(hit.diff_id)):
                self.apply_result(state, hit)
                self.index.touch([key])
                self.index.set_latest(identity, key)
                state.key = key
                return True
            if self.index is not None and (self.explain_misses or self.progress.mode == "plain") and use_cache:
                previous = self.index.previous_record(identity)
                if previous is not None or self.explain_misses:  # a first build needs no excuse in CI logs
                    why = explain(previous, record)
                    self.progress.note(f"cache miss: {why}" if self.progress.mode != "plain"
                                       else f"#{self.progress.number} cache miss: {why}")
            upper, work = self.store.make_work_dir()
            try:
                prepared.execute(upper, work)
                result = self.commit(state, upper, prepared.created_by, key)
            finally:
                shutil.rmtree(upper.parent, ignore_errors=True)
        finally:
            prepared.cleanup()
        if self.index is not None:
            self.index.record(result, record, identity)
        state.key = key
        return False

    def apply_result(self, state: StageState, result: StepResult) -> None:
        if result.diff_id is not None:
            layer_path = self.store.layer_path(result.diff_id)
            state.config.diff_ids.append(result.diff_id)
            state.layers.append(layer_path)
        state.config.history.append(HistoryEntry(created=result.created, created_by=result.created_by,
                                                 comment="pybuild", empty_layer=result.diff_id is None))

    def base_state(self, graph: BuildGraph, stage: Stage, built: dict[int, StageState],
                   request: BuildRequest) -> StageState:
        scope = Scope(request.build_args, graph.meta_values)
        title = f"[{_stage_title(stage)}] FROM {stage.base}"
        self.progress.step_start(title)
        if stage.parent is not None:
            parent = built[stage.parent]
            config, layers = parent.config.copy(), list(parent.layers)
            base_id = parent.key
        elif stage.is_scratch:
            host = host_platform()
            config = ImageConfig(architecture=host.architecture, os=host.os, variant=host.variant)
            config.config.working_dir = "/"  # as BuildKit writes it for scratch
            layers = []
            base_id = f"scratch:{host}"
        else:
            image = self.base_image(stage, request)
            config, layers = image.config.copy(), self.store.layer_dirs(image)
            base_id = image.id
        self.progress.step_done(title, 0.0)
        if not any(e.startswith("PATH=") for e in config.config.env):
            config.config.env.append(f"PATH={DEFAULT_PATH}")  # BuildKit gives every image a PATH
        for item in config.config.env:
            key, _, value = item.partition("=")
            scope.env[key] = value
        config.history = list(config.history)
        # Clamped layers differ from unclamped ones: the epoch is part of every key after the base.
        key = base_id if self.epoch is None else f"{base_id}@epoch={self.epoch}"
        return StageState(stage, config, layers, scope, key=key, base_id=base_id)

    def base_image(self, stage: Stage, request: BuildRequest) -> Image:
        """The FROM image: from the store, pulled when missing (or when --pull finds a newer one)."""
        from builder import registry

        local = registry.find_local(self.store, stage.base)
        if local is not None and not request.pull:
            return local
        options = {"insecure": request.insecure_registries, "ca_file": request.ca_cert}
        platform = stage.platform or request.platform
        try:
            if local is not None:  # --pull: only fetch when the registry has something else
                remote = registry.inspect_remote(stage.base, platform=platform, **options)
                if registry.find_local(self.store, f"{remote.reference.name}@{remote.digest}") is not None:
                    return local
            self.progress.note(f"pulling {stage.base}")
            return registry.pull(self.store, stage.base, platform=platform, progress=self.progress.note, **options)
        except PybuildError as exc:
            hint = "" if local is not None else (
                " (no such image in the store either: pull it, `pybuild import ROOTFS.tar NAME` or "
                "`pybuild load -i FILE`)")
            raise stage.from_.loc.error(f"cannot get {stage.base}: {exc.message}{hint}") from None

    def onbuild_triggers(self, state: StageState, graph: BuildGraph) -> list[ins.AnyInstruction]:
        """The base image's ONBUILD instructions, parsed as if written after FROM."""
        if state.stage.parent is not None or not state.config.config.on_build:
            return []
        text = "".join(line + "\n" for line in state.config.config.on_build)
        loc = state.stage.from_.loc
        try:
            nodes = parse("FROM scratch\n" + text, f"ONBUILD of {state.stage.base}").nodes[1:]
            result = [ins.convert_node(node, ins.Location(loc.filename, loc.start, loc.end, loc.source))
                      for node in nodes]
        except PybuildError as exc:
            raise loc.error(f"an ONBUILD trigger of {state.stage.base} is invalid: {exc.message}") from None
        for item in result:
            if isinstance(item, (ins.From, ins.Onbuild, ins.Maintainer)):
                raise loc.error(f"{item.name} isn't allowed as an ONBUILD trigger")
        return result

    # -- one instruction -------------------------------------------------------------------

    def dispatch(self, state: StageState, item: ins.AnyInstruction, escape: str) -> None:
        """A metadata instruction: the config changes, a history entry records it."""
        created_by = apply_instruction(state.config, state.scope, item, escape, state)
        if created_by is not None:
            self.history(state, created_by)

    def history(self, state: StageState, created_by: str, empty: bool = True) -> None:
        state.config.history.append(HistoryEntry(created=self.now(), created_by=created_by,
                                                 comment="pybuild", empty_layer=empty))

    # -- RUN -----------------------------------------------------------------------------

    def prepare_workdir(self, state: StageState) -> Prepared:
        """WORKDIR creates its directory (root-owned, 0755) when the image lacks it, as BuildKit."""
        from builder.rootfs import in_rootfs

        path = state.config.config.working_dir

        def mkdir(root: Path) -> None:
            from builder.rootfs import resolve_in_root

            os.makedirs(resolve_in_root(root, path), mode=0o755, exist_ok=True)

        def execute(upper: Path, work: Path) -> None:
            in_rootfs(state.lowers, (upper, work), mkdir)

        return Prepared({"workdir": path}, {}, f"WORKDIR {path}", execute)

    def prepare_run(self, state: StageState, item: ins.Run, graph: BuildGraph, built: dict[int, StageState],
                    context: BuildContext, request: BuildRequest) -> Prepared:
        cfg = state.config.config
        argv, script = self.run_argv(state, item)
        env = dict(e.partition("=")[::2] for e in cfg.env)
        env.setdefault("PATH", DEFAULT_PATH)
        build_env = {k: v for k, v in state.scope.args.items() if k not in env}
        proxies = {p: request.build_args[p] for p in PROXY_ARGS if p in request.build_args and p not in build_env}
        network = item.network or request.network
        mounts = [self.run_mount(state, m, graph, built, context, request, item.loc) for m in item.mounts]
        secret_env = {k: v for _, _, extra in mounts for k, v in extra.items()}
        shown_args = {k: v for k, v in sorted(build_env.items()) if k not in PROXY_ARGS}
        prefix = f"|{len(shown_args)} " + "".join(f"{k}={v} " for k, v in shown_args.items()) if shown_args else ""

        def execute(upper: Path, work: Path) -> None:
            from builder import sandbox  # imported when needed: a fully cached build never runs anything

            extra = [m for m, _, _ in mounts if m is not None]
            if script is not None:  # beside the layer dirs, outside the upper dir: never in the layer
                path = upper.parent / f"script-{script[0]}"
                path.write_text(script[1])
                path.chmod(0o755)
                extra.append(sandbox.Mount("bind", f"/dev/pipes/{script[0]}", path, True))
            read_fd, write_fd = os.pipe()
            try:
                spec = sandbox.SandboxSpec(
                    lower_dirs=state.lowers, upper_dir=upper, work_dir=work, argv=argv,
                    env={**env, **build_env, **proxies, **secret_env}, cwd=cfg.working_dir or "/", user=cfg.user,
                    network="none" if network == "none" else "host", mounts=extra,
                    stdout=write_fd, stderr=write_fd)
                code = self.progress.run_with_output(lambda: sandbox.run(spec), read_fd, write_fd)
            finally:
                os.close(read_fd)
            if code != 0:
                shown = item.command.shell_text if not item.command.exec_form else str(argv)
                raise item.loc.error(f"RUN failed with exit code {code}: {shown}")

        # Proxies reach the command but neither the key nor the history, as in docker build.
        inputs = {"argv": argv, "script": script, "env": env, "args": build_env, "cwd": cfg.working_dir,
                  "user": cfg.user,
                  "network": network, "mounts": [key for _, key, _ in mounts], "security": item.security}
        record = {"args": build_env, "env": env}
        return Prepared(inputs, record, f"RUN {prefix}{' '.join(argv)}", execute)

    def run_argv(self, state: StageState, item: ins.Run) -> tuple[list[str], tuple[str, str] | None]:
        """The command line, and (name, text) of a `#!` script to mount at /dev/pipes/<name>."""
        shell = list(state.config.config.shell or DEFAULT_SHELL)
        if item.command.exec_form:
            return list(item.command.args), None
        text = item.command.shell_text
        if item.heredocs:
            first = item.heredocs[0]
            if len(item.heredocs) == 1 and heredoc_markers(text.strip()) and " " not in text.strip():
                if first.text.startswith("#!"):  # as BuildKit: a script file run by its own interpreter
                    return [f"/dev/pipes/{first.name}"], (first.name, first.text)
                return shell + [first.text], None  # `RUN <<EOF`: the heredoc is the script
            # Let the shell read the here-documents itself: the line, then each body and terminator.
            text = text + "\n" + "".join(h.content + h.name + "\n" for h in item.heredocs)
        return shell + [text], None

    def run_mount(self, state: StageState, mount: ins.MountSpec, graph: BuildGraph, built: dict[int, StageState],
                  context: BuildContext, request: BuildRequest, loc: ins.Location
                  ) -> tuple["sandbox.Mount | None", dict, dict[str, str]]:
        """The sandbox mount for a RUN --mount, what of it enters the cache key, and env it sets."""
        from builder import sandbox

        x = lambda w: state.scope.expand(w, graph.escape, loc)  # noqa: E731
        target = x(mount.target)
        if mount.type == "tmpfs":
            return sandbox.Mount("tmpfs", target), {"type": "tmpfs", "target": target}, {}
        if mount.type == "cache":
            if mount.from_:
                raise loc.error("RUN --mount=type=cache,from=... is not supported yet: drop from=")
            ident = x(mount.id or mount.target)
            key = "".join(c if c.isalnum() or c in "-_." else "_" for c in ident) or "root"
            path = self.store.root / "cache-mounts" / key
            path.mkdir(parents=True, exist_ok=True)
            if mount.uid is not None or mount.gid is not None:
                os.chown(path, mount.uid or 0, mount.gid or 0)
            if mount.mode is not None:
                os.chmod(path, mount.mode)
            # A cache mount's contents never enter the key: it is a cache, not an input.
            return sandbox.Mount("bind", target, path, mount.readonly), {"type": "cache", "target": target,
                                                                          "id": ident}, {}
        if mount.type == "bind":
            if mount.from_:
                from builder.rootfs import mount_stage_root, resolve_in_root

                layers, source_id = self.source_root(x(mount.from_), graph, built, loc)
                root = self.store.temp_dir("mount") / "root"
                mount_stage_root(layers, root, mount.readonly)
                source = resolve_in_root(root, x(mount.source) or "/")
                if not os.path.lexists(source):
                    raise loc.error(f"--mount from={mount.from_}: {mount.source or '/'} does not exist there")
                return sandbox.Mount("bind", target, source, mount.readonly), {
                    "type": "bind", "target": target, "readonly": mount.readonly, "from": source_id,
                    "source": mount.source}, {}
            matches = context.resolve_sources([x(mount.source) or "."], allow_wildcards=False, instruction="RUN")
            lines, _ = self.source_digest(context, matches[0])
            return sandbox.Mount("bind", target, matches[0].abs_path, mount.readonly), {
                "type": "bind", "target": target, "readonly": mount.readonly, "content": tree_digest(lines)}, {}
        if mount.type == "secret":
            # As BuildKit: the value is neither in the key nor in the layer; a missing optional one is skipped.
            ident = x(mount.id)
            value = request.secrets.get(ident)
            key = {"type": "secret", "id": ident, "target": target, "env": mount.env}
            if value is None:
                if mount.required:
                    raise loc.error(f"secret {ident!r} is required: pass it with --secret id={ident},src=FILE "
                                    f"or --secret id={ident},env=VARIABLE")
                return None, key, {}
            if mount.env and not mount.target:
                return None, key, {mount.env: value.decode(errors="replace")}
            path = self.store.temp_dir("secret") / "value"
            path.write_bytes(value)
            os.chown(path, mount.uid or 0, mount.gid or 0)
            path.chmod(mount.mode if mount.mode is not None else 0o400)
            extra_env = {mount.env: value.decode(errors="replace")} if mount.env else {}
            return sandbox.Mount("bind", target, path, True), key, extra_env
        if mount.type == "ssh":
            ident = x(mount.id) or "default"
            socket = request.ssh.get(ident)
            key = {"type": "ssh", "id": ident, "target": target}
            if socket is None:
                if mount.required:
                    raise loc.error(f"ssh agent {ident!r} is required: pass --ssh {ident} (uses $SSH_AUTH_SOCK) "
                                    f"or --ssh {ident}=/path/to/agent.sock")
                return None, key, {}
            return sandbox.Mount("bind", target, Path(socket), False), key, {"SSH_AUTH_SOCK": target}
        raise loc.error(f"RUN --mount=type={mount.type} is not supported")

    def commit(self, state: StageState, upper: Path, created_by: str, key: str) -> StepResult:
        """The step's upper dir becomes a layer (none when the step changed nothing)."""
        diff_id = None if not any(upper.iterdir()) else \
            self.store.commit_layer_dir(upper, clamp_mtime=self.epoch).diff_id
        result = StepResult(key, diff_id, self.now(), created_by)
        self.apply_result(state, result)
        return result

    def source_digest(self, context: BuildContext, match, excludes: list[str] | None = None
                      ) -> tuple[list[str], dict[str, str]]:
        """Key lines of a context source (walked once) and its files' digests for --explain."""
        lines: list[str] = []
        files: dict[str, str] = {}
        base = str(match.abs_path)
        prefix = "" if match.path in (".", "") else match.path.rstrip("/") + "/"
        skip = PatternMatcher(excludes) if excludes else None
        digest = self.digests.digest
        for rel, st in context.walk(match):  # the hot loop of a warm rebuild: keep it lean
            if skip is not None and rel != "." and skip.matches_or_parent_matches(rel):
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                content = digest(base if rel == "." else f"{base}/{rel}", st)
            elif stat.S_ISLNK(mode):
                content = os.readlink(base if rel == "." else f"{base}/{rel}")
            else:
                content = ""
            lines.append(entry_line(rel, mode, st.st_size, content))
            if not stat.S_ISDIR(mode):
                name = match.path if rel == "." else prefix + rel
                files[name] = f"{stat.S_IMODE(mode):o}:{content}"
        return lines, files

    def prepare_copy(self, state: StageState, item: ins.Copy | ins.Add, graph: BuildGraph,
                     built: dict[int, StageState], context: BuildContext) -> Prepared:
        """Resolve and digest COPY/ADD sources (the key), and how to place them (the step)."""
        from builder import copying
        from builder.rootfs import in_rootfs

        loc = item.loc
        x = lambda w: state.scope.expand(w, graph.escape, loc)  # noqa: E731
        cfg = state.config.config
        dest_word = x(item.dest)
        dest = dest_word if dest_word.startswith("/") else os.path.join(cfg.working_dir or "/", dest_word)
        if dest_word.endswith("/") and not dest.endswith("/"):
            dest += "/"
        heredoc_names = {h.name: h for h in item.heredocs}
        extra_roots: dict[str, list[Path]] = {}
        sources: list = []
        keys: list[dict] = []
        files: dict[str, str] = {}
        from_ = getattr(item, "from_", None)
        excludes = [x(e) for e in item.excludes]
        wildcard = False
        downloads: list[Path] = []  # a temp dir only when an ADD downloads something
        source_id = None
        if from_:
            layers, source_id = self.source_root(x(from_), graph, built, loc)
            extra_roots["src"] = layers
            for word in item.sources:
                pattern = x(word)
                wildcard = wildcard or has_wildcards(pattern)
                sources.append(copying.Source("stage", os.path.basename(pattern.rstrip("/")), root="src",
                                              pattern=pattern))
                keys.append({"from": source_id, "pattern": pattern})
        else:
            for word in item.sources:
                marker = word.lstrip("0123456789")
                name = marker[2:].lstrip("-").strip("'\"") if marker.startswith("<<") else None
                if name is not None and name in heredoc_names:
                    doc = heredoc_names[name]
                    text = doc.text
                    if doc.expand and "$" in text:  # as BuildKit: variables expand, quotes stay
                        text = expand(text, state.scope.variables(), "\\", skip_quotes=True).value
                    sources.append(copying.Source("heredoc", name, content=text.encode()))
                    keys.append({"heredoc": name, "sha256": hashlib.sha256(text.encode()).hexdigest()})
                    continue
                value = x(word)
                if isinstance(item, ins.Add) and _is_url(value):
                    if not downloads:
                        downloads.append(self.store.temp_dir("add"))
                    fetched = self.fetch(value, item, downloads[0])
                    sources.append(fetched)
                    keys.append({"url": value, "sha256": file_sha256(fetched.host_path)})
                    continue
                if isinstance(item, ins.Add) and _is_git(value):
                    raise loc.error(f"ADD of a git repository ({value}) is not supported yet: "
                                    "clone it into the context and COPY it")
                if isinstance(item, ins.Add) and item.checksum:
                    raise loc.error("ADD --checksum can only check http(s) sources")
                wildcard = wildcard or has_wildcards(value)
                for match in context.resolve_sources([value], instruction=item.name):
                    archive = False
                    if isinstance(item, ins.Add) and item.unpack is not False and not match.is_dir:
                        from builder.tarstream import is_archive

                        archive = is_archive(match.abs_path)
                    lines, found = self.source_digest(context, match, excludes)
                    files.update(found)
                    keys.append({"path": match.path, "tree": tree_digest(lines), "archive": archive})
                    subdir = os.path.dirname(match.path.rstrip("/")) if item.parents else ""
                    if archive:
                        sources.append(copying.Source("archive", match.path, host_path=str(match.abs_path),
                                                      subdir=subdir))
                        continue
                    entries = tuple(line.split("\0", 1)[0] for line in lines) if match.is_dir else ()
                    sources.append(copying.Source("context", os.path.basename(match.path.rstrip("/")) or ".",
                                                  host_path=str(match.abs_path), is_dir=match.is_dir,
                                                  entries=entries, subdir=subdir))
        many = len(item.sources) > 1 or wildcard
        if many and not dest.endswith("/"):
            raise loc.error(f"when using {item.name} with more than one source file, the destination must be "
                            f"a directory and end with a /: write {item.dest}/")
        chown = x(item.chown) if item.chown else None
        chmod = int(item.chmod, 8) if item.chmod and item.chmod.isdigit() else None
        if item.chmod and chmod is None:
            raise loc.error(f"--chmod={item.chmod}: only octal modes are supported, e.g. --chmod=0755")

        def execute(upper: Path, work: Path) -> None:
            owner = self.chown(state, chown, loc) if chown else None
            plan = copying.CopyPlan(tuple(sources), dest, dest.endswith("/") or many or item.parents, owner, chmod)
            in_rootfs(state.lowers, (upper, work), lambda root, **kw: copying.apply_copy(root, plan, **kw),
                      extra_roots)

        inputs = {"dest": dest, "chown": chown, "chmod": chmod, "sources": keys, "excludes": excludes,
                  "parents": item.parents, "link": item.link}
        record = {"files": files, "source": source_id, "env": dict(e.partition("=")[::2] for e in cfg.env)}
        return Prepared(inputs, record, f"{item.name} {' '.join(item.sources)} {item.dest}", execute,
                        lambda: [shutil.rmtree(d, ignore_errors=True) for d in downloads])

    def source_root(self, ref: str, graph: BuildGraph, built: dict[int, StageState],
                    loc: ins.Location) -> tuple[list[Path], str]:
        """The layers (top-most first) and identity of a `--from` stage or image."""
        other = graph.find(ref)
        if other is not None:
            return list(reversed(built[other.index].layers)), built[other.index].key
        from builder import registry

        image = registry.find_local(self.store, ref)
        if image is None:
            try:
                self.progress.note(f"pulling {ref}")
                image = registry.pull(self.store, ref, progress=self.progress.note,
                                      insecure=self.insecure, ca_file=self.ca_cert)
            except PybuildError as exc:
                raise loc.error(f"--from={ref}: no stage of that name, and the image could not be pulled: "
                                f"{exc.message}") from None
        return list(reversed(self.store.layer_dirs(image))), image.id

    def chown(self, state: StageState, spec: str, loc: ins.Location) -> tuple[int, int]:
        """--chown NAME[:GROUP] resolved through the image's own /etc/passwd and /etc/group."""
        from builder.rootfs import in_rootfs, read_text_in_root
        from builder.users import resolve_user

        user, _, group = spec.partition(":")
        if user.isdigit() and (not group or group.isdigit()):
            return int(user), int(group) if group else int(user)

        def lookup(root: Path):
            return read_text_in_root(root, "/etc/passwd"), read_text_in_root(root, "/etc/group")

        passwd, groups = in_rootfs(state.lowers, None, lookup)
        try:
            found = resolve_user(spec, passwd, groups)
        except PybuildError as exc:
            raise loc.error(f"--chown={spec}: {exc.message}") from None
        return found.uid, found.gid

    def fetch(self, url: str, item: ins.Add, tmp: Path):
        """ADD <url>: download (checking --checksum), keep the file name, mode 0600 as docker."""
        import urllib.parse
        import urllib.request

        from builder import copying

        name = os.path.basename(urllib.parse.urlparse(url).path) or "index.html"
        target = tmp / f"download-{len(list(tmp.iterdir()))}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
                modified = response.headers.get("Last-Modified")
        except OSError as exc:
            raise item.loc.error(f"ADD {url}: download failed: {exc}") from None
        if item.checksum:
            import hashlib

            algo, _, expected = item.checksum.partition(":")
            digest = hashlib.new(algo, target.read_bytes()).hexdigest()
            if digest != expected:
                raise item.loc.error(f"ADD {url}: checksum mismatch: expected {item.checksum}, got {algo}:{digest}")
        mtime = None
        if modified:
            from email.utils import parsedate_to_datetime

            try:
                mtime = int(parsedate_to_datetime(modified).timestamp() * 1e9)
            except (TypeError, ValueError):
                mtime = None
        return copying.Source("file", name, host_path=str(target), mode=0o600, mtime=mtime)


def _options(inputs: dict) -> dict:
    """The inputs --explain does not itemise (files, args and env are compared one by one)."""
    out = {k: v for k, v in inputs.items() if k not in ("args", "env")}
    if "sources" in out:
        out["sources"] = [{k: v for k, v in src.items() if k != "tree"} for src in out["sources"]]
    return out


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _is_git(value: str) -> bool:
    return value.startswith("git@") or value.endswith(".git") or value.startswith("git://")


def _stage_title(stage: Stage) -> str:
    return stage.name or f"stage-{stage.index}"


def _describe(item: ins.AnyInstruction) -> str:
    text = " ".join(item.loc.source.split()) if item.loc.source else item.name
    return text if len(text) <= 100 else text[:97] + "..."
