"""Parse a 5,000-line Dockerfile: pybuild's LALR front end vs dockerfile-parse.

Reports the median of several runs, in-process (the parse itself) and as a
whole process (`pybuild debug dump-ast`, what a user or editor plugin pays).
Usage: python bench/parse_bench.py [--runs N]
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = """\
# stage {i}
FROM debian:12 AS s{i}
ARG VERSION_{i}=1.{i}
ENV PATH=/opt/s{i}/bin:$PATH LANG=C.UTF-8
LABEL org.example.stage="{i}" maintainer="dev@example.com"
RUN apt-get update \\
    && apt-get install -y --no-install-recommends curl ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY --chown=1000:1000 --chmod=755 src/{i} /opt/s{i}/
RUN --mount=type=cache,target=/root/.cache,id=pip{i} pip install -r /opt/s{i}/requirements.txt
WORKDIR /opt/s{i}
EXPOSE 80{i:02d}
CMD ["/opt/s{i}/bin/run", "--port", "80{i:02d}"]
HEALTHCHECK --interval=30s --timeout=3s CMD curl -f http://localhost:80{i:02d}/ || exit 1
USER 1000:1000

"""


def make_dockerfile(lines: int) -> str:
    out, i = [], 0
    while sum(chunk.count("\n") for chunk in out) < lines:
        out.append(BLOCK.format(i=i))
        i += 1
    return "".join(out)


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lines", type=int, default=5000)
    opts = parser.parse_args()
    text = make_dockerfile(opts.lines)
    from grammar.parser import _lark, parse

    _lark()  # the grammar is compiled once per process; measured separately below
    ours = median_ms(lambda: parse(text), opts.runs)
    print(f"file: {text.count(chr(10))} lines, {len(text) // 1024} KiB, {len(parse(text).nodes)} instructions")
    print(f"pybuild parse (in-process, median of {opts.runs}):   {ours:7.1f} ms")
    try:
        from dockerfile_parse import DockerfileParser

        theirs = median_ms(lambda: DockerfileParser(fileobj=io.BytesIO(text.encode())).structure, opts.runs)
        print(f"dockerfile-parse (in-process, median of {opts.runs}): {theirs:7.1f} ms")
    except ImportError:
        print("dockerfile-parse not installed: no side-by-side figure")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Dockerfile"
        path.write_text(text)
        cmd = [sys.executable, "-m", "builder.cli", "debug", "dump-ast", str(path)]
        whole = median_ms(lambda: subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT), opts.runs)
        empty = median_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), opts.runs)
        print(f"pybuild debug dump-ast (whole process, median):  {whole:7.1f} ms  (python start-up alone {empty:.1f} ms)")


if __name__ == "__main__":
    main()
