"""Whole-process registry benchmark: `pybuild push` / `pybuild pull` vs `skopeo copy`.

One ~200 MB image is built once (untimed) with pybuild: FROM the busybox base plus one RUN
writing 200 MB (--data: `mixed` = 100 MB of deterministic text-like lines + 100 MB from
/dev/urandom, the default; `zero`; `random`).  Then, for each of --runs runs, against
docker-registry servers (tests/registry_fixtures.RegistryServer) started fresh for every
scenario and tool, on 127.0.0.1:

  push gzip (cold)   pybuild push IMAGE DEST                    skopeo copy oci-archive:A docker://DEST
  push gzip (warm)   the same command again (uploads nothing)   the same command again
  push zstd (cold)   pybuild push --compression zstd ...        skopeo copy --dest-compress-format zstd ...
  pull gzip          pybuild pull DEST into an empty store      skopeo copy docker://DEST oci:DIR
  pull zstd          the same, from the zstd push's registry

Every transfer is one whole command, timed with time.perf_counter() around it.  Prints a
Markdown table (median (min-max) of the runs) and a gzip-vs-zstd table (compressed size,
push time), plus where pybuild's time went (from the timestamps of its progress lines).

Usage: sudo python bench/registry_bench.py [--runs N] [--quick] [--data mixed|zero|random]
Needs root (pybuild's RUN), /usr/bin/docker-registry and, for the skopeo column, skopeo.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.build_bench import (
    BASE,
    Pybuild,
    Skip,
    first_line,
    fs_type,
    make_busybox_tar,
    unmount_below,
)

MIB = 1024 * 1024
BIG_MB = 200
IMAGE = "registry-bench:1"      # the image's name in the source store
REPO = "bench/img"              # where it goes in every registry
TAG = "1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
TEXT_AWK = (  # deterministic, log-like lines (srand(42) in busybox awk); gzip -6 makes them ~2.7x smaller
    'BEGIN{srand(42); n=split("the of and to in is for on that with as by at from this are be or an it was '
    'not but have which all can data value error info debug request response server client user time status",'
    ' w, " "); s=0; i=0; while (s < LIMIT) { l=sprintf("%08d %s %s %s id=%d %s %s %.3f\\n", i++, '
    'w[int(rand()*n)+1], w[int(rand()*n)+1], w[int(rand()*n)+1], int(rand()*100000), w[int(rand()*n)+1], '
    'w[int(rand()*n)+1], rand()*1000); printf "%s", l; s+=length(l)}}'
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the image ------------------------------------------------------------------------------

def dockerfile(data: str) -> str:
    half = BIG_MB // 2 * MIB
    if data == "zero":
        run = f"dd if=/dev/zero of=/data/zero bs=1M count={BIG_MB} 2>/dev/null"
    elif data == "random":
        run = f"head -c {BIG_MB * MIB} /dev/urandom > /data/random"
    else:
        awk = TEXT_AWK.replace("LIMIT", str(half))
        run = (f"awk '{awk}' | head -c {half} > /data/text && "
               f"head -c {half} /dev/urandom > /data/random")
    return f"FROM {BASE}\nRUN mkdir /data && {run} && wc -c /data/* && sync\n"


DATA_TITLE = {
    "mixed": f"{BIG_MB // 2} MB of text-like lines (busybox awk, fixed seed) + {BIG_MB // 2} MB from /dev/urandom",
    "zero": f"{BIG_MB} MB of zeros",
    "random": f"{BIG_MB} MB from /dev/urandom",
}


# -- timed commands -------------------------------------------------------------------------

@dataclass
class Timed:
    elapsed: float
    stdout: str
    lines: list[tuple[float, str]]   # stderr lines with the time (s since start) each arrived


def timed(argv: list[str], env: dict[str, str] | None = None) -> Timed:
    """Run a whole command; stderr is read as it comes (pybuild flushes each progress line)."""
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def read_err() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append((time.perf_counter() - t0, raw.decode(errors="replace").rstrip("\n")))

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()
        rc = proc.wait(timeout=900)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    reader.join(10)
    if rc != 0:
        text = "\n".join(line for _, line in lines[-25:])
        raise RuntimeError(f"exit {rc}: `{shlex.join(argv)}`\n{text}")
    return Timed(elapsed, out.decode(errors="replace"), lines)


def settle(pause: float) -> None:
    """Untimed between transfers: flush what the last one left dirty, so it does not land in the next."""
    os.sync()
    time.sleep(pause)


# -- registries -----------------------------------------------------------------------------

class Registries:
    """Fresh docker-registry servers, each with its own storage; all stopped and removed by close()."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.live: list = []
        self.n = 0

    def start(self, label: str):
        from registry_fixtures import RegistryServer

        self.n += 1
        server = RegistryServer(self.work / f"registry-{self.n:03d}-{label}")
        try:
            server.start()
        except BaseException as exc:  # pytest.skip (registry not installed) is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise SystemExit(f"cannot start docker-registry: {exc}") from None
        self.live.append(server)
        return server

    def stop(self, server) -> None:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        if server in self.live:
            self.live.remove(server)

    def close(self) -> None:
        for server in list(self.live):
            self.stop(server)


