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
        except OSError as exc:  # disk full, permissions, a path that is not there: the user's to fix
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"pybuild: error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(EXIT_USER_ERROR)


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


# -- the engine's commands ----------------------------------------------------------------

def open_store(root: str | None):
    """The store at --root, $PYBUILD_ROOT or the default location."""
    import os

    from builder.store import Store, default_root

    path = Path(root or os.environ.get("PYBUILD_ROOT") or default_root())
    store = Store.open(path)
    store.keep.append(lambda: cache_layers(store))  # rmi/gc must not delete what the cache points to
    return store


def cache_layers(store) -> set[str]:
    from cache.index import CacheIndex

    index = CacheIndex(store.root / "cache.db")
    try:
        return {step.diff_id for step in index.steps() if step.diff_id}
    finally:
        index.close()


root_option = click.option("--root", envvar="PYBUILD_ROOT", default=None, metavar="DIR",
                           help="Store location (default /var/lib/pybuild for root).")


def registry_options(fn):
    """--insecure-registry and --ca-cert, shared by every command that talks to registries."""
    fn = click.option("--ca-cert", default=None, type=click.Path(dir_okay=False, exists=True),
                      help="Trust this CA certificate for TLS registries.")(fn)
    return click.option("--insecure-registry", multiple=True, metavar="HOST",
                        help="Use plain HTTP for this registry (localhost and 127.0.0.1 always do).")(fn)


def parse_key_values(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not key or not eq:
            raise PybuildError(f"invalid {flag} {item!r}: use KEY=value")
        out[key] = value
    return out


@main.command()
@click.argument("context", default=".")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]", help="Name the image (repeatable).")
@click.option("-f", "--file", "dockerfile", default=None, metavar="FILE",
              help="The Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V", help="A build arg value (repeatable).")
@click.option("--target", default=None, help="Build up to this stage.")
@click.option("--no-cache", is_flag=True, help="Do not reuse earlier results.")
@click.option("--no-cache-filter", "no_cache_filter", multiple=True, metavar="STAGE",
              help="Do not reuse results for this stage (repeatable).")
@click.option("--explain", is_flag=True, help="Say why each step missed the cache.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Add a label to the image (repeatable).")
@click.option("--iidfile", default=None, type=click.Path(dir_okay=False), help="Write the image id here.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "plain", "tty", "quiet"]), default="auto",
              help="How to show progress (on stderr).")
@click.option("--network", type=click.Choice(["host", "none", "default"]), default="host",
              help="Network for RUN steps (default host).")
@click.option("-o", "--output", "outputs", multiple=True, metavar="type=TYPE,dest=PATH",
              help="Also write the image: type=oci|docker|tar|local, dest=PATH (- for stdout); "
                   "type=image,push=true pushes.")
@click.option("--push", "push_after", is_flag=True, help="Push every -t name after the build.")
@click.option("--secret", "secrets", multiple=True, metavar="id=ID[,src=FILE|,env=VAR]",
              help="A secret for RUN --mount=type=secret (never stored in the image or cache).")
@click.option("--ssh", "ssh", multiple=True, metavar="ID[=SOCKET]",
              help="An ssh agent for RUN --mount=type=ssh (default: $SSH_AUTH_SOCK).")
@click.option("--pull", is_flag=True, help="Check the registry for newer base images.")
@click.option("--platform", default=None, metavar="OS/ARCH", help="Platform of base images to pull.")
@click.option("--compression", type=click.Choice(["gzip", "zstd"]), default="gzip",
              help="Layer compression for --push.")
