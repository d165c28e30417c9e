"""`pybuild run`: a container from an image, in the same sandbox RUN uses."""
from __future__ import annotations

import os
import shutil

from builder import sandbox
from builder.build import DEFAULT_PATH
from builder.store import Store
from grammar.errors import PybuildError


def container_argv(entrypoint: list[str] | None, cmd: list[str] | None, command: list[str]) -> list[str]:
    """Docker's rule: ENTRYPOINT + (the command given, else CMD)."""
    return list(entrypoint or []) + (command or list(cmd or []))


def _stdin() -> int | None:
    """Our stdin for the container when there is one (CI may start us with fd 0 closed)."""
    try:
        os.fstat(0)
        return 0
    except OSError:
        return None


def run_container(store: Store, ref: str, command: list[str], *, rm: bool = True, env: dict[str, str] | None = None,
                  user: str | None = None, workdir: str | None = None, network: str = "host",
                  entrypoint: str | None = None) -> int:
    image = store.get_image(ref)
    cfg = image.config.config
    entry = [entrypoint] if entrypoint else ([] if entrypoint == "" else cfg.entrypoint)
    argv = container_argv(entry, cfg.cmd, command)
    if not argv:
        raise PybuildError(f"{ref}: no command given and the image has no CMD or ENTRYPOINT")
    variables = dict(e.partition("=")[::2] for e in cfg.env)
    variables.setdefault("PATH", DEFAULT_PATH)
    variables.update(env or {})
    upper, work = store.make_work_dir()
    try:
        spec = sandbox.SandboxSpec(lower_dirs=list(reversed(store.layer_dirs(image))), upper_dir=upper,
                                   work_dir=work, argv=argv, env=variables, cwd=workdir or cfg.working_dir or "/",
                                   user=user if user is not None else cfg.user, network=network,
                                   hostname=image.id.split(":")[-1][:12], stdin=_stdin())
        return sandbox.run(spec)
    finally:
        if rm:
            shutil.rmtree(upper.parent, ignore_errors=True)
