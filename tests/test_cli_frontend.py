"""The front-end commands as a user runs them: output, exit codes, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "buildkit"


def pybuild(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(Path(__file__).parent.parent), "PATH": "/usr/bin:/bin"})


def test_dump_ast_matches_vector():
    case = DATA / "parser" / "lk4d4-the-edge-case-generator"
    out = pybuild("debug", "dump-ast", str(case / "Dockerfile"))
    assert out.returncode == 0 and out.stdout == (case / "result").read_text()


@pytest.mark.parametrize("text, line", [
    ("FROM a\nRUN <<EOF\nnever closed\n", 2),
    ("FROM a\nCOPY --from=nope2 a b\nFROM b AS nope\n", 2),
    ("FROM a\nFROBNICATE x\n", 2),
    ("FROM a\nRUN --mount=type=cache,target=/x,colour=red true\n", 2),
])
def test_user_mistake_is_one_clear_error(tmp_path, text, line):
    (tmp_path / "Dockerfile").write_text(text)
    out = pybuild("outline", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(f"pybuild: error: Dockerfile:{line}: ")
    assert "Traceback" not in out.stderr
    assert "  | " + text.splitlines()[line - 1] in out.stderr


def test_missing_dockerfile(tmp_path):
    out = pybuild("outline", "-f", "nope/Dockerfile", cwd=tmp_path)
    assert out.returncode == 1 and "Dockerfile not found" in out.stderr and "Traceback" not in out.stderr


def test_outline_json(tmp_path):
    (tmp_path / "Dockerfile").write_text("ARG V=3\nFROM alpine:${V} AS a\nARG X=1\nFROM scratch\nCOPY --from=a / /\n")
    out = pybuild("outline", "--json", cwd=tmp_path)
    info = json.loads(out.stdout)
    assert info["target"] == "1"
    assert info["stages"][0]["base"] == "alpine:3" and info["stages"][0]["args"][0]["name"] == "X"
    assert info["stages"][1]["depends_on"] == ["a"]
    text = pybuild("outline", "--target", "a", cwd=tmp_path).stdout
    assert "stage 1: FROM scratch (scratch, line 4)  [not needed for target]" in text
