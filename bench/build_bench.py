"""Whole-process build benchmark: pybuild vs docker build (BuildKit / legacy) vs buildah.

Every tool builds the same small Dockerfiles from the same busybox base, each with
its own store, with its cache disabled, and every build is timed as a whole command
(wall clock, time.perf_counter around subprocess.run).  Prints a Markdown table of
the median (min-max) over --runs runs per scenario and tool.

Scenarios (see bench/README.md):
  from-only    FROM base                                      (baseline for the per-step cost)
  run-true     FROM base + RUN true
  run-20       FROM base + 20 x RUN echo $i > /f$i
  write-200mb  FROM base + RUN dd if=/dev/zero of=/big bs=1M count=200   (--random: /dev/urandom)

Usage: python bench/build_bench.py [--runs N] [--quick] [--tools pybuild,docker,docker-legacy,buildah]
Needs root (namespaces, overlay mounts); tools that are missing or broken are skipped with a reason.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "pybuild-bench-busybox"          # the base image's name in every store
TAG_PREFIX = "pybuild-bench"
BIG_MB = 200
ALL_TOOLS = ("pybuild", "docker", "docker-legacy", "buildah")
LOAD_START = 0.0


class Skip(Exception):
    """A tool that is not installed or not working here: skipped, with this reason."""


# -- scenarios -----------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    title: str
    dockerfile: str
    check_cmd: str | None = None      # run in the built image afterwards (untimed) ...
    check_out: str | None = None      # ... and its stdout must be this


def scenarios(random_data: bool) -> list[Scenario]:
    if random_data:
        big_run = f"RUN head -c {BIG_MB * 1024 * 1024} /dev/urandom > /big"
        big_title = f"RUN writing {BIG_MB} MB (/dev/urandom)"
    else:
        big_run = f"RUN dd if=/dev/zero of=/big bs=1M count={BIG_MB}"
        big_title = f"RUN writing {BIG_MB} MB (dd /dev/zero)"
    twenty = "".join(f"RUN echo {i} > /f{i}\n" for i in range(1, 21))
    return [
        Scenario("from-only", "FROM only (baseline)", f"FROM {BASE}\n"),
        Scenario("run-true", "FROM + `RUN true`", f"FROM {BASE}\nRUN true\n"),
        Scenario("run-20", "20 x `RUN echo $i > /f$i`", f"FROM {BASE}\n{twenty}",
                 check_cmd="cat /f1 /f20", check_out="1\n20\n"),
        Scenario("write-200mb", big_title, f"FROM {BASE}\n{big_run}\n",
                 check_cmd="wc -c < /big", check_out=f"{BIG_MB * 1024 * 1024}\n"),
    ]


# -- running commands ----------------------------------------------------------------------

def run(argv: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 600,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` exited {out.returncode}:\n{tail(out)}")
    return out


def tail(out: subprocess.CompletedProcess, lines: int = 15) -> str:
    text = (out.stdout or b"").decode(errors="replace") + (out.stderr or b"").decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# -- tools ---------------------------------------------------------------------------------

class Tool:
    """One build engine with its own store.  `setup` makes the base image (untimed)."""

    name = ""
    label = ""
    cached = False  # bench/cache_bench.py turns the build cache on

    def cache_flags(self) -> list[str]:
        return [] if self.cached else ["--no-cache"]

    def __init__(self, work: Path) -> None:
        self.work = work
        self.notes: list[str] = []
        self.last_argv: list[str] = []

    def setup(self, busybox_tar: Path, archive: Path | None) -> None: ...
    def version(self) -> str: return ""
    def build_cmd(self, ctx: Path, tag: str, iidfile: Path) -> tuple[list[str], dict[str, str]]: ...
    def run_in(self, image: str, shell_cmd: str) -> str: ...
    def remove(self, tag: str, image_id: str) -> None: ...
    def cleanup(self) -> None: ...


class Pybuild(Tool):
    name = "pybuild"
    label = "pybuild"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.store = work / "pybuild-store"
        # The working tree's code, run by this interpreter (no console-script or pyenv shim in between).
        self.cli = [sys.executable, "-m", "builder.cli"]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.env.pop("PYBUILD_ROOT", None)

    def pb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.cli, *args], env=self.env, check=check)

    def version(self) -> str:
        return first_line(self.pb("--version").stdout.decode())

    def setup(self, busybox_tar: Path, archive: Path | None) -> None:
        if os.geteuid() != 0:
            raise Skip("needs root (namespaces, overlay mounts)")
        try:
            self.version()
            self.pb("import", "--root", str(self.store), str(busybox_tar), f"{BASE}:latest")
        except RuntimeError as exc:
            raise Skip(f"pybuild import failed: {exc}") from None

    def save_archive(self, dest: Path) -> None:
        self.pb("save", "--root", str(self.store), "-o", str(dest), f"{BASE}:latest")

    def build_cmd(self, ctx, tag, iidfile):
        return ([*self.cli, "build", "--root", str(self.store), *self.cache_flags(), "--network", "host",
                 "--progress", "plain", "-t", tag, "--iidfile", str(iidfile), str(ctx)], self.env)

    def run_in(self, image, shell_cmd):
        return self.pb("run", "--root", str(self.store), "--rm", "--network", "none", image,
                       "sh", "-c", shell_cmd).stdout.decode()

    def remove(self, tag, image_id):
        # by name: a FROM-only build's id is the base image's own id
        self.pb("rmi", "--root", str(self.store), tag, check=False)

    def cleanup(self):
        pass  # the store is inside the work dir, removed with it


def docker_clients() -> list[str]:
    """Every `docker` executable on PATH (a distro client may sit behind a newer one), deduplicated."""
    seen, found = set(), []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d or ".") / "docker"
        if p.is_file() and os.access(p, os.X_OK):
            real = p.resolve()
            if real not in seen:
                seen.add(real)
                found.append(str(p))
    return found


class DockerBase(Tool):
    """Shared by both docker builders: one daemon, so one base image and one cleanup list."""

    buildkit = False
    shared: dict = {}  # state shared by the docker tools: base loaded?, ids to remove, build-cache count

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.client = "docker"
        self.env = dict(os.environ)

    def version(self) -> str:
        out = run([self.client, "version", "--format", "client {{.Client.Version}}, daemon {{.Server.Version}}"],
                  check=False)
        return first_line(out.stdout.decode()) or "?"

    def ensure_daemon_and_base(self, busybox_tar: Path, archive: Path | None) -> None:
        st = DockerBase.shared
        if st.get("ready"):
            return
        if st.get("error"):
            raise Skip(st["error"])
        clients = docker_clients()
        if not clients:
            st["error"] = "no docker client on PATH"
            raise Skip(st["error"])
        info = run([clients[0], "info", "--format", "{{.ServerVersion}}"], check=False)
        if info.returncode != 0:
            st["error"] = (f"docker daemon not reachable ({first_line(tail(info, 3))}); "
                           "start it with `dockerd --bridge=none --iptables=false &`")
            raise Skip(st["error"])
        st["cache_before"] = docker_build_cache_count(clients[0])
        st["ids"] = set()
        if run([clients[0], "image", "inspect", f"{BASE}:latest"], check=False).returncode == 0:
            st["base_existed"] = True
        elif archive is not None and run([clients[0], "load", "-i", str(archive)], check=False).returncode == 0:
            st["base_how"] = f"docker load -i <pybuild save archive of {BASE}>"
        else:
            run([clients[0], "import", str(busybox_tar), f"{BASE}:latest"])
            st["base_how"] = f"docker import busybox.tar {BASE}:latest"
        st["base_id"] = run([clients[0], "image", "inspect", "--format", "{{.Id}}", f"{BASE}:latest"]
                            ).stdout.decode().strip()
        st["ready"] = True

    def build_cmd(self, ctx, tag, iidfile):
        argv = [self.client, "build", *self.cache_flags(), "--network", "host", "-t", tag, "--iidfile", str(iidfile)]
        if self.buildkit:
            argv += ["--progress", "plain"]
        else:
            argv += ["--force-rm"]
        return [*argv, str(ctx)], self.env

    def run_in(self, image, shell_cmd):
        return run([self.client, "run", "--rm", "--network", "none", image, "sh", "-c", shell_cmd],
                   env=self.env).stdout.decode()

    def remove(self, tag, image_id):
        # by name, not -f by id: a FROM-only build's id is the base image's own id
        DockerBase.shared["ids"].add(image_id)
        run([self.client, "rmi", tag], check=False)

    def cleanup(self):
        st = DockerBase.shared
        if not st.get("ready") or st.get("cleaned"):
            return
        st["cleaned"] = True
        client = docker_clients()[0]
        for image in st["ids"] - {st.get("base_id")}:
            run([client, "rmi", "-f", image], check=False)
        if not st.get("base_existed"):
            run([client, "rmi", "-f", f"{BASE}:latest"], check=False)
        # BuildKit keeps build-cache records even with --no-cache.  Prune them only when the
        # daemon had none before we started (so they are all ours); otherwise say so.
        after = docker_build_cache_count(client)
        if after:
            if st.get("cache_before") == 0:
                env = {k: v for k, v in os.environ.items() if k != "DOCKER_BUILDKIT"}
                for c in docker_clients():  # a newer client without buildx refuses `builder prune`
                    if run([c, "builder", "prune", "-af"], env=env, check=False).returncode == 0:
                        break
            else:
                print(f"note: docker build cache had {st.get('cache_before')} entries before the benchmark and "
                      f"{after} after; left as is (run `docker builder prune` to reclaim)", file=sys.stderr)


def docker_build_cache_count(client: str) -> int | None:
    out = run([client, "system", "df", "--format", "{{.Type}}\t{{.TotalCount}}"], check=False)
    for line in out.stdout.decode().splitlines():
        kind, _, count = line.partition("\t")
        if kind.strip().lower().startswith("build cache"):
            try:
                return int(count)
            except ValueError:
                return None
    return None


class DockerBuildKit(DockerBase):
    name = "docker"
    label = "docker (BuildKit)"
    buildkit = True

    def __init__(self, work: Path, allow_legacy_fallback: bool = True) -> None:
        super().__init__(work)
        self.allow_legacy_fallback = allow_legacy_fallback
        self.fell_back = False

    def setup(self, busybox_tar, archive):
        self.ensure_daemon_and_base(busybox_tar, archive)
        probe_ctx = self.work / "docker-probe"
        probe_ctx.mkdir(exist_ok=True)
        (probe_ctx / "Dockerfile").write_text(f"FROM {BASE}\nRUN true\n")
        reasons = []
        for client in docker_clients():
            env = {**os.environ, "DOCKER_BUILDKIT": "1"}
            has_buildx = run([client, "buildx", "version"], check=False).returncode == 0
            iid = self.work / "docker-probe.iid"
            out = run([client, "build", "--no-cache", "--network", "host", "--progress", "plain", "--iidfile",
                       str(iid), str(probe_ctx)], env=env, check=False)
            if out.returncode == 0 and iid.exists():
                DockerBase.shared["ids"].add(iid.read_text().strip())
                self.client, self.env = client, env
                how = "buildx" if has_buildx else "the daemon's built-in BuildKit (client without buildx)"
                self.notes.append(f"BuildKit via `{client}` ({how})")
                return
            reasons.append(f"{client}: {first_line(tail(out, 3)) or 'exit ' + str(out.returncode)}")
        why = "; ".join(reasons)
        if not self.allow_legacy_fallback:
            raise Skip(f"BuildKit not available ({why})")
        self.buildkit, self.fell_back = False, True
        self.label = "docker (legacy builder)"
        self.client = docker_clients()[0]
        self.env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        self.notes.append(f"BuildKit not available ({why}): using the legacy builder")


class DockerLegacy(DockerBase):
    name = "docker-legacy"
    label = "docker (legacy builder)"
    buildkit = False

    def setup(self, busybox_tar, archive):
        self.ensure_daemon_and_base(busybox_tar, archive)
        self.client = docker_clients()[0]
        self.env = {**os.environ, "DOCKER_BUILDKIT": "0"}


class Buildah(Tool):
    name = "buildah"
    label = "buildah"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.store = work / "buildah-store"
        self.global_args = ["--root", str(self.store / "root"), "--runroot", str(self.store / "run"),
                            "--storage-driver", "overlay"]
        self.env = dict(os.environ)
        self.ready = False

    def b(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["buildah", *self.global_args, *args], env=self.env, check=check)

    def version(self) -> str:
        return first_line(run(["buildah", "--version"], check=False).stdout.decode())

    def setup(self, busybox_tar, archive):
        if not shutil.which("buildah"):
            raise Skip("buildah is not installed")
        try:
            if archive is not None:
                self.b("pull", "-q", f"docker-archive:{archive}")  # named localhost/<the archive's RepoTags>
                self.notes.append("base: buildah pull docker-archive:<pybuild save archive>")
            else:
                ctr = self.b("from", "scratch").stdout.decode().strip()
                self.b("add", ctr, str(busybox_tar), "/")
                self.b("commit", "-q", "--rm", ctr, f"localhost/{BASE}:latest")
                self.notes.append("base: buildah from scratch + add busybox.tar + commit")
        except RuntimeError as exc:
            raise Skip(f"could not make the base image: {exc}") from None
        self.ready = True

    def build_cmd(self, ctx, tag, iidfile):
        flags = ["--layers"] if self.cached else ["--layers=false", "--no-cache"]
        return (["buildah", *self.global_args, "bud", *flags, "--network", "host",
                 "-t", tag, "--iidfile", str(iidfile), str(ctx)], self.env)

    def run_in(self, image, shell_cmd):
        ctr = self.b("from", "-q", image).stdout.decode().strip()
        try:
            return self.b("run", "--network", "none", ctr, "--", "sh", "-c", shell_cmd).stdout.decode()
        finally:
            self.b("rm", ctr, check=False)

    def remove(self, tag, image_id):
        self.b("rmi", tag, check=False)

    def cleanup(self):
        if self.store.exists():
            self.b("rm", "--all", check=False)
            self.b("rmi", "--all", "--force", check=False)



# -- the benchmark -------------------------------------------------------------------------

@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    check: str | None = None   # verification outcome


def unmount_below(path: Path) -> None:
    """Lazy-unmount anything a tool left mounted inside our own work dir (so it can be removed)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(path.resolve()) + "/"
    targets = [m.split()[1].encode().decode("unicode_escape") for m in mounts if len(m.split()) > 1]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def timed_build(tool: Tool, ctx: Path, tag: str, iidfile: Path, include_sync: bool) -> tuple[float, str]:
    iidfile.unlink(missing_ok=True)
    argv, env = tool.build_cmd(ctx, tag, iidfile)
    tool.last_argv = argv
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, timeout=900)
    if include_sync:
        os.sync()
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: `{shlex.join(argv)}`\n{tail(out, 25)}")
    image = iidfile.read_text().strip() if iidfile.exists() else tag
    return elapsed, image or tag