@registry_options
@root_option
def build(context: str, tags, dockerfile, build_args, target, no_cache, no_cache_filter, explain, labels,
          iidfile, quiet, progress_mode, network, outputs, push_after, secrets, ssh, pull, platform, compression,
          insecure_registry, ca_cert, root) -> None:
    """Build an image from a Dockerfile and a context directory (`-` reads a tar from stdin)."""
    import shutil

    from builder.build import Builder, BuildRequest
    from builder.image import parse_reference
    from builder.progress import Progress
    from cache.index import CacheIndex

    from builder.outputs import parse_output, write_output

    for tag in tags:
        parse_reference(tag)  # reject bad names before doing any work
    wanted = [parse_output(o) for o in outputs]
    store = open_store(root)
    cleanup = None
    try:
        if context == "-":
            from builder.context import BuildContext

            cleanup = store.temp_dir("stdin")
            ctx = BuildContext.from_tar(sys.stdin.buffer, cleanup)
            context_dir = Path(ctx.root)
        else:
            context_dir = Path(context)
            if not context_dir.is_dir():
                raise PybuildError(f"context {context!r} is not a directory (give a directory, or - for a tar on stdin)")
        dockerfile_path = Path(dockerfile) if dockerfile else context_dir / "Dockerfile"
        args = parse_build_args(build_args)
        request = BuildRequest(context=context_dir, dockerfile=dockerfile_path, tags=tags,
                               build_args=args, target=target,
                               source_date_epoch=source_date_epoch(args), pull=pull, platform=platform,
                               insecure_registries=tuple(insecure_registry), ca_cert=ca_cert,
                               secrets=parse_secrets(secrets), ssh=parse_ssh(ssh),
                               labels=parse_key_values(labels, "--label"), no_cache=no_cache,
                               no_cache_filter=tuple(no_cache_filter),
                               network="host" if network == "default" else network)
        progress = Progress("quiet" if quiet else progress_mode)
        index = CacheIndex(store.root / "cache.db")
        try:
            image = Builder(store, progress, index, explain_misses=explain).build(request)
        finally:
            index.close()
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    image = store.get_image(image.id)  # now with the names it was tagged with
    for output in wanted:
        write_output(store, image, output)
    pushes = list(tags) if push_after else []
    pushes += [o.name or t for o in wanted if o.type == "image" and o.push for t in (tags or [image.id])]
    if pushes:
        from builder import registry

        for name in dict.fromkeys(pushes):
            digest = registry.push(store, image, name, compression=compression, insecure=insecure_registry,
                                   ca_file=ca_cert, progress=None if quiet else lambda m: click.echo(m, err=True))
            if not quiet:
                click.echo(f"pushed {name}@{digest}", err=True)
    if iidfile:
        Path(iidfile).write_text(image.id)
    if any(o.dest == "-" for o in wanted):
        pass  # stdout carries the archive
    elif quiet:
        click.echo(image.id)
    else:
        click.echo(f"writing image {image.id}", err=True)
        for name in image_names(store, image):
            click.echo(f"naming to {name}", err=True)


def parse_secrets(values: tuple[str, ...]) -> dict[str, bytes]:
    """`id=x,src=FILE` / `id=x,env=VAR` / `id=x` (the variable x, else the file x), as buildx reads them."""
    import os

    secrets: dict[str, bytes] = {}
    for item in values:
        fields = dict(part.partition("=")[::2] for part in item.split(","))
        ident = fields.get("id", "")
        if not ident:
            raise PybuildError(f"--secret {item!r}: give id=NAME and src=FILE or env=VARIABLE")
        source = fields.get("src") or fields.get("source")
        env = fields.get("env")
        if source is None and env is None:
            env, source = ident, ident if ident not in os.environ else None
        if env is not None and env in os.environ:
            secrets[ident] = os.environ[env].encode()
        elif source is not None:
            try:
                secrets[ident] = Path(source).expanduser().read_bytes()
            except OSError as exc:
                raise PybuildError(f"--secret {item!r}: cannot read {source}: {exc.strerror}") from None
        else:
            raise PybuildError(f"--secret {item!r}: the environment variable {env} is not set")
    return secrets


