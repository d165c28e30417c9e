"""End to end: real builds from a busybox base, run with `pybuild run`, checked file by file."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import needs_root, pybuild







def build(store: Path, ctx: Path, dockerfile: str, *args: str, files: dict[str, str] | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx / name).write_text(text)
    return pybuild("build", "--progress", "plain", *args, str(ctx), store=store, check=check)


def run(store: Path, image: str, *cmd: str) -> str:
    return pybuild("run", "--rm", image, *cmd, store=store).stdout.decode()


def inspect(store: Path, image: str) -> dict:
    return json.loads(pybuild("inspect", image, store=store).stdout)[0]


def layer_members(store: Path, image: str, index: int) -> dict[str, tarfile.TarInfo]:
    info = inspect(store, image)
    digest = info["rootfs"]["diff_ids"][index].split(":")[1]
    with tarfile.open(store / "blobs" / "sha256" / digest) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_files_modes_owners_and_config(store, tmp_path):
    dockerfile = """\
FROM busybox
LABEL org.example.name=demo
ENV APP_HOME=/srv/app
WORKDIR $APP_HOME
COPY app.sh ./
COPY --chown=app:staff --chmod=750 app.sh bin/run
RUN chmod 4755 app.sh && ln -s app.sh link && ln app.sh hard && mkfifo pipe
USER app
EXPOSE 8080 9000/udp
VOLUME /data
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s CMD true
ENTRYPOINT ["/bin/sh"]
CMD ["-c", "echo $APP_HOME && id -u"]
"""
    build(store, tmp_path, dockerfile, "-t", "demo:1", files={"app.sh": "#!/bin/sh\necho app\n"})
    assert run(store, "demo:1") == "/srv/app\n1000\n"
    listing = run(store, "demo:1", "-c", "stat -c '%n %a %U:%G' /srv/app/app.sh /srv/app/bin/run; readlink link")
    assert listing == "/srv/app/app.sh 4755 root:root\n/srv/app/bin/run 750 app:staff\napp.sh\n"
    cfg = inspect(store, "demo:1")["config"]
    assert cfg["Env"][-1] == "APP_HOME=/srv/app" and cfg["WorkingDir"] == "/srv/app" and cfg["User"] == "app"
    assert cfg["Labels"] == {"org.example.name": "demo"}
    assert set(cfg["ExposedPorts"]) == {"8080/tcp", "9000/udp"} and set(cfg["Volumes"]) == {"/data"}
    assert cfg["Entrypoint"] == ["/bin/sh"] and cfg["StopSignal"] == "SIGTERM"
    assert cfg["Healthcheck"]["Test"] == ["CMD-SHELL", "true"] and cfg["Healthcheck"]["Interval"] == 5 * 10**9
    members = layer_members(store, "demo:1", -1)  # the RUN's layer
    assert members["srv/app/app.sh"].mode & 0o7777 == 0o4755
    assert members["srv/app/link"].issym() and members["srv/app/hard"].islnk()
    assert members["srv/app/pipe"].isfifo()
    assert not any(name.startswith(("etc/hosts", "etc/resolv", "etc/hostname", "proc/", "dev/")) for name in members)


def test_whiteouts_and_opaque_dirs(store, tmp_path):
    build(store, tmp_path, "FROM busybox\nRUN mkdir -p /d/sub && touch /d/sub/x /d/keep\n"
          "RUN rm /bin/vi && rm -rf /d && mkdir /d && touch /d/new\n", "-t", "wh:1")
    members = layer_members(store, "wh:1", -1)
    assert "bin/.wh.vi" in members and "d/.wh..wh..opq" in members
    assert run(store, "wh:1", "sh", "-c", "ls /d; test -e /bin/vi || echo gone") == "new\ngone\n"


def test_multistage_target_and_copy_from(store, tmp_path):
    dockerfile = """\
