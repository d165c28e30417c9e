"""Warm rebuilds: what the layer cache saves, side by side with docker build and buildah.

Uses the tools of bench/build_bench.py with their build caches on. Scenarios
(whole processes, median of --runs):
  noop    rebuild of `COPY . /app` over a 10,000-file, 100 MB context, nothing changed
  edit    the same after editing one file (a different one each run)
  steps   rebuild of a 20-step Dockerfile (10 RUN + 10 ENV), nothing changed
Usage: python bench/cache_bench.py [--runs N] [--tools pybuild,docker,buildah] [--files N] [--mb N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_bench as bb  # noqa: E402  (the tool drivers: stores, base images, commands)


def make_context(path: Path, files: int, total_mb: int) -> None:
    size = total_mb * 1024 * 1024 // files
    block = os.urandom(size)
    for i in range(files):
        sub = path / "src" / f"d{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.dat").write_bytes(block[i % 97:] + block[:i % 97])
    (path / "Dockerfile").write_text(f"FROM {bb.BASE}\nCOPY . /app\nRUN ls /app/src | wc -l > /count\n")


def steps_context(path: Path) -> None:
    path.mkdir(parents=True)
    lines = [f"FROM {bb.BASE}"]
    for i in range(10):
        lines += [f"ENV STEP{i}={i}", f"RUN echo {i} > /f{i}"]
    (path / "Dockerfile").write_text("\n".join(lines) + "\n")


def timed(tool: bb.Tool, ctx: Path, work: Path) -> float:
    argv, env = tool.build_cmd(ctx, "pybuild-bench-cache:latest", work / "iid")
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tools", default="pybuild,docker,buildah")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=100)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pybuild-cache-bench-"))
    classes = {"pybuild": bb.Pybuild, "docker": bb.DockerBuildKit, "buildah": bb.Buildah}
    try:
        base_tar = bb.make_busybox_tar(work)
        ctx, steps = work / "ctx", work / "steps"
        make_context(ctx, opts.files, opts.mb)
        steps_context(steps)
        pybuild = bb.Pybuild(work)
        pybuild.setup(base_tar, None)
        archive = work / "base.tar"
        pybuild.save_archive(archive)
        print(f"context: {opts.files} files, {opts.mb} MB; runs: {opts.runs}; median (min-max) seconds\n")
        print("| tool | cold build | warm no-op rebuild | one-file edit rebuild | 20-step warm rebuild |")
        print("|---|---|---|---|---|")
        for name in opts.tools.split(","):
            tool = pybuild if name == "pybuild" else classes[name](work)
            tool.cached = True
            try:
                if tool is not pybuild:
                    tool.setup(base_tar, archive)
                cold = timed(tool, ctx, work)
                noop = [timed(tool, ctx, work) for _ in range(opts.runs)]
                edits = []
                for run in range(opts.runs):
                    target = ctx / "src" / "d000" / f"f{run:05d}.dat"
                    target.write_bytes(target.read_bytes()[::-1])
                    edits.append(timed(tool, ctx, work))
                timed(tool, steps, work)
                warm = [timed(tool, steps, work) for _ in range(opts.runs)]
                print(f"| {tool.label} | {cold:.2f} | {summary(noop)} | {summary(edits)} | {summary(warm)} |")
            except (bb.Skip, RuntimeError) as exc:
                print(f"| {name} | skipped: {str(exc).splitlines()[0]} | | | |")
            finally:
                tool.remove("pybuild-bench-cache:latest", "")
                tool.cleanup()
    finally:
        bb.unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
