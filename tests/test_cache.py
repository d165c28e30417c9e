"""The layer cache: hits when nothing changed, misses exactly where something did, and says why."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, pybuild
from test_build import inspect

DOCKERFILE = """\
FROM busybox
ARG USED=1
ARG UNUSED_HERE
ENV MODE=$USED
COPY a.txt /a/
COPY dir/ /d/
RUN cat /a/a.txt /d/* > /all && echo "$MODE" >> /all
COPY b.txt /b/
CMD ["cat", "/all"]
"""




def make_context(path: Path) -> Path:
    (path / "dir").mkdir(parents=True)
    (path / "Dockerfile").write_text(DOCKERFILE)
    (path / "a.txt").write_text("a\n")
    (path / "b.txt").write_text("b\n")
    (path / "dir" / "one").write_text("1\n")
    (path / "dir" / "two").write_text("2\n")
    (path / ".dockerignore").write_text("dir/*.log\n")
    return path


def build(store: Path, ctx: Path, *args: str) -> dict[str, str]:
    """Build; return each step's instruction -> 'CACHED' or 'RAN', plus '_explain' lines and '_out'."""
    out = pybuild("build", "--progress", "plain", "--explain", "-t", "cache:test", *args, str(ctx), store=store)
    text = out.stderr.decode()
    titles = dict(re.findall(r"^#(\d+) \[[^\]]*\d+/\d+\] (.*)$", text, re.M))
    states = {}
    for number, title in titles.items():
        states[title] = "CACHED" if re.search(rf"^#{number} CACHED$", text, re.M) else "RAN"
    states["_explain"] = "\n".join(re.findall(r"cache miss: (.*)$", text, re.M))
    return states


def ran(states: dict[str, str]) -> list[str]:
    return [t for t, s in states.items() if s == "RAN" and not t.startswith("_") and t.split()[0] in
            ("COPY", "RUN", "ADD")]


LAYER_STEPS = ["COPY a.txt /a/", "COPY dir/ /d/", 'RUN cat /a/a.txt /d/* > /all && echo "$MODE" >> /all',
               "COPY b.txt /b/"]


def test_identical_inputs_hit_even_from_a_moved_context(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    first = inspect(store, "cache:test")["Id"]
    assert ran(build(store, ctx)) == []
    moved = tmp_path / "elsewhere" / "ctx2"
    moved.parent.mkdir()
    shutil.move(ctx, moved)
    assert ran(build(store, moved)) == []
    assert inspect(store, "cache:test")["Id"] == first  # the image id is stable too


@pytest.mark.parametrize("edit, first_miss, reason", [
    (lambda c: (c / "a.txt").write_text("A\n"), 0, "files changed: a.txt"),
    (lambda c: (c / "dir" / "three").write_text("3\n"), 1, "files appeared: dir/three"),
    (lambda c: (c / "dir" / "two").unlink(), 1, "files vanished: dir/two"),
    (lambda c: os.chmod(c / "dir" / "one", 0o600), 1, "files changed: dir/one"),
    (lambda c: (c / "b.txt").write_text("B\n"), 3, "files changed: b.txt"),
])
def test_an_edit_rebuilds_exactly_the_copy_that_selects_it_and_after(store, tmp_path, edit, first_miss, reason):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    edit(ctx)
    states = build(store, ctx)
    assert ran(states) == LAYER_STEPS[first_miss:]
    assert states["_explain"].splitlines()[0] == reason
    if first_miss < 3:
        assert "the step before it changed" in states["_explain"]


def test_relinking_a_symlink_misses(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    (ctx / "dir" / "link").symlink_to("one")
    build(store, ctx)
    (ctx / "dir" / "link").unlink()
    (ctx / "dir" / "link").symlink_to("two")
    states = build(store, ctx)
    assert ran(states)[0] == "COPY dir/ /d/" and "dir/link" in states["_explain"]


def test_ignored_files_never_cause_a_rebuild(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    (ctx / "dir" / "debug.log").write_text("noise\n")
    assert ran(build(store, ctx)) == []


def test_build_args_used_and_unused(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    assert ran(build(store, ctx, "--build-arg", "NOT_DECLARED=x")) == []
    states = build(store, ctx, "--build-arg", "USED=2")
    assert ran(states) == LAYER_STEPS  # ENV MODE=$USED comes first and changes what every step sees
    assert states["_explain"].splitlines()[0] == "env MODE changed from '1' to '2'"
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY a.txt /a/\nARG LATE=1\nRUN echo $LATE > /late\n")
    build(store, ctx)
    states = build(store, ctx, "--build-arg", "LATE=2")
    assert ran(states) == ["RUN echo $LATE > /late"]
    assert states["_explain"] == "build arg LATE changed from '1' to '2'"


def test_explain_base_image_moved_and_no_earlier_build(store, tmp_path, busybox_tar):
    ctx = make_context(tmp_path / "ctx")
    (ctx / "Dockerfile").write_text("FROM busybox:moving\nRUN echo unique-step-for-this-test > /x\n")
    pybuild("import", str(busybox_tar), "busybox:moving", store=store)
    states = build(store, ctx)
    assert states["_explain"] == "no earlier build of this step"
    pybuild("import", "--change", "ENV MOVED=1", str(busybox_tar), "busybox:moving", store=store)
    states = build(store, ctx)
    assert states["_explain"].startswith("the base image moved: busybox:moving was sha256:")


def test_unneeded_stage_is_not_built(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    (ctx / "Dockerfile").write_text("FROM busybox AS a\nRUN exit 1\nFROM busybox AS b\nRUN echo b > /b\n")
    states = build(store, ctx, "--target", "b")
    assert "RUN exit 1" not in states


def test_no_cache_and_no_cache_filter(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    assert ran(build(store, ctx, "--no-cache")) == LAYER_STEPS
    assert ran(build(store, ctx, "--no-cache-filter", "stage-0")) == LAYER_STEPS
    assert ran(build(store, ctx)) == []


def test_cache_mount_survives_between_builds_and_stays_out_of_the_layer(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    (ctx / "Dockerfile").write_text(
        "FROM busybox\nARG N\nRUN --mount=type=cache,target=/cache,id=counter "
        "echo run >> /cache/runs && wc -l < /cache/runs > /count\nCMD [\"cat\", \"/count\"]\n")
    build(store, ctx, "--build-arg", "N=1")
    build(store, ctx, "--build-arg", "N=2")
    out = pybuild("run", "--rm", "cache:test", store=store).stdout.decode().strip()
    assert int(out) >= 2
    members = subprocess.run(["tar", "-tf", str(store / "blobs" / "sha256" /
                                                 inspect(store, "cache:test")["rootfs"]["diff_ids"][-1][7:])],
                             capture_output=True, text=True).stdout.split()
    assert "count" in members and not any(m.startswith("cache") for m in members)


def test_killed_build_leaves_no_false_hit(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY a.txt /a\nRUN sleep 30 && echo done > /slow\n")
    env = {**os.environ, "PYBUILD_ROOT": str(store), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "--progress", "plain", "-t", "killed:1",
                             str(ctx)], env=env, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 30
    seen = b""
    while b"RUN sleep" not in seen and time.time() < deadline:
        seen += proc.stderr.read1(4096)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY a.txt /a\nRUN echo fast > /slow\n")
    states = build(store, ctx)
    assert states['RUN echo fast > /slow'] == "RAN"
    assert pybuild("run", "--rm", "cache:test", "cat", "/slow", store=store).stdout == b"fast\n"
    assert pybuild("inspect", "killed:1", store=store, check=False).returncode == 1


def rootfs_listing(store: Path, image: str) -> str:
    script = "find /a /d /all /all-context | sort | " \
             "while read -r f; do if [ -f \"$f\" ] && [ ! -L \"$f\" ]; then echo \"$f $(stat -c %a \"$f\") " \
             "$(md5sum < \"$f\" | cut -c1-8)\"; elif [ -L \"$f\" ]; then echo \"$f -> $(readlink \"$f\")\"; " \
             "else echo \"$f $(stat -c %a \"$f\")\"; fi; done"
    return pybuild("run", "--rm", image, "sh", "-c", script, store=store).stdout.decode()


EDITS = st.lists(st.tuples(st.sampled_from(["write", "remove", "chmod", "link", "mkfile"]),
                           st.sampled_from(["a.txt", "b.txt", "dir/one", "dir/two", "dir/new", "dir/x.log"]),
                           st.integers(0, 3)), min_size=1, max_size=4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(EDITS)
def test_property_cached_build_equals_no_cache_build(store, tmp_path_factory, edits):
    ctx = make_context(tmp_path_factory.mktemp("prop") / "ctx")
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("COPY b.txt /b/", "COPY . /all-context/")
                                    .replace('>> /all', '>> /all; true'))
    build(store, ctx)
    for action, name, n in edits:
        path = ctx / name
        if action == "remove" and name not in ("a.txt",):
            path.unlink(missing_ok=True) if not path.is_dir() else None
        elif action == "chmod" and path.exists():
            os.chmod(path, 0o600 + n)
        elif action == "link" and name.startswith("dir/"):
            path.unlink(missing_ok=True)
            path.symlink_to("../a.txt" if n % 2 else ("two" if name != "dir/two" else "one"))
        else:
            if path.is_symlink():
                path.unlink()
            path.write_text(f"{action}-{n}\n")
        build(store, ctx)
        cached = rootfs_listing(store, "cache:test")
        build(store, ctx, "--no-cache")
        assert cached == rootfs_listing(store, "cache:test")


def test_du_and_prune_never_touch_tagged_images(store, tmp_path):
    ctx = make_context(tmp_path / "ctx")
    build(store, ctx)
    (ctx / "a.txt").write_text("changed\n")
    build(store, ctx)  # the first image is now untagged, its layers kept by the cache
    usage = json.loads(pybuild("du", "--format", "json", store=store).stdout)
    assert usage["cache_entries"] > 0 and usage["total_bytes"] > 0
    out = pybuild("prune", "--keep-storage", "0", store=store).stdout.decode()
    assert re.match(r"removed \d+ cache entries, \d+ untagged images and \d+ blobs/layers", out)
    after = json.loads(pybuild("du", "--format", "json", store=store).stdout)
    assert after["cache_only_bytes"] == 0 and after["unreferenced_bytes"] == 0
    assert pybuild("run", "--rm", "cache:test", "cat", "/a/a.txt", store=store).stdout == b"changed\n"
    assert pybuild("run", "--rm", "busybox:latest", "true", store=store).returncode == 0
    pybuild("prune", "--filter", "until=1h", store=store)
    assert pybuild("prune", "--filter", "since=1h", store=store, check=False).returncode == 1
    pybuild("prune", "--all", store=store)
    assert ran(build(store, ctx)) == LAYER_STEPS  # nothing left to hit


def test_two_builds_at_once_share_the_store_and_cache(store, tmp_path):
    env = {**os.environ, "PYBUILD_ROOT": str(store), "PYTHONPATH": str(ROOT)}
    contexts = []
    for n in range(2):
        ctx = make_context(tmp_path / f"ctx{n}")
        (ctx / "Dockerfile").write_text(f"FROM busybox\nCOPY a.txt /a\nRUN echo {n} > /n && sleep 0.5\n"
                                        f"COPY dir/ /d/\nRUN echo parallel-{n} >> /n\n")
        contexts.append(ctx)
    procs = [subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "-q", "-t", f"par:{n}", str(ctx)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n, ctx in enumerate(contexts)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    for n, ctx in enumerate(contexts):
        assert pybuild("run", "--rm", f"par:{n}", "cat", "/n", store=store).stdout.decode() == f"{n}\nparallel-{n}\n"
        out = pybuild("build", "--progress", "plain", "-t", f"par:{n}", str(ctx), store=store).stderr.decode()
        assert out.count("CACHED") == 4
