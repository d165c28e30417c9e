"""Real registries for the registry tests: the distribution registry, a token issuer, a faulty proxy.

Everything listens on 127.0.0.1 on a free port and is stopped by its fixture.
- RegistryServer runs /usr/bin/docker-registry (Debian's docker-registry package,
  the reference distribution registry) with a config written per instance: open,
  htpasswd Basic auth, or token auth.
- TokenIssuer is the token service of the distribution token spec: it checks Basic
  credentials, grants the intersection of what is asked and what the user may do,
  and signs RS256 JWTs with a key whose self-signed certificate is the registry's
  rootcertbundle (cryptography if importable, else the openssl CLI).
- FaultProxy sits between pybuild and a registry and misbehaves on purpose: drops
  connections, answers 500/429, truncates or corrupts bodies; it logs every request.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def need_registry() -> None:
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("the distribution registry is not installed (apt-get install docker-registry)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------- the registry

class RegistryServer:
    """One docker-registry process with its own storage and config."""

    def __init__(self, workdir: Path, auth: dict | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.auth = auth
        self.tls = tls  # (certificate, key): serve HTTPS
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RegistryServer:
        need_registry()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            config = {
                "version": 0.1,
                "log": {"level": "info", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")}, "delete": {"enabled": True}},
                "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            }
            if self.auth:
                config["auth"] = self.auth
            if self.tls:
                config["http"]["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
            path = self.workdir / "config.yml"
            path.write_text(json.dumps(config, indent=1))  # JSON is YAML
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(path)], stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.log}:\n{self.log.read_text()[-2000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                conn = (http.client.HTTPSConnection(self.host, timeout=2, context=ssl._create_unverified_context())
                        if self.tls else http.client.HTTPConnection(self.host, timeout=2))
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- the token issuer

class _Signer:
    """An RSA key and its self-signed certificate; signs RS256 (cryptography, else the openssl CLI)."""

    def __init__(self, workdir: Path) -> None:
        self.key_file = workdir / "issuer.key"
        self.cert_file = workdir / "issuer.crt"
        try:
            self._make_with_cryptography()
        except ImportError:
            self._make_with_openssl()

    def _make_with_cryptography(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pybuild test token issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.sign = lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def _make_with_openssl(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available to sign tokens")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key_file),
                        "-out", str(self.cert_file), "-days", "1", "-subj", "/CN=pybuild test token issuer"],
                       check=True, capture_output=True)
        self.cert_der = subprocess.run([openssl, "x509", "-in", str(self.cert_file), "-outform", "DER"],
                                       check=True, capture_output=True).stdout
        self.sign = lambda data: subprocess.run([openssl, "dgst", "-sha256", "-sign", str(self.key_file)],
                                                input=data, check=True, capture_output=True).stdout


@dataclass
class TokenRequest:
    user: str | None
    scopes: list[str]
    granted: list[dict]
    status: int


@dataclass
class TokenIssuer:
    """users: name -> (password, {repository glob: [actions]}); `anonymous` is what no credentials get."""

    workdir: Path
    users: dict[str, tuple[str, dict[str, list[str]]]]
    anonymous: dict[str, list[str]] = field(default_factory=dict)
    service: str = "pybuild-test-registry"
    issuer: str = "pybuild-test-issuer"
    requests: list[TokenRequest] = field(default_factory=list)

    def start(self) -> TokenIssuer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.signer = _Signer(self.workdir)
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                status, body = issuer._answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict:
        """The `auth:` section of a registry config that trusts this issuer."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.signer.cert_file)}}

    def _answer(self, path: str, authorization: str) -> tuple[int, dict]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        scopes = query.get("scope", [])
        user: str | None = None
        allowed = self.anonymous
        if authorization.startswith("Basic "):
            name, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            entry = self.users.get(name)
            if entry is None or entry[0] != password:
                self.requests.append(TokenRequest(name, scopes, [], 401))
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
            user, allowed = name, entry[1]
        if query.get("service", [""])[0] != self.service:
            return 400, {"errors": [{"code": "INVALID", "message": "unknown service"}]}
        granted = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            may = set()
            for pattern, acts in allowed.items():
                if fnmatch.fnmatchcase(repo, pattern):
                    may |= set(acts)
            give = [a for a in actions.split(",") if a in may]
            granted.append({"type": "repository", "name": repo, "actions": give})
        self.requests.append(TokenRequest(user, scopes, granted, 200))
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.signer.cert_der).decode()]}
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": granted}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        token = signing_input + "." + _b64url(self.signer.sign(signing_input.encode()))
        return 200, {"token": token, "access_token": token, "expires_in": 300}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the faulty proxy

