"""Registry credentials and authentication: Docker's config.json, credential helpers, Basic and Bearer.

Credentials live where `docker login` keeps them (``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``), so pybuild, docker, skopeo and buildah share one login.
Lookup order as Docker: ``credHelpers[registry]``, then ``credsStore``, then
``auths``. A helper is the program ``docker-credential-<name>`` speaking JSON on
stdin/stdout.

Authentication follows the distribution spec: a 401 names a scheme. ``Basic``
means send the credentials with every request; ``Bearer realm=..,service=..``
means ask the realm for a token covering the scopes an operation needs
(``repository:team/app:pull,push``), anonymously or with the credentials, and
send that; tokens are cached per scope set until they expire.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grammar.errors import PybuildError

from .transfer import HttpClient

DOCKER_HUB_KEY = "https://index.docker.io/v1/"  # the key Docker uses for docker.io in config.json
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_LOGIN_HINT = "pybuild login"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------- config.json

def default_config_path() -> Path:
    """Where Docker keeps config.json: $DOCKER_CONFIG, else ~/.docker."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


def registry_host(text: str) -> str:
    """What `pybuild login X` names, as references spell it: `https://index.docker.io/v1/` is docker.io."""
    host = _host_of(text.strip())
    if not host:
        raise PybuildError(f"invalid registry {text!r}: expected host[:port], e.g. registry.example.com:5000")
    return "docker.io" if host in _HUB_ALIASES else host


def config_key(registry: str) -> str:
    """The key Docker files a registry's login under (docker.io is the v1 index URL)."""
    return DOCKER_HUB_KEY if _host_of(registry) in _HUB_ALIASES else registry


