"""Every example in examples/Dockerfiles builds and behaves as its expect.json says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import pybuild
from test_build import inspect

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "Dockerfiles"
SPECS = {p.parent.name: json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*/expect.json"))}
TAGS = {spec["tag"]: name for name, spec in SPECS.items()}




def build_example(store: Path, name: str, tag: str, build_args: dict, target: str | None) -> None:
    for dep in SPECS[name].get("depends_on", []):
        if pybuild("inspect", dep, store=store, check=False).returncode != 0:
            other = TAGS[dep]
            build_example(store, other, dep, SPECS[other]["build_args"], SPECS[other]["target"])
    args = ["build", "-t", tag]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if target:
        args += ["--target", target]
    pybuild(*args, str(EXAMPLES / name), store=store)


def check_config(actual: dict, expected: dict) -> None:
    for key, want in expected.items():
        got = actual.get(key)
        if key == "Env":
            assert set(want) <= set(got or []), (key, got)
        elif key == "Labels":
            assert {k: (got or {}).get(k) for k in want} == want, (key, got)
        elif want in (None, []):
            assert got in (None, [], {}), (key, got)
        else:
            assert got == want, (key, got)


def test_at_least_ten_examples():
    assert len(SPECS) >= 10


@pytest.mark.parametrize("name", sorted(SPECS))
def test_example(store, name):
    spec = SPECS[name]
    build_example(store, name, spec["tag"], spec["build_args"], spec["target"])
    if not spec.get("long_running"):
        out = pybuild("run", "--rm", spec["tag"], store=store).stdout.decode()
        assert out == spec["expect_stdout"]
    for check in spec.get("checks", []):
        out = pybuild("run", "--rm", spec["tag"], *check["cmd"], store=store).stdout.decode()
        assert out == check["stdout"], check["cmd"]
    if "config" in spec:
        check_config(inspect(store, spec["tag"])["config"], spec["config"])
    for variant in spec.get("variants", []):
        build_example(store, name, variant["tag"], variant["build_args"], variant["target"])
        assert pybuild("run", "--rm", variant["tag"], store=store).stdout.decode() == variant["expect_stdout"]