def remote_manifest(host: str) -> dict:
    """The manifest of REPO:TAG in a registry (to read the compressed layer sizes and media types)."""
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("GET", f"/v2/{REPO}/manifests/{TAG}", headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET manifest from {host}: HTTP {resp.status}: {body[:300]!r}")
        return json.loads(body)
    finally:
        conn.close()


def uploads_logged(server, offset: int) -> int:
    """Blob uploads the registry completed since `offset` in its log (a PUT to /blobs/uploads/ answered 201)."""
    try:
        with open(server.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()
               if "http.request.method=PUT" in line and "/blobs/uploads/" in line
               and "http.response.status=201" in line)


def layer_summary(manifest: dict) -> tuple[int, str]:
    """(total compressed layer bytes, the layers' compression(s))."""
    layers = manifest.get("layers") or []
    kinds = sorted({(ly.get("mediaType") or "").rsplit("+", 1)[-1].rsplit(".", 1)[-1] for ly in layers})
    return sum(int(ly.get("size") or 0) for ly in layers), ",".join(kinds)


# -- the tools ------------------------------------------------------------------------------

class PybuildTool:
    label = "pybuild"

    def __init__(self, pb: Pybuild, work: Path) -> None:
        self.pb = pb
        self.work = work
        self.store = pb.store

    def push_argv(self, dest: str, compression: str) -> list[str]:
        argv = [*self.pb.cli, "push", "--root", str(self.store)]
        if compression != "gzip":
            argv += ["--compression", compression]
        return [*argv, IMAGE, dest]

    def push(self, dest: str, compression: str) -> Timed:
        return timed(self.push_argv(dest, compression), self.pb.env)

    def pull_argv(self, src: str, store: Path) -> list[str]:
        return [*self.pb.cli, "pull", "--root", str(store), src]

    def pull(self, src: str, store: Path) -> Timed:
        return timed(self.pull_argv(src, store), self.pb.env)


class SkopeoTool:
    label = "skopeo"

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.formats = self._formats()

    @staticmethod
    def _formats() -> set[str]:
        help_text = subprocess.run(["skopeo", "copy", "--help"], check=False, capture_output=True, text=True).stdout
        return {"gzip", "zstd"} if "--dest-compress-format" in help_text else set()

    def version(self) -> str:
        return first_line(subprocess.run(["skopeo", "--version"], check=False, capture_output=True, text=True).stdout)

    def push_argv(self, dest: str, compression: str) -> list[str]:
        argv = ["skopeo", "copy", "--dest-tls-verify=false"]
        if compression in self.formats:
            argv += ["--dest-compress-format", compression]
        return [*argv, f"oci-archive:{self.archive}", f"docker://{dest}"]

    def push(self, dest: str, compression: str) -> Timed:
        if compression != "gzip" and compression not in self.formats:
            raise Skip(f"this skopeo has no --dest-compress-format (cannot push {compression})")
        return timed(self.push_argv(dest, compression))

    def pull_argv(self, src: str, dest_dir: Path) -> list[str]:
        return ["skopeo", "copy", "--src-tls-verify=false", f"docker://{src}", f"oci:{dest_dir}"]

    def pull(self, src: str, dest_dir: Path) -> Timed:
        return timed(self.pull_argv(src, dest_dir))


# -- the benchmark --------------------------------------------------------------------------

SCENARIOS = [
    ("push-gzip-cold", "push, gzip (cold: empty registry)"),
    ("push-gzip-warm", "push, gzip (warm: the same push again)"),
    ("push-zstd-cold", "push, zstd (cold: empty registry)"),
    ("pull-gzip", "pull the gzip image (empty store / empty dir)"),
    ("pull-zstd", "pull the zstd image (empty store / empty dir)"),
]


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    notes: set[str] = field(default_factory=set)
    breakdowns: list[dict[str, float]] = field(default_factory=list)
    argv: list[str] | None = None


def push_breakdown(t: Timed) -> dict[str, float]:
    """From pybuild push's progress lines (layers go in parallel: the phases of the critical path).

    start-up until the first `Compressing`, compressing until the last `Pushing N bytes`,
    uploading until the last `Pushed`, then the manifest and exit.
    """
    def when(pattern: str, pick) -> float | None:
        times = [s for s, line in t.lines if re.search(pattern, line)]
        return pick(times) if times else None

    start, compressed, pushed = (when(r": Compressing \(", min), when(r": Pushing \d+ bytes", max),
                                 when(r": Pushed$", max))
    if start is None or compressed is None or pushed is None:
        return {}
    return {"until compressing": start, "compress": compressed - start, "upload": pushed - compressed,
            "after upload": t.elapsed - pushed}


def pull_breakdown(t: Timed) -> dict[str, float]:
    """From pybuild pull's progress lines: start-up until the first `Downloading`, downloading + verifying +
    unpacking until the last `Pull complete`, then the rest (config, image record, exit)."""
    starts = [s for s, line in t.lines if re.search(r": Downloading \d+ bytes", line)]
    ends = [s for s, line in t.lines if line.endswith(": Pull complete")]
    if not starts or not ends:
        return {}
    return {"until downloading": min(starts), "download + unpack": max(ends) - min(starts),
            "after": t.elapsed - max(ends)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per scenario and tool (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 run (overrides --runs)")
    ap.add_argument("--data", choices=("mixed", "zero", "random"), default="mixed",
                    help="what the RUN writes: mixed (half text-like, half random; default), zero, random")
    ap.add_argument("--no-skopeo", action="store_true", help="time pybuild only")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds to pause (untimed, after a sync) between transfers (default 0.3)")
    ap.add_argument("--workdir", default=None, help="where the temporary stores and registries go (default: the temp dir)")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    if runs < 1:
        ap.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("needs root (pybuild's RUN uses namespaces and overlay mounts)", file=sys.stderr)
        return 1

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pybuild-regbench-", dir=args.workdir))
    regs = Registries(work)
    log(f"work dir: {work} ({fs_type(work)}); {runs} run(s); data: {args.data}")
    try:
        # ---- the image and its OCI archive (untimed)
        pb = Pybuild(work)
        try:
            pb.setup(make_busybox_tar(work), None)
        except Skip as exc:
            log(f"pybuild cannot run here: {exc}")
            return 1
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(dockerfile(args.data))
        t0 = time.perf_counter()
        pb.pb("build", "--root", str(pb.store), "--no-cache", "--network", "none", "--progress", "plain",
              "-t", IMAGE, "--iidfile", str(work / "iid"), str(ctx))
        image_id = (work / "iid").read_text().strip()
        layers_mb = sum(s for s in _layer_sizes(pb, image_id)) / MIB
        log(f"built {IMAGE} ({image_id[:19]}, {layers_mb:.0f} MB of layers) in {time.perf_counter() - t0:.1f} s")

        tools: dict[str, object] = {"pybuild": PybuildTool(pb, work)}
        skipped: list[str] = []
        archive = work / "image-oci.tar"
        if args.no_skopeo:
            skipped.append("skopeo: --no-skopeo")
        elif not shutil.which("skopeo"):
            skipped.append("skopeo: not installed")
        else:
            pb.pb("save", "--root", str(pb.store), "--format", "oci", "-o", str(archive), IMAGE)
            tools["skopeo"] = SkopeoTool(archive)
        settle(args.settle)

        cells = {(tool, s): Cell() for tool in tools for s, _ in SCENARIOS}
        sizes: dict[tuple[str, str], set[tuple[int, str]]] = {}

        def record(tool: str, scen: str, fn, fn_args: tuple, argv, breakdown=None, check=None, reg=None,
                   warm=False):
            """Time fn(*fn_args) (one whole command); then (untimed) settle, run the check, count uploads."""
            cell = cells[(tool, scen)]
            if cell.error:
                return None
            log_at = reg.log.stat().st_size if reg is not None and reg.log.exists() else 0
            try:
                t = fn(*fn_args)
            except Skip as exc:
                cell.error = f"skipped: {exc}"
                return None
            except Exception as exc:  # noqa: BLE001 - a failure is reported, the others go on
                cell.error = str(exc)
                log(f"{tool} / {scen}: FAILED\n{exc}")
                settle(args.settle)
                return None
            cell.times.append(t.elapsed)
            cell.argv = argv
            if breakdown:
                cell.breakdowns.append(breakdown(t))
            settle(args.settle)
            extra = ""
            if reg is not None:
                n = uploads_logged(reg, log_at)
                extra = f"  ({n} blob upload(s) in the registry's log)"
                if warm and n:
                    cell.notes.add(f"the warm push uploaded {n} blob(s) (completed uploads in the registry's log)")
            if check:
                problem = check(t)
                if problem:
                    cell.notes.add(problem)
            log(f"  {scen:15} {tool:8} {t.elapsed:7.2f} s{extra}")
            return t

        for k in range(runs):
            log(f"run {k + 1}/{runs}")
            order = list(tools) if k % 2 == 0 else list(reversed(tools))  # take turns going first
            pulls_from: dict[str, str] = {}   # compression -> the pybuild-pushed registry to pull from
            for compression in ("gzip", "zstd"):
                for name in order:
                    tool = tools[name]
                    reg = regs.start(f"{name}-{compression}")
                    dest = f"{reg.host}/{REPO}:{TAG}"
                    cold = f"push-{compression}-cold"
                    bd = push_breakdown if name == "pybuild" else None
                    t = record(name, cold, tool.push, (dest, compression), tool.push_argv(dest, compression), bd,
                               reg=reg)
                    if t is not None:
                        try:
                            sizes.setdefault((name, compression), set()).add(layer_summary(remote_manifest(reg.host)))
                        except Exception as exc:  # noqa: BLE001
                            cells[(name, cold)].notes.add(f"could not read the pushed manifest: {exc}")
                    if compression == "gzip" and t is not None:
                        record(name, "push-gzip-warm", tool.push, (dest, compression),
                               tool.push_argv(dest, compression), bd, reg=reg, warm=True)
                    if name == "pybuild" and t is not None:
                        pulls_from[compression] = reg.host
                    else:
                        regs.stop(reg)
            for compression in ("gzip", "zstd"):
                scen = f"pull-{compression}"
                host = pulls_from.get(compression)
                for name in order:
                    if host is None:
                        cells[(name, scen)].error = cells[(name, scen)].error or \
                            f"nothing to pull: pybuild's {compression} push failed"
                        continue
                    tool = tools[name]
                    src = f"{host}/{REPO}:{TAG}"
                    target = work / f"pull-{name}-{compression}-{k}"
                    if name == "pybuild":
                        def check(t: Timed) -> str | None:
                            got = t.stdout.strip()
                            return None if got == image_id else f"pulled image {got[:19]}, not {image_id[:19]}"
                        record(name, scen, tool.pull, (src, target), tool.pull_argv(src, target), pull_breakdown,
                               check=check)
                    else:
                        record(name, scen, tool.pull, (src, target), tool.pull_argv(src, target),
                               check=lambda _t, target=target: _check_oci_dir(target, image_id))
                    unmount_below(target)
                    shutil.rmtree(target, ignore_errors=True)
            regs.close()

        print_report(args, runs, tools, skipped, cells, sizes, layers_mb, load_start, work)
        log(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
        bad = [c for c in cells.values() if (c.error and not c.error.startswith("skipped")) or c.notes]
        return 1 if bad else 0
    finally:
        regs.close()
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def _layer_sizes(pb: Pybuild, image_id: str) -> list[int]:
    """Uncompressed layer sizes of the built image (its blobs in the store: local layers are plain tars)."""
    from builder.store import Store

    store = Store.open(pb.store)
    image = store.get_image(image_id)
    return [store.blob_size(d) for d in image.config.diff_ids]


def _check_oci_dir(layout: Path, image_id: str) -> str | None:
    try:
        index = json.loads((layout / "index.json").read_text())
        digest = index["manifests"][0]["digest"]
        manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
        got = manifest["config"]["digest"]
    except Exception as exc:  # noqa: BLE001
        return f"could not read the pulled layout: {exc}"
    return None if got == image_id else f"pulled config {got[:19]} is not the pushed {image_id[:19]}"


def fmt_cell(c: Cell | None) -> str:
    if c is None:
        return "-"
    if c.error:
        return "skipped" if c.error.startswith("skipped") else "FAIL"
    if not c.times:
        return "-"
    med = statistics.median(c.times)
    if len(c.times) == 1:
        return f"{med:.2f} s"
    return f"{med:.2f} s ({min(c.times):.2f}-{max(c.times):.2f})"


def render(argv: list[str] | None, work: Path) -> str:
    if not argv:
        return "-"
    text = shlex.join(argv).replace(sys.executable, "python")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT", text)
    text = re.sub(r"pull-(pybuild|skopeo)-(gzip|zstd)-\d+", r"pull-\1-\2-N", text)
    return text.replace(str(work), "$WORK")


def print_report(args, runs, tools, skipped, cells, sizes, layers_mb, load_start, work: Path) -> None:
    names = list(tools)
    labels = {"pybuild": "pybuild", "skopeo": "skopeo copy"}
    print(f"\n### Registry benchmark: wall clock per whole command, median (min-max) of {runs} run(s)\n")
    print(f"Image: {BASE} + one RUN writing {DATA_TITLE[args.data]} ({layers_mb:.0f} MB of uncompressed layers). "
          f"Machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, work dir on {fs_type(work)}; "
          f"a fresh docker-registry on 127.0.0.1 for every push; `sync` + {args.settle:g} s pause between commands "
          f"(untimed); load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.\n")
    print("| scenario | " + " | ".join(labels[n] for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for scen, title in SCENARIOS:
        print(f"| {title} | " + " | ".join(fmt_cell(cells.get((n, scen))) for n in names) + " |")

    print("\n| compression | " + " | ".join(f"{labels[n]}: compressed size (MB) | {labels[n]}: push time (cold)"
                                           for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for comp in ("gzip", "zstd"):
        row = []
        for n in names:
            got = sizes.get((n, comp))
            if got:
                size_txt = " / ".join(f"{b / MIB:.1f}" + ("" if kind == comp else f" ({kind}!)")
                                      for b, kind in sorted(got))
            else:
                size_txt = "-"
            row += [size_txt, fmt_cell(cells.get((n, f"push-{comp}-cold")))]
        print(f"| {comp} | " + " | ".join(row) + " |")
    print(f"\n(uncompressed: {layers_mb:.1f} MB; sizes are the sum of the pushed layers as the registry's "
          "manifest lists them; several values mean the runs differed.)")

    bds = [(scen, cells[("pybuild", scen)].breakdowns) for scen, _ in SCENARIOS
           if cells.get(("pybuild", scen)) and any(cells[("pybuild", scen)].breakdowns)]
    if bds:
        print("\nWhere pybuild's time went (medians, from the arrival times of its progress lines; layers go "
              "in parallel, so these are the phases of the slowest one: compress = first `Compressing` to last "
              "`Pushing`, upload = to the last `Pushed`; download + unpack = first `Downloading` to last "
              "`Pull complete`):\n")
        for scen, items in bds:
            items = [b for b in items if b]
            keys = list(items[0])
            parts = [f"{key} {statistics.median(b[key] for b in items if key in b):.2f} s" for key in keys]
            print(f"- {scen}: " + ", ".join(parts))

    print("\nTools:")
    print(f"- pybuild: {tools['pybuild'].pb.version()} (`python -m builder.cli` from the working tree)")
    if "skopeo" in tools:
        sk = tools["skopeo"]
        print(f"- skopeo: {sk.version()}" + ("" if sk.formats else " (no --dest-compress-format: zstd push skipped)"))
    for s in skipped:
        print(f"- {s}")

    print("\nCommands ($WORK is the temp dir, $PORT the scenario's fresh registry, N the run):\n")
    print(f"- untimed: `python -m builder.cli build --root $WORK/pybuild-store --no-cache -t {IMAGE} $WORK/ctx`"
          + (f"; `python -m builder.cli save --root $WORK/pybuild-store --format oci -o $WORK/image-oci.tar {IMAGE}`"
             if "skopeo" in tools else ""))
    for scen, title in SCENARIOS:
        for n in names:
            c = cells.get((n, scen))
            if c and c.argv:
                print(f"- {scen} / {n}: `{render(c.argv, work)}`")

    problems = [(k, c) for k, c in cells.items() if (c.error and not c.error.startswith("skipped")) or c.notes]
    for (n, scen), c in problems:
        print(f"\n**{n} / {scen}**:")
        print("```\n" + "\n".join(filter(None, [c.error, *sorted(c.notes)])) + "\n```")


if __name__ == "__main__":
    sys.exit(main())