FROM busybox AS build
RUN mkdir /out && echo built > /out/artifact
FROM busybox AS test
RUN echo testing && exit 3
FROM scratch AS release
COPY --from=build /out/artifact /artifact
COPY --from=busybox:latest /bin/busybox /busybox
CMD ["/busybox", "cat", "/artifact"]
"""
    out = build(store, tmp_path, dockerfile, "-t", "rel:1", "--target", "release")
    assert b"testing" not in out.stderr  # the test stage is not needed by the target
    assert run(store, "rel:1") == "built\n"
    assert len(inspect(store, "rel:1")["rootfs"]["diff_ids"]) == 2
    failed = build(store, tmp_path, dockerfile, "-t", "rel:2", "--target", "test", check=False)
    assert failed.returncode == 1
    err = failed.stderr.decode()
    assert "Dockerfile:4: RUN failed with exit code 3" in err and "Traceback" not in err
    assert pybuild("inspect", "rel:2", store=store, check=False).returncode == 1  # no tag for a failed build


def test_add_archives_and_plain_files(store, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name, mode in (("a.tar", "w"), ("b.tar.gz", "w:gz"), ("c.tar.xz", "w:xz")):
        with tarfile.open(ctx / name, mode) as tar:
            data = f"from {name}\n".encode()
            member = tarfile.TarInfo(f"pkg/{name}.txt")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    build(store, ctx, "FROM busybox\nADD a.tar b.tar.gz c.tar.xz /opt/\nADD --unpack=false a.tar /raw/\n"
          "ADD notes.txt /notes/\n", "-t", "add:1", files={"notes.txt": "plain\n"})
    out = run(store, "add:1", "sh", "-c", "cat /opt/pkg/*.txt; ls /raw; cat /notes/notes.txt")
    assert out == "from a.tar\nfrom b.tar.gz\nfrom c.tar.xz\na.tar\nplain\n"


def test_dockerignore_and_sources_outside_context(store, tmp_path):
    files = {".dockerignore": "# comment\n*.log\nsecret/\n!keep.log\n", "a.log": "x", "keep.log": "k",
             "secret/key": "s", "src/main.txt": "m"}
    build(store, tmp_path / "c", "FROM busybox\nCOPY . /ctx/\n", "-t", "ign:1", files=files)
    assert run(store, "ign:1", "sh", "-c", "cd /ctx && find . -type f | sort") == \
        "./.dockerignore\n./Dockerfile\n./keep.log\n./src/main.txt\n"
    bad = build(store, tmp_path / "d", "FROM busybox\nCOPY ../etc/passwd /x\n", check=False)
    assert bad.returncode == 1 and "Dockerfile:2:" in bad.stderr.decode() and "outside" in bad.stderr.decode()


def test_onbuild_triggers_run_in_child_build(store, tmp_path):
    build(store, tmp_path / "base", "FROM busybox\nONBUILD COPY msg.txt /msg.txt\nONBUILD RUN echo seen >> /msg.txt\n",
          "-t", "obase:1")
    assert inspect(store, "obase:1")["config"]["OnBuild"] == ["COPY msg.txt /msg.txt", "RUN echo seen >> /msg.txt"]
    build(store, tmp_path / "child", "FROM obase:1\nCMD [\"cat\", \"/msg.txt\"]\n", "-t", "ochild:1",
          files={"msg.txt": "hello\n"})
    assert run(store, "ochild:1") == "hello\nseen\n"
    assert inspect(store, "ochild:1")["config"].get("OnBuild") in (None, [])


def test_build_args_and_heredocs(store, tmp_path):
    dockerfile = (
        "ARG BASE=busybox\n"
        "FROM ${BASE}\n"
        "ARG GREETING=hello\n"
        "ARG UNUSED=x\n"
        "ENV WHO=world\n"
        "COPY <<EOF /etc/motd\n"
        "$GREETING $WHO\n"
        "EOF\n"
        "RUN <<-'SCRIPT'\n"
        "\techo \"$GREETING from $WHO\" > /out\n"
        "\tSCRIPT\n"
        "CMD cat /etc/motd /out\n"
    )
    build(store, tmp_path, dockerfile, "-t", "args:1", "--build-arg", "GREETING=hi")
    assert run(store, "args:1") == "hi world\nhi from world\n"


def test_context_from_stdin(store, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in (("Dockerfile", "FROM busybox\nCOPY x /x\nCMD [\"cat\", \"/x\"]\n"), ("x", "stdin\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    out = pybuild("build", "-q", "-t", "stdin:1", "-", store=store, input=buf.getvalue())
    assert out.stdout.decode().startswith("sha256:")
    assert run(store, "stdin:1") == "stdin\n"


def test_import_with_changes_and_image_commands(store, tmp_path, busybox_tar):
    pybuild("import", "--change", "ENV A=1", "--change", 'CMD ["echo", "imported"]', str(busybox_tar), "imp:1",
            store=store)
    assert run(store, "imp:1") == "imported\n"
    pybuild("tag", "imp:1", "imp:2", store=store)
    names = pybuild("images", "--format", "json", store=store).stdout
    assert "imp" in names.decode()
    assert b"Untagged" in pybuild("rmi", "imp:2", store=store).stdout
    bad = pybuild("import", "--change", "RUN x", str(busybox_tar), "imp:3", store=store, check=False)
    assert bad.returncode == 1 and b"cannot be applied by import" in bad.stderr


def test_save_load_round_trip(store, tmp_path):
    build(store, tmp_path / "s", "FROM busybox\nRUN echo saved > /s\nCMD [\"cat\", \"/s\"]\n", "-t", "save:1")
    iid = inspect(store, "save:1")["Id"]
    for fmt in ("docker", "oci"):
        archive = tmp_path / f"save-{fmt}.tar"
        pybuild("save", "--format", fmt, "-o", str(archive), "save:1", store=store)
        fresh = tmp_path / f"fresh-{fmt}"
        pybuild("load", "-i", str(archive), store=fresh)
        assert inspect(fresh, "save:1")["Id"] == iid
        assert run(fresh, "save:1") == "saved\n"


def docker_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_loads_and_runs_what_pybuild_saved(store, tmp_path):
    if not docker_available():
        pytest.skip("no Docker engine answers (CI starts dockerd via .ci/dockerd-up)")
    build(store, tmp_path, "FROM busybox\nRUN echo from-docker > /m\nCMD [\"cat\", \"/m\"]\n", "-t",
          "pybuild-e2e/docker:1")
    archive = tmp_path / "img.tar"
    pybuild("save", "-o", str(archive), "pybuild-e2e/docker:1", store=store)
    subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
    try:
        out = subprocess.run(["docker", "run", "--rm", "--network", "none", "pybuild-e2e/docker:1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "from-docker\n"
    finally:
        subprocess.run(["docker", "rmi", "-f", "pybuild-e2e/docker:1"], capture_output=True)


def test_add_url_with_checksum(store, tmp_path):
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "tool.txt").write_text("downloaded\n")
    digest = hashlib.sha256(b"downloaded\n").hexdigest()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tool.txt"
    try:
        build(store, tmp_path / "ok", f"FROM busybox\nADD --checksum=sha256:{digest} {url} /opt/\n", "-t", "url:1")
        assert run(store, "url:1", "sh", "-c", "cat /opt/tool.txt; stat -c %a /opt/tool.txt") == "downloaded\n600\n"
        bad = build(store, tmp_path / "bad", f"FROM busybox\nADD --checksum=sha256:{'0' * 64} {url} /opt/\n",
                    check=False)
        assert bad.returncode == 1 and "Dockerfile:2:" in bad.stderr.decode()
        assert "checksum mismatch" in bad.stderr.decode()
    finally:
        server.shutdown()


def test_predefined_platform_args(store, tmp_path):
    build(store, tmp_path, "FROM busybox\nARG TARGETOS\nARG TARGETARCH\nARG BUILDPLATFORM\n"
          "RUN echo $TARGETOS/$TARGETARCH $BUILDPLATFORM > /p\n", "-t", "plat:1")
    out = run(store, "plat:1", "cat", "/p").split()
    assert out[0].startswith("linux/") and out[1].startswith("linux/")


def test_source_date_epoch_gives_the_same_image_in_two_stores(tmp_path, busybox_tar):
    needs_root()
    digests = []
    for n in range(2):
        root = tmp_path / f"store{n}"
        os.environ["SOURCE_DATE_EPOCH"] = "1600000000"  # the base too: as if both pulled the same image
        try:
            pybuild("import", "--message", "base", str(busybox_tar), "busybox:latest", store=root)
        finally:
            del os.environ["SOURCE_DATE_EPOCH"]
        dockerfile = "FROM busybox\nCOPY app.txt /app/\nRUN echo built > /app/out && mkdir /app/d\nCMD [\"true\"]\n"
        build(root, tmp_path / f"elsewhere{n}" / "ctx", dockerfile, "-t", "repro:1",
              "--build-arg", "SOURCE_DATE_EPOCH=1700000000", files={"app.txt": "same\n"})
        info = inspect(root, "repro:1")
        assert info["created"] == "2023-11-14T22:13:20Z"
        digests.append((info["ManifestDigest"], info["Id"]))
        time.sleep(1.1)  # a second build a second later: its file times differ before clamping
    assert digests[0] == digests[1]


def test_secrets_reach_run_but_never_the_image(store, tmp_path, monkeypatch):
    (tmp_path / "token.txt").write_text("s3cr3t-file")
    monkeypatch.setenv("API_TOKEN", "s3cr3t-env")
    dockerfile = ("FROM busybox\n"
                  "RUN --mount=type=secret,id=tok cat /run/secrets/tok > /seen-file\n"
                  "RUN --mount=type=secret,id=api,env=API cat /dev/null && echo $API > /seen-env\n"
                  "RUN --mount=type=secret,id=absent true\n")
    build(store, tmp_path / "ctx", dockerfile, "-t", "sec:1", "--secret", f"id=tok,src={tmp_path / 'token.txt'}",
          "--secret", "id=api,env=API_TOKEN")
    assert run(store, "sec:1", "cat", "/seen-file", "/seen-env") == "s3cr3t-files3cr3t-env\n"
    assert run(store, "sec:1", "sh", "-c", "ls /run/secrets 2>&1 || true").strip() in ("", "ls: /run/secrets: No such file or directory")
    info = json.dumps(inspect(store, "sec:1"))
    assert "s3cr3t" not in info
    missing = build(store, tmp_path / "ctx2", "FROM busybox\nRUN --mount=type=secret,id=must,required=true true\n",
                    check=False)
    assert missing.returncode == 1 and b"secret 'must' is required" in missing.stderr