def parse_ssh(values: tuple[str, ...]) -> dict[str, str]:
    import os

    agents: dict[str, str] = {}
    for item in values:
        ident, _, socket = item.partition("=")
        socket = socket or os.environ.get("SSH_AUTH_SOCK", "")
        if not socket or not Path(socket).exists():
            raise PybuildError(f"--ssh {item!r}: no agent socket (start ssh-agent or give ID=/path/to/socket)")
        agents[ident or "default"] = socket
    return agents


def source_date_epoch(build_args: dict[str, str]) -> int | None:
    """SOURCE_DATE_EPOCH from --build-arg or the environment (as BuildKit reads it)."""
    import os

    value = build_args.get("SOURCE_DATE_EPOCH", os.environ.get("SOURCE_DATE_EPOCH", ""))
    if not value:
        return None
    if not value.isdigit():
        raise PybuildError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970")
    return int(value)


def image_names(store, image) -> list[str]:
    return list(store.get_image(image.id).names)


@main.command("import")
@click.argument("tarball")
@click.argument("name", required=False)
@click.option("-c", "--change", "changes", multiple=True, metavar="INSTRUCTION",
              help="A Dockerfile instruction to apply (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR).")
@click.option("-m", "--message", default="", help="History comment.")
@root_option
def import_(tarball: str, name: str | None, changes, message: str, root) -> None:
    """Create an image from a root file system tarball (`-` for stdin), like `docker import`."""
    from builder.archive import import_rootfs
    from builder.changes import config_tweak

    from builder.image import format_time

    store = open_store(root)
    tweak = config_tweak(changes)
    epoch = source_date_epoch({})
    created = format_time(epoch) if epoch is not None else None
    if tarball == "-":
        image = import_rootfs(store, sys.stdin.buffer, name, source="-", message=message, tweak=tweak,
                              created=created)
    else:
        try:
            with open(tarball, "rb") as stream:
                image = import_rootfs(store, stream, name, source=tarball, message=message, tweak=tweak,
                                      created=created)
        except FileNotFoundError:
            raise PybuildError(f"{tarball}: no such file") from None
    click.echo(image.id)


@main.command()
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@root_option
def images(quiet: bool, fmt: str, root) -> None:
    """List the images in the store."""
    store = open_store(root)
    rows = []
    for image in store.images():
        size = sum(store.blob_size(d) for d in image.config.diff_ids if store.has_blob(d))
        for name in image.names or ("<none>:<none>",):
            repo, _, tag = name.rpartition(":") if "@" not in name else (name, "", "")
            rows.append({"repository": repo, "tag": tag, "id": image.id, "created": image.config.created,
                         "size": size})
    if quiet:
        for iid in dict.fromkeys(r["id"] for r in rows):
            click.echo(iid.split(":")[-1][:12])
    elif fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{'REPOSITORY':40} {'TAG':15} {'IMAGE ID':14} {'CREATED':22} SIZE")
        for r in rows:
            click.echo(f"{r['repository']:40} {r['tag']:15} {r['id'].split(':')[-1][:12]:14} "
                       f"{r['created'][:19]:22} {human_size(r['size'])}")


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.3g}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{size}"


@main.command()
@click.argument("refs", nargs=-1, required=True)
@root_option
def inspect(refs, root) -> None:
    """Show images as JSON (id, names, config, manifest)."""
    from builder.image import config_to_dict

    store = open_store(root)
    out = []
    for ref in refs:
        image = store.get_image(ref)
        out.append({"Id": image.id, "RepoTags": list(image.names), "ManifestDigest": image.manifest_digest,
                    **config_to_dict(image.config)})
    click.echo(json.dumps(out, indent=2))


@main.command()
@click.argument("ref")
@click.option("--no-trunc", is_flag=True)
@root_option
def history(ref, no_trunc, root) -> None:
    """Show how an image was built, newest step first."""
    store = open_store(root)
    image = store.get_image(ref)
    diff_ids = list(image.config.diff_ids)
    rows = []
    for entry in image.config.history:
        size = 0
        if not entry.empty_layer and diff_ids:
            digest = diff_ids.pop(0)
            size = store.blob_size(digest) if store.has_blob(digest) else 0
        rows.append((entry.created[:19], entry.created_by or entry.comment, size))
    click.echo(f"{'CREATED':20} {'SIZE':>8}  CREATED BY")
    for created, by, size in reversed(rows):
        shown = by if no_trunc or len(by) <= 70 else by[:67] + "..."
        click.echo(f"{created:20} {human_size(size):>8}  {shown}")