def fmt(seconds: float) -> str:
    return f"{seconds:.2f}"


def cell(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.error:
        return "FAIL"
    if not r.times:
        return "-"
    med = statistics.median(r.times)
    return f"{fmt(med)} s ({fmt(min(r.times))}-{fmt(max(r.times))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per scenario and tool (default 5)")
    ap.add_argument("--quick", action="store_true", help="3 runs (overrides --runs)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed builds before the timed ones (default 1)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS),
                    help=f"comma-separated, from {','.join(ALL_TOOLS)} (default: all)")
    ap.add_argument("--scenarios", default=None, help="comma-separated subset: from-only,run-true,run-20,write-200mb")
    ap.add_argument("--random", action="store_true", help="write the 200 MB from /dev/urandom (incompressible)")
    ap.add_argument("--include-sync", action="store_true",
                    help="time `sync` as part of each build (default: sync untimed between builds)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to pause (untimed) after each build, so dockerd's background work "
                         "does not land in the next build's time (default 0.5)")
    ap.add_argument("--no-verify", action="store_true", help="skip checking the built images' contents")
    ap.add_argument("--workdir", default=None, help="where the temporary stores go (default: the temp dir)")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    if runs < 1:
        ap.error("--runs must be at least 1")

    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in wanted:
        if t not in ALL_TOOLS:
            ap.error(f"unknown tool {t!r} (choose from {', '.join(ALL_TOOLS)})")
    scens = scenarios(args.random)
    if args.scenarios:
        names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = set(names) - {s.name for s in scens}
        if unknown:
            ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scens = [s for s in scens if s.name in names]

    started = time.perf_counter()
    global LOAD_START
    LOAD_START = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pybuild-bench-", dir=args.workdir))
    print(f"work dir: {work} ({fs_type(work)}); {runs} runs + {args.warmup} warm-up per scenario and tool",
          file=sys.stderr)
    tools: list[Tool] = []
    skipped: list[tuple[str, str]] = []
    try:
        busybox_tar = make_busybox_tar(work)
        # pybuild always makes the base (its `save` gives the docker-archive the others load);
        # it is only timed when asked for.
        pybuild = Pybuild(work)
        archive: Path | None = None
        try:
            pybuild.setup(busybox_tar, None)
            archive = work / "base-docker-archive.tar"
            try:
                pybuild.save_archive(archive)
            except RuntimeError as exc:
                print(f"note: pybuild save failed, the other tools import the rootfs tar instead: {exc}",
                      file=sys.stderr)
                archive = None
            if "pybuild" in wanted:
                tools.append(pybuild)
        except Skip as exc:
            if "pybuild" in wanted:
                skipped.append(("pybuild", str(exc)))

        for name in wanted:
            if name == "pybuild":
                continue
            if name == "docker":
                tool: Tool = DockerBuildKit(work, allow_legacy_fallback=True)
            elif name == "docker-legacy":
                tool = DockerLegacy(work)
            else:
                tool = Buildah(work)
            try:
                tool.setup(busybox_tar, archive)
            except Skip as exc:
                skipped.append((tool.label, str(exc)))
                tool.cleanup()
                continue
            except Exception as exc:  # noqa: BLE001 - a broken tool is reported, not fatal
                skipped.append((tool.label, f"setup failed: {exc}"))
                tool.cleanup()
                continue
            if isinstance(tool, DockerLegacy) and any(isinstance(t, DockerBuildKit) and t.fell_back for t in tools):
                skipped.append((tool.label, "same as `docker` (BuildKit unavailable, it fell back to legacy)"))
                continue
            tools.append(tool)
        # keep the order pybuild, docker, docker-legacy, buildah
        tools.sort(key=lambda t: ALL_TOOLS.index(t.name))
        for label, why in skipped:
            print(f"skipping {label}: {why}", file=sys.stderr)
        if not tools:
            print("no tool to benchmark", file=sys.stderr)
            return 1

        results: dict[tuple[str, str], Result] = {}
        commands: dict[tuple[str, str], list[str]] = {}
        for scen in scens:
            ctx = work / "ctx" / scen.name
            ctx.mkdir(parents=True, exist_ok=True)
            (ctx / "Dockerfile").write_text(scen.dockerfile)
            iid = work / "iid"
            for tool in tools:
                results[(tool.name, scen.name)] = Result()
            for k in range(-args.warmup, runs):   # negative k: warm-up, not recorded
                for tool in tools:
                    res = results[(tool.name, scen.name)]
                    if res.error:
                        continue
                    tag = f"{TAG_PREFIX}-{scen.name}:r{k + args.warmup}"
                    try:
                        elapsed, image = timed_build(tool, ctx, tag, iid, args.include_sync)
                    except Exception as exc:  # noqa: BLE001 - report the failure, keep going
                        res.error = str(exc)
                        print(f"{tool.label} / {scen.name}: FAILED\n{exc}", file=sys.stderr)
                        continue
                    commands[(tool.name, scen.name)] = tool.last_argv
                    if k >= 0:
                        res.times.append(elapsed)
                    print(f"  {scen.name:12} {tool.label:24} {'warm-up' if k < 0 else f'run {k + 1}'}: "
                          f"{elapsed:.3f} s", file=sys.stderr)
                    if k == runs - 1 and scen.check_cmd and not args.no_verify:
                        res.check = verify(tool, tag, scen)
                    tool.remove(tag, image)
                    if not args.include_sync:
                        os.sync()
                    time.sleep(args.settle)  # let a daemon's after-build work finish before the next build

        print_report(tools, skipped, scens, results, commands, runs, args, work)
        bad = [k for k, r in results.items() if r.error or (r.check and r.check != "ok")]
        print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        return 1 if bad else 0
    finally:
        for tool in tools:
            try:
                tool.cleanup()
            except Exception as exc:  # noqa: BLE001
                print(f"cleanup of {tool.label} failed: {exc}", file=sys.stderr)
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def verify(tool: Tool, image: str, scen: Scenario) -> str:
    try:
        got = tool.run_in(image, scen.check_cmd)
    except Exception as exc:  # noqa: BLE001
        return f"could not run a check in the image: {exc}"
    got = "\n".join(line.strip() for line in got.strip().splitlines()) + "\n"
    return "ok" if got == scen.check_out else f"wrong content: `{scen.check_cmd}` printed {got!r}, want {scen.check_out!r}"


