"""Metadata instructions (ENV, LABEL, CMD, USER ...) applied to an image config.

Pure over the config and the variable scope: the build calls it for each step,
`pybuild import --change` for each change. Returns what the history records.
"""
from __future__ import annotations

import os
from typing import Protocol

from builder.image import Healthcheck, ImageConfig
from grammar import instructions as ins
from grammar.dag import Scope

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CmdOrigin(Protocol):
    inherited_cmd: bool  # CMD came from the base image: an ENTRYPOINT then resets it


def command_argv(config: ImageConfig, command: ins.Command) -> list[str]:
    """Exec form as written; shell form through the image's SHELL."""
    if command.exec_form:
        return list(command.args)
    if not command.args:
        return []
    return list(config.config.shell or DEFAULT_SHELL) + [command.args[0]]


def apply_instruction(config: ImageConfig, scope: Scope, item: ins.AnyInstruction, escape: str,
                      origin: CmdOrigin) -> str | None:
    """Change `config` (and `scope`) as `item` says; the history's created_by, None for ARG."""
    cfg = config.config
    loc = item.loc

    def x(word: str) -> str:
        return scope.expand(word, escape, loc)

    if isinstance(item, ins.Env):
        pairs = [(x(k), x(v)) for k, v in item.pairs]
        for key, value in pairs:
            scope.env[key] = value
            cfg.env = [e for e in cfg.env if e.partition("=")[0] != key] + [f"{key}={value}"]
        return "ENV " + " ".join(f"{k}={v}" for k, v in pairs)
    if isinstance(item, ins.Arg):
        for name, default in item.args:
            scope.declare_arg(name, default, escape, loc)
        return None  # as BuildKit: ARG leaves no history
    if isinstance(item, ins.Label):
        pairs = [(x(k), x(v)) for k, v in item.pairs]
        cfg.labels.update(pairs)
        return "LABEL " + " ".join(f"{k}={v}" for k, v in pairs)
    if isinstance(item, ins.Workdir):
        cfg.working_dir = os.path.normpath(os.path.join(cfg.working_dir or "/", x(item.path))).replace("//", "/")
        return f"WORKDIR {cfg.working_dir}"
    if isinstance(item, ins.User):
        cfg.user = x(item.user)
        return f"USER {cfg.user}"
    if isinstance(item, ins.Expose):
        for word in item.ports:
            for port in scope.expand_full(word, escape, loc).words:
                port = port if "/" in port else port + "/tcp"
                if port not in cfg.exposed_ports:
                    cfg.exposed_ports.append(port)
        return "EXPOSE " + " ".join(cfg.exposed_ports)
    if isinstance(item, ins.Volume):
        for path in item.paths:
            path = x(path)
            if not path:
                raise loc.error("VOLUME specified can not be an empty string")
            if path not in cfg.volumes:
                cfg.volumes.append(path)
        return "VOLUME " + str(list(cfg.volumes))
    if isinstance(item, ins.Stopsignal):
        cfg.stop_signal = x(item.signal)
        return f"STOPSIGNAL {cfg.stop_signal}"
    if isinstance(item, ins.Maintainer):
        config.author = item.maintainer
        return f"MAINTAINER {item.maintainer}"
    if isinstance(item, ins.Cmd):
        cfg.cmd = command_argv(config, item.command)
        origin.inherited_cmd = False
        return f"CMD {cfg.cmd}"
    if isinstance(item, ins.Entrypoint):
        cfg.entrypoint = command_argv(config, item.command)
        if origin.inherited_cmd:
            cfg.cmd = None  # docker: an ENTRYPOINT resets a CMD inherited from the base
        return f"ENTRYPOINT {cfg.entrypoint}"
    if isinstance(item, ins.Shell):
        cfg.shell = list(item.argv)
        return f"SHELL {cfg.shell}"
    if isinstance(item, ins.Healthcheck):
        if item.test == ("NONE",):
            cfg.healthcheck = Healthcheck(test=["NONE"])
        else:
            cfg.healthcheck = Healthcheck(list(item.test), item.interval, item.timeout, item.start_period,
                                          item.start_interval, item.retries)
        return f"HEALTHCHECK {' '.join(item.test)}"
    if isinstance(item, ins.Onbuild):
        cfg.on_build.append(item.expression)
        return f"ONBUILD {item.expression}"
    raise loc.error(f"{item.name} changes files, not the config: it cannot be applied here")