@dataclass
class Fault:
    """What the proxy does to matching requests, `times` times (-1: always).

    action: "drop" (close the connection without answering), "status" (answer `status`
    without asking the registry), "truncate" (send half the body, then close),
    "corrupt" (flip one byte of the body, keeping its length).
    """

    action: str
    method: str = ""
    path: str = ""
    status: int = 500
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0


@dataclass
class Logged:
    method: str
    path: str
    status: int  # what the client got; 0 when the connection was dropped
    fault: str = ""


class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if self.proxy._take_drop():
            request.close()  # the client's request meets a closed connection
            return
        super().process_request(request, client_address)


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.drop_connections = 0
        self.dropped = 0
        self.log: list[Logged] = []
        self._lock = threading.Lock()

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET  # noqa: N815

        self.server = _ProxyServer(("127.0.0.1", 0), Handler)
        self.server.proxy = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _take_drop(self) -> bool:
        with self._lock:
            if self.dropped < self.drop_connections:
                self.dropped += 1
                return True
            return False

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if (f.method in ("", method) and re.search(f.path, path)
                        and (f.times < 0 or f.hits < f.times)):
                    f.hits += 1
                    return f
        return None

    def _record(self, method: str, path: str, status: int, fault: str = "") -> None:
        with self._lock:
            self.log.append(Logged(method, path, status, fault))

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._fault_for(method, urllib.parse.urlsplit(path).path)
        if fault is not None and fault.action == "drop":
            self._record(method, path, 0, "drop")
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.action == "status":
            data = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected fault"}]}).encode()
            self._record(method, path, fault.status, "status")
            h.send_response(fault.status)
            for k, v in fault.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body if (body or method in ("PUT", "POST", "PATCH")) else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            upstream_length = resp.getheader("Content-Length")
        finally:
            conn.close()
        if fault is not None and fault.action == "corrupt" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        self._record(method, path, resp.status, fault.action if fault else "")
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", upstream_length if method == "HEAD" and upstream_length else str(len(data)))
        h.end_headers()
        if method == "HEAD":
            return
        if fault is not None and fault.action == "truncate":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    # ----------------------------------------------------------------- log queries

    def count(self, method: str, pattern: str = "") -> int:
        with self._lock:
            return sum(1 for e in self.log if e.method == method and re.search(pattern, e.path))

    def uploads(self) -> list[Logged]:
        """Requests that send blob data or start an upload (a mount is a POST too: see mounts())."""
        with self._lock:
            return [e for e in self.log if e.method in ("POST", "PATCH", "PUT") and "/blobs/uploads/" in e.path
                    and "mount=" not in e.path]

    def mounts(self) -> list[Logged]:
        with self._lock:
            return [e for e in self.log if e.method == "POST" and "mount=" in e.path]


# --------------------------------------------------------------------------- helpers

def store_blobs_intact(root: Path) -> list[str]:
    """Names of blobs under root/blobs/sha256 whose content does not hash to their name (empty: all good)."""
    bad = []
    for p in (root / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != p.name:
            bad.append(p.name)
    return bad


def make_tls_cert(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 (openssl CLI): (certificate, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is not installed")
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def htpasswd_line(user: str, password: str) -> str:
    tool = shutil.which("htpasswd")
    if tool is None:
        pytest.skip("htpasswd is not installed (apt-get install apache2-utils)")
    return subprocess.run([tool, "-Bbn", user, password], check=True, capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry-plain")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    need_registry()
    work = tmp_path_factory.mktemp("registry-basic")
    (work / "htpasswd").write_text(htpasswd_line("alice", "wonderland") + "\n")
    server = RegistryServer(work, {"htpasswd": {"realm": "pybuild-test", "path": str(work / "htpasswd")}}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    need_registry()
    issuer = TokenIssuer(tmp_path_factory.mktemp("token-issuer"), users={
        "alice": ("wonderland", {"team/*": ["pull", "push"], "public/*": ["pull", "push"]}),
        "bob": ("builder", {"team/*": ["pull"]}),
    }, anonymous={"public/*": ["pull"]}).start()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_issuer: TokenIssuer) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry-token"), token_issuer.registry_auth()).start()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(plain_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(plain_registry.host).start()
    yield proxy
    proxy.stop()