@main.command()
@click.argument("ref")
@click.option("--platform", default=None, metavar="OS/ARCH", help="Which image of a multi-platform index.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@registry_options
@root_option
def pull(ref, platform, quiet, insecure_registry, ca_cert, root) -> None:
    """Download an image from a registry into the store."""
    from builder import registry

    store = open_store(root)
    image = registry.pull(store, ref, platform=platform, insecure=insecure_registry, ca_file=ca_cert,
                          progress=None if quiet else lambda m: click.echo(m, err=True))
    click.echo(image.id)


@main.command()
@click.argument("ref")
@click.argument("dest", required=False)
@click.option("--compression", type=click.Choice(["gzip", "zstd"]), default="gzip", help="Layer compression.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@registry_options
@root_option
def push(ref, dest, compression, quiet, insecure_registry, ca_cert, root) -> None:
    """Upload an image to a registry (DEST defaults to the image's name)."""
    from builder import registry

    store = open_store(root)
    digest = registry.push(store, ref, dest, compression=compression, insecure=insecure_registry, ca_file=ca_cert,
                           progress=None if quiet else lambda m: click.echo(m, err=True))
    click.echo(digest)


@main.command()
@click.argument("server", default="docker.io")
@click.option("-u", "--username", required=True)
@click.option("-p", "--password", default=None, help="Prefer --password-stdin: arguments show in ps.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@registry_options
def login(server, username, password, password_stdin, insecure_registry, ca_cert) -> None:
    """Check credentials against a registry and save them in ~/.docker/config.json."""
    from builder import auth, registry

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise PybuildError("no password: give --password-stdin (recommended) or -p")
    host = auth.registry_host(server)
    registry.check_login(host, auth.Credentials(username, password), insecure=insecure_registry, ca_file=ca_cert)
    path = auth.login(host, username, password)
    click.echo(f"Login Succeeded (credentials saved in {path})")


@main.command()
@click.argument("server", default="docker.io")
def logout(server) -> None:
    """Remove saved credentials for a registry."""
    from builder import auth

    host = auth.registry_host(server)
    if auth.logout(host):
        click.echo(f"Removing login credentials for {host}")
    else:
        click.echo(f"Not logged in to {host}")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@root_option
def du(fmt, root) -> None:
    """Show what the store and the build cache hold, and what prune could reclaim."""
    from builder.prune import usage
    from cache.index import CacheIndex

    store = open_store(root)
    index = CacheIndex(store.root / "cache.db")
    try:
        info = usage(store, index)
    finally:
        index.close()
    if fmt == "json":
        click.echo(json.dumps(info.__dict__, indent=2))
        return
    rows = [("images", f"{info.images}", info.image_bytes), ("build cache", f"{info.cache_entries} entries",
            info.cache_only_bytes), ("unreferenced layers", "", info.unreferenced_bytes),
            ("cache mounts", "", info.cache_mount_bytes)]
    click.echo(f"{'TYPE':22} {'COUNT':14} SIZE")
    for name, count, size in rows:
        click.echo(f"{name:22} {count:14} {human_size(size)}")
    click.echo(f"{'total':22} {'':14} {human_size(info.total_bytes)}")
    click.echo(f"reclaimable by prune: {human_size(info.cache_only_bytes + info.unreferenced_bytes)}"
               " (prune --all also empties cache mounts)")


@main.command()
@click.option("-a", "--all", "everything", is_flag=True, help="Drop the whole build cache and cache mounts.")
@click.option("--keep-storage", default=None, metavar="SIZE", help="Keep at most SIZE of cache (e.g. 2GB).")
@click.option("--filter", "filters", multiple=True, metavar="until=DURATION",
              help="Drop cache entries not used for DURATION (e.g. until=24h).")
@root_option
def prune(everything, keep_storage, filters, root) -> None:
    """Remove build cache and layers nothing uses; tagged images are never touched."""
    from builder.prune import parse_age, parse_size, prune as run_prune
    from cache.index import CacheIndex

    unused_for = None
    for item in filters:
        key, eq, value = item.partition("=")
        if key != "until" or not eq:
            raise PybuildError(f"unsupported --filter {item!r}: use until=DURATION, e.g. until=24h")
        unused_for = parse_age(value)
    if not (everything or keep_storage or unused_for is not None):
        everything = False
        unused_for = 0.0  # plain `prune`: every cache entry, but never an image's layers
    store = open_store(root)
    index = CacheIndex(store.root / "cache.db")
    try:
        report = run_prune(store, index, everything=everything,
                           keep_storage=parse_size(keep_storage) if keep_storage else None, unused_for=unused_for)
    finally:
        index.close()
    click.echo(f"removed {report.cache_entries} cache entries, {report.images} untagged images and "
               f"{len(report.deleted)} blobs/layers, "
               f"freed {human_size(report.freed_bytes)}")
    if report.skipped_busy:
        click.echo("some layers were kept: another pybuild process has the store open; run prune again later",
                   err=True)


@main.command()
@click.argument("source")
@click.argument("target")
@root_option
def tag(source, target, root) -> None:
    """Give an image another name."""
    store = open_store(root)
    store.tag(store.get_image(source), target)


@main.command()
@click.argument("refs", nargs=-1, required=True)
@root_option
def rmi(refs, root) -> None:
    """Remove image names; delete the image when no name is left."""
    store = open_store(root)
    for ref in refs:
        removal = store.remove_image(ref)
        for name in removal.untagged:
            click.echo(f"Untagged: {name}")
        for digest in removal.deleted:
            click.echo(f"Deleted: {digest}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Remove the container's changes when it exits.")
@click.option("-e", "--env", "envs", multiple=True, metavar="K=V")
@click.option("-u", "--user", default=None)
@click.option("-w", "--workdir", default=None)
@click.option("--network", type=click.Choice(["host", "none"]), default="host")
@click.option("--entrypoint", default=None)
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@root_option
def run(rm, envs, user, workdir, network, entrypoint, ref, command, root) -> None:
    """Run a command in a container made from an image (same sandbox as RUN)."""
    from builder.runner import run_container

    store = open_store(root)
    code = run_container(store, ref, list(command), rm=rm, env=parse_key_values(envs, "--env"), user=user,
                         workdir=workdir, network=network, entrypoint=entrypoint)
    sys.exit(code)


@main.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The archive to write.")
@click.option("--format", "fmt", type=click.Choice(["docker", "oci"]), default="docker",
              help="docker-archive (docker load) or OCI image layout.")
@root_option
def save(refs, output, fmt, root) -> None:
    """Write images to a tar archive (docker load reads the default format)."""
    from builder.archive import save_docker_archive, save_oci_archive

    store = open_store(root)
    writer = save_docker_archive if fmt == "docker" else save_oci_archive
    tmp = Path(output + ".tmp")
    with open(tmp, "wb") as out:
        writer(store, list(refs), out)
    tmp.replace(output)


@main.command()
@click.option("-i", "--input", "source", default="-", help="The archive (default stdin).")
@root_option
def load(source, root) -> None:
    """Load images from a docker-archive or OCI archive."""
    from builder.archive import load_archive

    store = open_store(root)
    if source == "-":
        names = load_archive(store, sys.stdin.buffer)
    else:
        try:
            with open(source, "rb") as stream:
                names = load_archive(store, stream)
        except FileNotFoundError:
            raise PybuildError(f"{source}: no such file") from None
    for name in names:
        click.echo(f"Loaded image: {name}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
