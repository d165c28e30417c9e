"""Stages, edges, ARG scoping, --target pruning, cycles."""
from __future__ import annotations

import pytest

from grammar.dag import build_graph, describe
from grammar.errors import PybuildError
from grammar.parser import parse

MULTI = """\
ARG BASE=alpine:3
ARG TAG
FROM ${BASE} AS deps
ARG PIP=24
FROM deps AS build
COPY --from=tools /bin/x /x
FROM busybox AS tools
FROM scratch AS unused
FROM build AS final
ARG TAG
COPY --from=0 /a /b
RUN --mount=type=bind,from=tools,target=/t true
"""


def graph(text=MULTI, **kw):
    return build_graph(parse(text), **kw)


def test_stages_and_edges():
    g = graph()
    assert [s.label for s in g.stages] == ["deps", "build", "tools", "unused", "final"]
    assert g.stages[0].base == "alpine:3" and g.stages[0].meta_args_used == ("BASE",)
    assert g.stages[1].parent == 0 and g.stages[1].deps == (0, 2)  # forward COPY --from is allowed
    assert g.stages[4].deps == (0, 1, 2)
    assert g.stages[3].is_scratch


def test_target_pruning():
    g = graph()
    assert [s.label for s in g.needed(g.target("build"))] == ["deps", "tools", "build"]
    assert "unused" not in [s.label for s in g.needed(g.target(None))]
    info = describe(g, "build")
    assert [s["needed"] for s in info["stages"]] == [True, True, True, False, False]
    with pytest.raises(PybuildError, match="target stage 'nope' could not be found"):
        g.target("nope")


def test_build_args_override_global_and_stage():
    g = graph(build_args={"BASE": "debian:12"})
    assert g.stages[0].base == "debian:12"


def test_global_arg_needs_redeclaration_in_stage():
    g = graph("ARG V=1\nFROM a\nCOPY --from=s${V} x y\nFROM b AS s1\nFROM c AS s\n")
    assert g.stages[0].deps == (2,)  # ${V} is not visible without ARG V in the stage
    g = graph("ARG V=1\nFROM a\nARG V\nCOPY --from=s${V} x y\nFROM b AS s1\n")
    assert g.stages[0].deps == (1,)


def test_from_earlier_stage_only_names_earlier():
    g = graph("FROM later\nFROM x AS later\n")
    assert g.stages[0].parent is None and g.stages[0].base == "later"


@pytest.mark.parametrize("text, line, words", [
    ("FROM a AS x\nCOPY --from=y /a /b\nFROM b AS y\nCOPY --from=x /a /b\n", 1, "circular dependency"),
    ("FROM a AS x\nCOPY --from=x /a /b\n", 1, "circular dependency"),
    ("FROM a AS build\nFROM b\nCOPY --from=biuld /a /b\n", 3, "did you mean 'build'"),
    ("FROM a\nCOPY --from=7 /a /b\n", 2, "there is no stage 7"),
    ("RUN x\nFROM a\n", 1, "before the first FROM"),
    ("ARG A\n", 1, "no FROM"),
    ("FROM a AS x\nFROM b AS x\n", 2, "duplicate stage name"),
    ("FROM ${NOPE}\n", 1, "empty image name"),
    ('FROM a\nENV X="unterminated\n', 2, "failed to process"),
])
def test_graph_errors(text, line, words):
    with pytest.raises(PybuildError) as info:
        graph(text)
    assert str(info.value).startswith(f"Dockerfile:{line}:") and words in str(info.value)


def test_copy_from_image_is_an_image_dep():
    g = graph("FROM a\nCOPY --from=nginx:1.25 /etc/nginx /n\n")
    assert g.stages[0].image_deps == ("nginx:1.25",) and g.stages[0].deps == ()
