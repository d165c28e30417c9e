"""Warm rebuilds: what the layer cache saves, side by side with docker build and buildah.

Scenarios (whole processes, median of --runs):
  noop    rebuild of `COPY . /app` over a 10,000-file, 100 MB context, nothing changed
  edit    the same after editing one file (a different one each run)
  steps   rebuild of a 20-step Dockerfile (10 RUN + 10 ENV/LABEL), nothing changed
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def make_context(path: Path, files: int, total_mb: int) -> None:
    size = total_mb * 1024 * 1024 // files
    block = os.urandom(size)
    for i in range(files):
        sub = path / "src" / f"d{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.dat").write_bytes(block[i % 97:] + block[:i % 97])
    (path / "Dockerfile").write_text("FROM busybox\nCOPY . /app\nRUN ls /app/src | wc -l > /count\n")


def steps_context(path: Path) -> None:
    path.mkdir(parents=True)
    lines = ["FROM busybox"]
    for i in range(10):
        lines.append(f"ENV STEP{i}={i}")
        lines.append(f"RUN echo {i} > /f{i}")
    (path / "Dockerfile").write_text("\n".join(lines) + "\n")


class Tool:
    name = ""

    def setup(self, base_tar: Path, work: Path) -> None: ...

    def build(self, ctx: Path) -> list[str]: ...

    def env(self) -> dict | None:
        return None

    def cleanup(self) -> None: ...


class Pybuild(Tool):
    name = "pybuild"

    def setup(self, base_tar, work):
        self.root = work / "pybuild-store"
        subprocess.run([sys.executable, "-m", "builder.cli", "--help"], check=True, capture_output=True, cwd=ROOT)
        subprocess.run(self.cli() + ["import", str(base_tar), "busybox:latest"], check=True, capture_output=True,
                       env=self.env())

    def cli(self):
        return [shutil.which("pybuild") or sys.executable, *([] if shutil.which("pybuild") else ["-m", "builder.cli"])]

    def env(self):
        return {**os.environ, "PYBUILD_ROOT": str(self.root), "PYTHONPATH": str(ROOT)}

    def build(self, ctx):
        return self.cli() + ["build", "-q", "-t", "bench:cache", str(ctx)]


class Docker(Tool):
    name = "docker"

    def setup(self, base_tar, work):
        if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
            raise RuntimeError("no Docker engine answers")
        subprocess.run(["docker", "import", str(base_tar), "busybox:latest"], check=True, capture_output=True)

    def env(self):
        return {**os.environ, "DOCKER_BUILDKIT": "1"}

    def build(self, ctx):
        return ["docker", "build", "-q", "--network", "none", "-t", "bench-cache:latest", str(ctx)]

    def cleanup(self):
        subprocess.run(["docker", "rmi", "-f", "bench-cache:latest"], capture_output=True)


class Buildah(Tool):
    name = "buildah"

    def setup(self, base_tar, work):
        if shutil.which("buildah") is None:
            raise RuntimeError("buildah is not installed")
        ctr = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
        mnt = subprocess.run(["buildah", "mount", ctr], check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["tar", "-C", mnt, "-xf", str(base_tar)], check=True)
        subprocess.run(["buildah", "commit", "-q", ctr, "localhost/busybox:latest"], check=True, capture_output=True)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)

    def build(self, ctx):
        return ["buildah", "bud", "-q", "--layers", "--network", "host", "-t", "bench-cache", str(ctx)]

    def cleanup(self):
        subprocess.run(["buildah", "rmi", "-f", "bench-cache"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tools", default="pybuild,docker,buildah")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=100)
    opts = parser.parse_args()
    from conftest import make_busybox_rootfs

    work = Path(tempfile.mkdtemp(prefix="pybuild-cache-bench-"))
    try:
        rootfs = make_busybox_rootfs(work / "rootfs")
        base_tar = work / "busybox.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(base_tar), "."], check=True)
        ctx = work / "ctx"
        make_context(ctx, opts.files, opts.mb)
        steps = work / "steps"
        steps_context(steps)
        print(f"context: {opts.files} files, {opts.mb} MB; runs: {opts.runs} (median, min-max in seconds)\n")
        print("| tool | cold build | warm no-op rebuild | one-file edit rebuild | 20-step warm rebuild |")
        print("|---|---|---|---|---|")
        classes = {"pybuild": Pybuild, "docker": Docker, "buildah": Buildah}
        for name in opts.tools.split(","):
            tool = classes[name]()
            try:
                tool.setup(base_tar, work)
            except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as exc:
                print(f"| {name} | skipped: {str(exc).splitlines()[0]} | | | |")
                continue
            try:
                cold = timed(tool.build(ctx), tool.env())
                noop = [timed(tool.build(ctx), tool.env()) for _ in range(opts.runs)]
                edits = []
                for run in range(opts.runs):
                    target = ctx / "src" / "d000" / f"f{run:05d}.dat"
                    target.write_bytes(target.read_bytes()[::-1])
                    edits.append(timed(tool.build(ctx), tool.env()))
                timed(tool.build(steps), tool.env())
                warm_steps = [timed(tool.build(steps), tool.env()) for _ in range(opts.runs)]
                cells = [f"{cold:.2f}"] + [f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                                          for v in (noop, edits, warm_steps)]
                print(f"| {name} | " + " | ".join(cells) + " |")
            except RuntimeError as exc:
                print(f"| {name} | failed: {str(exc).splitlines()[0]} | | | |")
            finally:
                tool.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
