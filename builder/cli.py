"""The `pybuild` command line (click): flags -> requests; user errors -> one line, exit 1."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from grammar.errors import PybuildError

EXIT_USER_ERROR = 1


class PybuildGroup(click.Group):
    """Turns a PybuildError anywhere below into `pybuild: error: ...` and exit 1 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PybuildError as exc:
            click.echo(f"pybuild: error: {exc.render()}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("pybuild: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=PybuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pybuild", prog_name="pybuild")
def main() -> None:
    """pybuild: build OCI images from Dockerfiles, in namespace sandboxes, with a layer cache."""


def parse_build_args(values: tuple[str, ...]) -> dict[str, str]:
    """`K=V` pairs; a bare `K` takes the value from the environment, as docker build does."""
    import os

    args: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not key:
            raise PybuildError(f"invalid --build-arg {item!r}: use NAME=value")
        if eq:
            args[key] = value
        elif key in os.environ:
            args[key] = os.environ[key]
    return args


@main.group()
def debug() -> None:
    """Tools for looking inside the front end."""


@debug.command("dump-ast")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def dump_ast(file: Path) -> None:
    """Print the raw parse of FILE, one S-expression per instruction."""
    from grammar.parser import dump, parse_file

    click.echo(dump(parse_file(file)), nl=False)


@main.command()
@click.option("-f", "--file", "dockerfile", default="Dockerfile", type=click.Path(path_type=Path),
              help="The Dockerfile (default: ./Dockerfile).")
@click.option("--target", default=None, help="Outline only what this stage needs.")
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V", help="A build arg value (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def outline(dockerfile: Path, target: str | None, build_args: tuple[str, ...], as_json: bool) -> None:
    """Show the stages, their dependencies and the build args each declares."""
    from grammar.dag import build_graph, describe
    from grammar.parser import parse_file

    graph = build_graph(parse_file(dockerfile), parse_build_args(build_args), filename=str(dockerfile))
    info = describe(graph, target)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if info["args"]:
        click.echo("global args:")
        for arg in info["args"]:
            default = "" if arg["default"] is None else f" = {arg['default']}"
            click.echo(f"  {arg['name']}{default}  (line {arg['line']})")
    for stage in info["stages"]:
        mark = "" if stage["needed"] else "  [not needed for target]"
        title = f"stage {stage['index']}" + (f" {stage['name']}" if stage["name"] else "")
        click.echo(f"{title}: FROM {stage['base']} ({stage['base_kind']}, line {stage['line']}){mark}")
        if stage["depends_on"]:
            click.echo(f"  depends on: {', '.join(stage['depends_on'])}")
        if stage["images"]:
            click.echo(f"  copies from images: {', '.join(stage['images'])}")
        if stage["global_args"]:
            click.echo(f"  FROM uses: {', '.join(stage['global_args'])}")
        for arg in stage["args"]:
            default = "" if arg["default"] is None else f" = {arg['default']}"
            click.echo(f"  arg {arg['name']}{default}  (line {arg['line']})")
    click.echo(f"target: {info['target']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
