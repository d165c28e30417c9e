"""`--change 'CMD ...'` for import: Dockerfile metadata instructions applied to a config."""
from __future__ import annotations

from typing import Callable

from builder.image import ImageConfig
from grammar import instructions as ins
from grammar.errors import PybuildError
from grammar.parser import parse

ALLOWED = (ins.Cmd, ins.Entrypoint, ins.Env, ins.Expose, ins.Label, ins.User, ins.Volume, ins.Workdir,
           ins.Stopsignal, ins.Healthcheck, ins.Shell, ins.Onbuild)


def config_tweak(changes: tuple[str, ...] | list[str]) -> Callable[[ImageConfig], ImageConfig] | None:
    """Parse every change up front (errors before any work), apply them later in order."""
    if not changes:
        return None
    items = []
    for number, change in enumerate(changes, start=1):
        try:
            nodes = parse("FROM scratch\n" + change + "\n", f"--change #{number}").nodes[1:]
            converted = [ins.convert_node(n, ins.Location(f"--change #{number}", 1, 1, change)) for n in nodes]
        except PybuildError as exc:
            raise PybuildError(f"--change {change!r}: {exc.message}") from None
        for item in converted:
            if not isinstance(item, ALLOWED):
                raise PybuildError(f"--change {change!r}: {item.name} cannot be applied by import; use one of "
                                   "CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR, STOPSIGNAL, "
                                   "HEALTHCHECK, SHELL, ONBUILD")
        items.extend(converted)

    def apply(config: ImageConfig) -> ImageConfig:
        from dataclasses import dataclass

        from builder.image import HistoryEntry, format_time
        from builder.metadata import apply_instruction
        from grammar.dag import Scope

        @dataclass
        class Origin:
            inherited_cmd: bool = True

        config = config.copy()
        scope = Scope({}, {})
        scope.env.update(dict(e.partition("=")[::2] for e in config.config.env))
        origin = Origin()
        for item in items:
            created_by = apply_instruction(config, scope, item, "\\", origin)
            if created_by is not None:
                config.history.append(HistoryEntry(created=format_time(), created_by=created_by,
                                                   comment="pybuild import --change", empty_layer=True))
        return config

    return apply