def _host_of(key: str) -> str:
    """A config.json key reduced to host[:port]: Docker accepts `https://host/v1/` and plain `host`."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc or key
    return key.split("/", 1)[0].lower()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PybuildError(f"cannot read {path}: {e.strerror}; fix its permissions or pass another config") from None
    if not text.strip():
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise PybuildError(f"{path} is not valid JSON ({e}); fix or remove it, then log in again") from None
    if not isinstance(obj, dict):
        raise PybuildError(f"{path} is not a JSON object; fix or remove it, then log in again")
    return obj


def _write_config(path: Path, obj: dict[str, Any]) -> None:
    """Replace config.json atomically, mode 0600 (it holds passwords)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(obj, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _find_entry(table: Any, registry: str) -> tuple[str, Any] | None:
    """The (key, value) of `table` that names registry, exact key first."""
    if not isinstance(table, dict):
        return None
    want = config_key(registry)
    if want in table:
        return want, table[want]
    host = _host_of(registry)
    hub = host in _HUB_ALIASES
    for key, value in table.items():
        other = _host_of(str(key))
        if other == host or (hub and other in _HUB_ALIASES):
            return str(key), value
    return None


def _helper_program(name: str) -> str:
    prog = f"docker-credential-{name}"
    path = shutil.which(prog)
    if path is None:
        raise PybuildError(f"the credential helper {prog} named in config.json is not installed; install it "
                           "or remove it from config.json")
    return path


def _run_helper(name: str, action: str, payload: str) -> str | None:
    """Run docker-credential-<name> <action>; None when it has no credentials for that server."""
    prog = _helper_program(name)
    try:
        done = subprocess.run([prog, action], input=payload, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PybuildError(f"the credential helper {prog} failed to run ({e}); check it works with "
                           f"`echo SERVER | {os.path.basename(prog)} get`") from None
    if done.returncode != 0:
        message = (done.stdout + done.stderr).strip()
        if "not found" in message.lower():
            return None
        raise PybuildError(f"the credential helper {prog} {action} failed: {message or f'exit {done.returncode}'}")
    return done.stdout


def _from_helper(name: str, registry: str) -> Credentials | None:
    out = _run_helper(name, "get", config_key(registry))
    if out is None:
        return None
    try:
        obj = json.loads(out)
        user, secret = str(obj["Username"]), str(obj["Secret"])
    except (ValueError, KeyError, TypeError):
        raise PybuildError(f"the credential helper docker-credential-{name} returned something else than "
                           "{\"Username\", \"Secret\"} JSON; check the helper") from None
    return Credentials(user, secret)


def _from_auths(entry: Any, key: str, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise PybuildError(f"the auth for {key} in {path} is not base64 of user:password; log in again")
        return Credentials(user, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    return None


def get_credentials(registry: str, config_path: Path | None = None) -> Credentials | None:
    """The credentials stored for registry (host[:port], or docker.io), or None for anonymous access."""
    path = config_path or default_config_path()
    cfg = _read_config(path)
    helper = _find_entry(cfg.get("credHelpers"), registry)
    if helper is not None and isinstance(helper[1], str) and helper[1]:
        return _from_helper(helper[1], registry)
    store = cfg.get("credsStore")
    if isinstance(store, str) and store:
        found = _from_helper(store, registry)
        if found is not None:
            return found
    entry = _find_entry(cfg.get("auths"), registry)
    return _from_auths(entry[1], entry[0], path) if entry is not None else None


def login(registry: str, user: str, password: str, config_path: Path | None = None) -> Path:
    """Record credentials as `docker login` does (helper if configured, else base64 in auths); returns the file.

    Checking them against the registry is the caller's part (registry.check_login).
    """
    if not user or ":" in user:
        raise PybuildError("a user name is required and cannot contain ':'")
    path = config_path or default_config_path()
    cfg = _read_config(path)
    key = config_key(registry)
    helper = _find_entry(cfg.get("credHelpers"), registry)
    name = helper[1] if helper is not None and isinstance(helper[1], str) else cfg.get("credsStore")
    if isinstance(name, str) and name:
        _run_helper(name, "store", json.dumps({"ServerURL": key, "Username": user, "Secret": password}))
        auths = cfg.setdefault("auths", {})
        if isinstance(auths, dict):  # Docker leaves an empty entry so the registry shows as logged in
            auths[key] = {}
    else:
        auths = cfg.get("auths")
        if not isinstance(auths, dict):
            auths = cfg["auths"] = {}
        old = _find_entry(auths, registry)
        if old is not None and old[0] != key:
            del auths[old[0]]
        auths[key] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}
    _write_config(path, cfg)
    return path


def logout(registry: str, config_path: Path | None = None) -> bool:
    """Forget registry's credentials (in the helper too); False if there were none."""
    path = config_path or default_config_path()
    cfg = _read_config(path)
    removed = False
    helper = _find_entry(cfg.get("credHelpers"), registry)
    name = helper[1] if helper is not None and isinstance(helper[1], str) else cfg.get("credsStore")
    if isinstance(name, str) and name:
        removed = _run_helper(name, "erase", config_key(registry)) is not None
    auths = cfg.get("auths")
    while (entry := _find_entry(auths, registry)) is not None:
        del auths[entry[0]]  # type: ignore[index]
        removed = True
    if removed:
        _write_config(path, cfg)
    return removed


# --------------------------------------------------------------------------- challenges

@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """WWW-Authenticate as registries send it: `Bearer realm="..",service="..",scope=".."`."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)").match(header, pos)
        if not m or not m.group(1):
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while True:
            p = _PARAM.match(header, pos)
            if not p or p.end() == pos:
                break
            value = p.group(2) if p.group(2) is not None else p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value or "")
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


def repository_scope(repository: str, *actions: str) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def _token_access(token: str) -> list[dict[str, Any]] | None:
    """The `access` claim of a JWT token, read without checking it (only to explain a refusal)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    access = claims.get("access") if isinstance(claims, dict) else None
    return access if isinstance(access, list) else None


@dataclass
class _Token:
    value: str
    expires: float  # when to fetch a new one (a little before the server's expiry)


class Authenticator:
    """One registry's authentication state; shared by worker threads.

    learn() takes the challenge of an unauthenticated request (the /v2/ ping);
    headers(scopes) then gives what to send, fetching a token when needed.
    """

    def __init__(self, registry: str, credentials: Credentials | None, http: HttpClient) -> None:
        self.registry = registry
        self.credentials = credentials
        self._http = http
        self._scheme: str | None = None  # None: the registry wants no authentication
        self._realm = ""
        self._service = ""
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._lock = threading.Lock()
        self._scope_locks: dict[tuple[str, ...], threading.Lock] = {}

    @property
    def scheme(self) -> str | None:
        return self._scheme

    def learn(self, www_authenticate: str) -> None:
        """Adopt the scheme a 401 asked for (Bearer preferred over Basic, as Docker)."""
        challenges = parse_challenges(www_authenticate)
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        if bearer is not None:
            realm = urllib.parse.urlsplit(bearer.params["realm"])
            if realm.scheme not in ("http", "https") or not realm.netloc:
                raise PybuildError(f"registry {self.registry} names an invalid token realm "
                                   f"{bearer.params['realm']!r}; the registry is misconfigured")
            self._scheme, self._realm = "bearer", bearer.params["realm"]
            self._service = bearer.params.get("service", "")
        elif any(c.scheme == "basic" for c in challenges):
            self._scheme = "basic"
        else:
            raise PybuildError(f"registry {self.registry} asks for authentication pybuild does not support "
                               f"({www_authenticate or 'no WWW-Authenticate header'}); only Basic and Bearer work")

    def headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        """The Authorization header to send for an operation needing `scopes` (may fetch a token)."""
        if self._scheme is None:
            return {}
        if self._scheme == "basic":
            if self.credentials is None:
                raise self.login_required(scopes)
            return {"Authorization": self.credentials.basic()}
        key = tuple(sorted(set(scopes)))
        with self._lock:
            lock = self._scope_locks.setdefault(key, threading.Lock())
        with lock:  # one token request per scope set, even with several workers asking at once
            token = self._tokens.get(key)
            if token is None or token.expires < time.time():
                token = self._tokens[key] = self._fetch_token(key)
        return {"Authorization": f"Bearer {token.value}"}

    def forget(self, scopes: tuple[str, ...]) -> None:
        """Drop a cached token (the registry refused it: expired or revoked)."""
        with self._lock:
            self._tokens.pop(tuple(sorted(set(scopes))), None)

    def _fetch_token(self, scopes: tuple[str, ...]) -> _Token:
        query = ([("service", self._service)] if self._service else []) + [("scope", s) for s in scopes if s]
        if self.credentials is not None:
            query.append(("account", self.credentials.username))
        sep = "&" if urllib.parse.urlsplit(self._realm).query else "?"
        url = self._realm + (sep + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        resp = self._http.request("GET", url, headers=headers, max_body=1 << 20)
        if resp.status in (401, 403):
            if self.credentials is not None:
                raise self.credentials_refused()
            raise self.login_required(scopes)
        if resp.status != 200:
            raise PybuildError(f"the token server of registry {self.registry} ({self._realm}) answered "
                               f"{resp.status}: {resp.data[:200].decode(errors='replace').strip()}; try again later")
        try:
            obj = json.loads(resp.data)
            value = obj.get("token") or obj.get("access_token")
            lifetime = float(obj.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise PybuildError(f"the token server of registry {self.registry} ({self._realm}) sent no token; "
                               "the registry's auth service is misconfigured")
        lifetime = max(lifetime, 1.0)
        return _Token(value, time.time() + lifetime - min(10.0, lifetime / 4))  # renewed a little before it ends

    # ----------------------------------------------------------------- explanations

    def credentials_refused(self) -> PybuildError:
        assert self.credentials is not None
        return PybuildError(f"registry {self.registry} refused the credentials for {self.credentials.username} "
                            f"(check {_LOGIN_HINT})")

    def login_required(self, scopes: tuple[str, ...]) -> PybuildError:
        what = _describe_scopes(scopes)
        return PybuildError(f"registry {self.registry} requires authentication{' to ' + what if what else ''}: "
                            f"run {_LOGIN_HINT} {self.registry} (or the repository does not exist)")

    def denied(self, scopes: tuple[str, ...]) -> PybuildError:
        """The credentials are fine but do not cover `scopes`: say what was granted."""
        if self.credentials is None:
            return self.login_required(scopes)
        granted = ""
        token = self._tokens.get(tuple(sorted(set(scopes))))
        access = _token_access(token.value) if token is not None else None
        if access is not None:
            parts = [f"{a.get('name')}: {','.join(a.get('actions') or []) or 'nothing'}"
                     for a in access if isinstance(a, dict)]
            granted = f" (granted: {'; '.join(parts) or 'nothing'})"
        what = _describe_scopes(scopes)
        return PybuildError(f"registry {self.registry} denied {self.credentials.username} access to {what}{granted}; "
                            "check the repository name and that the account may do this")


def _describe_scopes(scopes: tuple[str, ...]) -> str:
    """`repository:team/app:pull,push` -> `pull,push team/app`."""
    parts = []
    for s in scopes:
        kind, _, rest = s.partition(":")
        name, _, actions = rest.rpartition(":")
        parts.append(f"{actions} {name}" if kind == "repository" and name else s)
    return " and ".join(parts)


__all__ = ["Credentials", "Authenticator", "Challenge", "default_config_path", "config_key", "registry_host",
           "get_credentials", "login", "logout", "parse_challenges", "repository_scope", "DOCKER_HUB_KEY"]