def make_busybox_tar(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import make_busybox_rootfs  # the same rootfs the tests use
    finally:
        sys.path.pop(0)
    rootfs = work / "busybox-rootfs"
    try:
        make_busybox_rootfs(rootfs)
    except BaseException as exc:  # pytest.skip raises a BaseException subclass
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise SystemExit(f"cannot make the busybox rootfs: {exc}") from None
    out = work / "busybox.tar"
    run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(out), "."])
    return out


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def print_report(tools, skipped, scens, results, commands, runs, args, work: Path) -> None:
    def get(tool, scen_name):
        return results.get((tool.name, scen_name))

    print(f"\n### Build benchmark: wall clock per whole build, median (min-max) of {runs} runs\n")
    print(f"Machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
          f"work dir on {fs_type(work)}; cache off in every tool; RUN steps on the host network; "
          f"{'`sync` timed with each build' if args.include_sync else '`sync` between builds, untimed'}, "
          f"then a {args.settle:g} s pause; "
          f"load average {LOAD_START:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.\n")
    print("| scenario | " + " | ".join(t.label for t in tools) + " |")
    print("|---|" + "---|" * len(tools))
    for scen in scens:
        print(f"| {scen.title} | " + " | ".join(cell(get(t, scen.name)) for t in tools) + " |")

    def stat(tool, name, f):
        r = get(tool, name)
        return f(r.times) if r and r.times and not r.error else None

    def delta(tool, a, b, n):
        """`median-based ms / min-based ms` (the min is less sensitive to other load on the machine)."""
        parts = [diff(stat(tool, a, f), stat(tool, b, f), n) for f in (statistics.median, min)]
        return "-" if None in parts else " / ".join(f"{v * 1000:.0f}" for v in parts) + " ms"

    names = {s.name for s in scens}
    if {"from-only", "run-true"} <= names:
        print("| per RUN step: (RUN true) - (FROM only), median / min | "
              + " | ".join(delta(t, "run-true", "from-only", 1) for t in tools) + " |")
    if {"run-true", "run-20"} <= names:
        print("| per RUN step, marginal: (20 RUN - 1 RUN) / 19, median / min | "
              + " | ".join(delta(t, "run-20", "run-true", 19) for t in tools) + " |")

    print("\nTools:")
    for t in tools:
        extra = "; ".join(t.notes)
        print(f"- {t.label}: {t.version()}" + (f" ({extra})" if extra else ""))
    if DockerBase.shared.get("base_how"):
        print(f"- docker base image: {DockerBase.shared['base_how']}")
    for label, why in skipped:
        print(f"- {label}: skipped: {why}")

    print("\nCommands (one per build; $WORK is the temp dir, $CTX the scenario's context, N the run):\n")
    for t in tools:
        argv = next((commands[(t.name, s.name)] for s in scens if (t.name, s.name) in commands), None)
        if argv:
            print(f"- {t.label}: `{render(argv, t, work)}`")

    problems = [(t, s, get(t, s.name)) for t in tools for s in scens if get(t, s.name)]
    failures = [(t, s, r) for t, s, r in problems if r.error or (r.check and r.check != "ok")]
    checked = [(t, s) for t, s, r in problems if r.check == "ok"]
    if checked:
        print(f"\nContents checked after the last run ({len(checked)} images): ok.")
    for t, s, r in failures:
        print(f"\n**{t.label} / {s.name}**: " + ("build failed:" if r.error else "check failed:"))
        print("```\n" + (r.error or r.check) + "\n```")


def render(argv: list[str], tool: Tool, work: Path) -> str:
    text = shlex.join(argv)
    env_prefix = ""
    if isinstance(tool, DockerBase):
        env_prefix = f"DOCKER_BUILDKIT={tool.env.get('DOCKER_BUILDKIT', '')} "
    text = text.replace(sys.executable, "python")
    for scen in ("from-only", "run-true", "run-20", "write-200mb"):
        text = text.replace(str(work / "ctx" / scen), "$CTX").replace(f"{TAG_PREFIX}-{scen}:", f"{TAG_PREFIX}-SCENARIO:")
    text = text.replace(str(work), "$WORK")
    import re

    text = re.sub(r"(pybuild-bench-SCENARIO:)r\d+", r"\1rN", text)
    return env_prefix + text


def diff(a: float | None, b: float | None, n: int) -> float | None:
    return None if a is None or b is None else (a - b) / n


if __name__ == "__main__":
    sys.exit(main())
