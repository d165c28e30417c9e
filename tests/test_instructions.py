"""Typed instructions: every flag carried or rejected, arity and option checks with line numbers."""
from __future__ import annotations

import pytest

from grammar import instructions as ins
from grammar.errors import PybuildError
from grammar.parser import parse


def convert(text: str):
    return ins.convert(parse(text))


def error_of(text: str) -> str:
    with pytest.raises(PybuildError) as info:
        convert(text)
    return str(info.value)


def test_from_forms():
    f1, f2 = convert("FROM --platform=linux/arm64 alpine:3 AS Build\nFROM scratch\n")
    assert (f1.image, f1.stage_name, f1.platform) == ("alpine:3", "build", "linux/arm64")
    assert (f2.image, f2.stage_name) == ("scratch", None)


def test_run_flags_carried():
    (_, run) = convert("FROM a\nRUN --mount=type=cache,target=/root/.cache,id=pip,sharing=locked "
                       "--mount=type=secret,id=tok --mount=type=bind,from=build,source=/out,target=/in,rw "
                       "--mount=type=tmpfs,target=/t,size=64m --network=none --security=sandbox make\n")
    cache, secret, bind, tmpfs = run.mounts
    assert (cache.type, cache.target, cache.id, cache.sharing) == ("cache", "/root/.cache", "pip", "locked")
    assert (secret.type, secret.target) == ("secret", "/run/secrets/tok")
    assert (bind.from_, bind.source, bind.readonly) == ("build", "/out", False)
    assert tmpfs.size == 64 * 1024 * 1024
    assert (run.network, run.security, run.command.shell_text) == ("none", "sandbox", "make")


def test_copy_add_flags_carried():
    _, copy, add = convert("FROM a\nCOPY --from=0 --chown=app:app --chmod=755 --link --parents "
                           "--exclude=*.md --exclude=.git a b /dst/\n"
                           "ADD --checksum=sha256:abc123 --keep-git-dir=true --unpack=false --chown=1 x.tgz /o\n")
    assert (copy.from_, copy.chown, copy.chmod, copy.link, copy.parents) == ("0", "app:app", "755", True, True)
    assert copy.excludes == ("*.md", ".git") and copy.sources == ("a", "b") and copy.dest == "/dst/"
    assert (add.checksum, add.keep_git_dir, add.unpack, add.chown) == ("sha256:abc123", True, False, "1")


def test_healthcheck():
    _, h1, h2, h3 = convert("FROM a\nHEALTHCHECK --interval=1m30s --retries=3 CMD curl -f x\n"
                            "HEALTHCHECK CMD [\"/bin/check\", \"-q\"]\nHEALTHCHECK NONE\n")
    assert h1.test == ("CMD-SHELL", "curl -f x") and h1.interval == 90 * 10**9 and h1.retries == 3
    assert h2.test == ("CMD", "/bin/check", "-q")
    assert h3.test == ("NONE",)


def test_env_label_arg_onbuild():
    _, env, label, arg, onb = convert('FROM a\nENV A=1 B="x y"\nLABEL k v w\nARG X Y=2\nONBUILD COPY . /app\n')
    assert env.pairs == (("A", "1"), ("B", '"x y"'))
    assert label.pairs == (("k", "v w"),)
    assert arg.args == (("X", None), ("Y", "2"))
    assert isinstance(onb.trigger, ins.Copy) and onb.expression == "COPY . /app"


@pytest.mark.parametrize("text, line, words", [
    ("FROM a\nRUNN x\n", 2, "unknown instruction: RUNN (did you mean RUN?)"),
    ("FROM a\nCOPY --chwon=1 a b\n", 2, "unknown flag: --chwon"),
    ("FROM a\nRUN --mount=type=cache echo\n", 2, "needs a target"),
    ("FROM a\nRUN --mount=type=cache,target=/x,bogus=1 echo\n", 2, "unexpected key 'bogus'"),
    ("FROM a\nRUN --mount=type=nfs,target=/x echo\n", 2, "unsupported mount type"),
    ("FROM a\nRUN --network=bridge echo\n", 2, "invalid --network"),
    ("FROM a\nCOPY --from=a --from=b x y\n", 2, "duplicate flag"),
    ("FROM a\nCOPY --from x y\n", 2, "missing a value on flag: --from"),
    ("FROM a\nCOPY --link=maybe x y\n", 2, "expecting boolean"),
    ("FROM a\nCOPY x\n", 2, "at least two arguments"),
    ("FROM a\nRUN\n", 2, "RUN requires"),
    ("FROM a\nWORKDIR\n", 2, "WORKDIR requires"),
    ("FROM a b\n", 1, "one or three arguments"),
    ("FROM a AS 9bad\n", 1, "invalid stage name"),
    ("FROM a\nSHELL /bin/bash -c\n", 2, "JSON form"),
    ("FROM a\nHEALTHCHECK --interval=5 CMD x\n", 2, "invalid --interval"),
    ("FROM a\nHEALTHCHECK CONNECT TCP 7000\n", 2, "unknown type"),
    ("FROM a\nONBUILD ONBUILD RUN x\n", 2, "ONBUILD ONBUILD"),
    ("FROM a\nONBUILD FROM b\n", 2, "isn't allowed as an ONBUILD trigger"),
    ("FROM a\nENV --x=1 A=b\n", 2, "ENV takes no flags"),
    ("FROM a\nADD --checksum=md5:x a b\n", 2, "invalid --checksum"),
    ("FROM a\nCOPY --chmod=999 a b\n", 2, "invalid --chmod"),
])
def test_mistakes_name_line_and_fix(text, line, words):
    message = error_of(text)
    assert message.startswith(f"Dockerfile:{line}: ")
    assert words in message


def test_durations():
    assert ins.parse_duration("1h2m3.5s") == 3723_500_000_000
    assert ins.parse_duration("500ms") == 500_000_000
    assert ins.parse_duration("5") is None and ins.parse_duration("") is None
