"""API keys for the endpoint: their configuration, their digests, and the check of every request.

Keys are configured where the endpoint is deployed (the driver), in ``MLPLATFORM_API_KEYS`` or in
the key file ``$MLPLATFORM_HOME/api_keys`` (or both: their keys add up), one entry per line or
whitespace-separated, each ``scope[,scope]:key``::

    predict:3f9c0d...            # a client that asks for predictions
    predict,feedback:8a41e2...   # one that also posts ground-truth labels

Scopes: ``predict`` (``POST /predict``, ``GET /model``, ``GET /model/card``, the OpenAPI docs)
and ``feedback`` (``POST /feedback``: labels move the live metrics, so posting them is a right of
its own). A key is at least 16 characters of ``A-Z a-z 0-9 - . _ ~ + / =`` (the characters an
HTTP bearer token may hold): ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.

The replicas receive only the keys' SHA-256 digests (:func:`key_digests`), and
:class:`ApiKeyMiddleware` compares the digest of a presented key with each of them with
:func:`hmac.compare_digest`. No message here ever quotes a key, not even a malformed one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

from pydantic_core import to_json

Scope = Literal["predict", "feedback"]
SCOPES: tuple[Scope, ...] = ("predict", "feedback")

KEYS_VARIABLE = "MLPLATFORM_API_KEYS"
"""The keys the endpoint accepts, with their scopes (where it is deployed)."""
CLIENT_KEY_VARIABLE = "MLPLATFORM_API_KEY"
"""The one key a client presents (``simulate``, ``status``, the printed curl example)."""
KEY_FILE_NAME = "api_keys"
"""The key file's name under the platform home."""
MIN_KEY_LENGTH = 16

KeyDigests = dict[str, tuple[str, ...]]
"""What a replica knows of the keys: the hex SHA-256 digest of each, and its scopes."""

GRANTED_SCOPES = "mlplatform.api_scopes"
"""The ASGI scope entry where :class:`ApiKeyMiddleware` leaves the request's granted scopes."""

_KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/=]+")
# RFC 6750: `Bearer` then one token68 (the scheme's name is case-insensitive).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
_PUBLIC = None
_ANY_KEY = ""
# The scope each route needs; any other path needs a valid key of any scope (so an unknown path
# answers 401, not a 404 that confirms what exists).
_ROUTE_SCOPES: dict[str, str | None] = {
    "/healthz": _PUBLIC,
    "/predict": "predict",
    "/model": "predict",
    "/model/card": "predict",
    "/openapi.json": "predict",
    "/docs": "predict",
    "/docs/oauth2-redirect": "predict",
    "/redoc": "predict",
    "/feedback": "feedback",
}


class ApiKeyError(ValueError):
    """The key configuration cannot be used (its message never quotes a key)."""


class ExposedWithoutKeys(RuntimeError):
    """The endpoint would listen beyond loopback with no API keys configured."""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One configured key and its scopes.

    Attributes:
        scopes: what the key may do (:data:`SCOPES`).
        secret: the key itself; never in ``repr``, logs or messages.

    """

    scopes: frozenset[str]
    secret: str = dataclasses.field(repr=False)

    @property
    def digest(self) -> str:
        """The key's SHA-256 digest (hex): all a replica is given of it."""
        return _digest(self.secret).hex()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_api_keys(text: str, source: str) -> list[ApiKey]:
    """Parse ``scope[,scope]:key`` entries, separated by whitespace or lines; ``#`` comments.

    Args:
        text: the entries.
        source: where they come from, for error messages (a variable or file name).

    Returns:
        The keys, in order.

    Raises:
        ApiKeyError: naming the entry (by position) and what is wrong with it, never its key.

    """
    keys: list[ApiKey] = []
    entries = [
        entry for line in text.splitlines() for entry in line.split("#", 1)[0].split() if entry
    ]
    for number, entry in enumerate(entries, start=1):
        where = f"entry {number} of {source}"
        scopes_text, colon, secret = entry.partition(":")
        if not colon:
            raise ApiKeyError(f"{where} has no scope: write it as scope[,scope]:key")
        scopes = {scope.strip() for scope in scopes_text.split(",")}
        if not scopes <= set(SCOPES):
            # Not quoted: an entry written the wrong way round has its key on the left.
            raise ApiKeyError(f"{where} has an unknown scope: scopes are {', '.join(SCOPES)}")
        if len(secret) < MIN_KEY_LENGTH or not _KEY_PATTERN.fullmatch(secret):
            raise ApiKeyError(
                f"{where}: a key is at least {MIN_KEY_LENGTH} characters of A-Z a-z 0-9 - . _ ~ "
                '+ / = (python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        if any(hmac.compare_digest(secret, key.secret) for key in keys):
            raise ApiKeyError(f"{where} repeats the key of an earlier entry: give it both scopes")
        keys.append(ApiKey(frozenset(scopes), secret))
    return keys


def read_key_file(path: Path) -> list[ApiKey]:
    """The keys of a key file, refused unless only its owner may read it.

    Returns:
        The keys (none if the file does not exist).

    Raises:
        ApiKeyError: if group or others have any access to the file, or an entry is invalid.

    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ApiKeyError(
            f"the API key file {path} is accessible to group or others (mode "
            f"{stat.S_IMODE(mode):o}): make it private with `chmod 600 {path}`"
        )
    return parse_api_keys(path.read_text(), str(path))


def load_api_keys(home: Path, environ: Mapping[str, str] | None = None) -> list[ApiKey]:
    """The configured keys: ``MLPLATFORM_API_KEYS`` and the key file ``<home>/api_keys``.

    Args:
        home: the platform home.
        environ: the environment (default: this process's).

    Returns:
        Every configured key; none means the endpoint is open (on loopback only).

    Raises:
        ApiKeyError: on an invalid entry, a key file others may read, or a key given twice.

    """
    env = os.environ if environ is None else environ
    keys = parse_api_keys(env.get(KEYS_VARIABLE, ""), KEYS_VARIABLE)
    keys += read_key_file(home / KEY_FILE_NAME)
    if len({key.digest for key in keys}) < len(keys):
        raise ApiKeyError(
            f"a key is configured both in {KEYS_VARIABLE} and in {home / KEY_FILE_NAME}: "
            "keep one entry per key"
        )
    return keys


def key_digests(keys: Collection[ApiKey]) -> KeyDigests | None:
    """What the replicas are given of ``keys``: digests and scopes; ``None`` when there are none."""
    return {key.digest: tuple(sorted(key.scopes)) for key in keys} or None


def key_for(keys: Collection[ApiKey], scope: Scope) -> str | None:
    """The first configured key with ``scope`` (``None``: none has it)."""
    return next((key.secret for key in keys if scope in key.scopes), None)


def client_key(scope: Scope, home: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The key a client on this machine presents for ``scope``.

    ``MLPLATFORM_API_KEY`` when set, else the first configured key with that scope, else
    ``None`` (no keys: the endpoint is open).

    Raises:
        ApiKeyError: as :func:`load_api_keys`, when it has to read the configuration.

    """
    env = os.environ if environ is None else environ
    return env.get(CLIENT_KEY_VARIABLE) or key_for(load_api_keys(home, env), scope)


def bearer_headers(key: str | None) -> dict[str, str]:
    """``Authorization: Bearer <key>``, or no header without a key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def is_loopback_host(host: str) -> bool:
    """Whether an interface name or address is this machine's loopback (``0.0.0.0`` is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_keys_beyond_loopback(host: str, digests: KeyDigests | None) -> None:
    """Refuse to serve on a non-loopback interface without keys.

    Raises:
        ExposedWithoutKeys: saying how to configure keys.

    """
    if digests or is_loopback_host(host):
        return
    raise ExposedWithoutKeys(
        f"refusing to serve on {host} without API keys: anyone who reaches that interface "
        f"could ask for predictions and post labels. Configure keys in {KEYS_VARIABLE} (e.g. "
        "'predict,feedback:<key>', the key from "
        '`python -c "import secrets; print(secrets.token_urlsafe(32))"`) or in the file '
        f"$MLPLATFORM_HOME/{KEY_FILE_NAME} (one scope[,scope]:key per line, mode 600), or "
        "serve on 127.0.0.1 (MLPLATFORM_SERVE_HOST)"
    )


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class ApiKeyMiddleware:
    """ASGI middleware: every HTTP request but ``GET /healthz`` needs a key with its route's scope.

    Answers 401 (``WWW-Authenticate: Bearer``) for a missing, malformed or unknown key and 403
    for a key without the route's scope, each with a JSON body in the routes' error format
    (``{"detail": [{"loc", "msg", "type"}]}``). ``/healthz`` is public, but a key sent there is
    checked too (an unknown one is a 401), and the scopes granted are left in the ASGI scope
    (:data:`GRANTED_SCOPES`) for the route to read.
    """

    def __init__(self, app: _App, digests: KeyDigests):
        self.app = app
        self.keys = [
            (bytes.fromhex(hexdigest), frozenset(scopes)) for hexdigest, scopes in digests.items()
        ]

    def granted(self, key: str) -> frozenset[str] | None:
        """The scopes of ``key``, or ``None`` if it is not a configured key.

        Every digest is compared (in constant time), whichever matches.
        """
        digest = _digest(key)
        found: frozenset[str] | None = None
        for known, scopes in self.keys:
            if hmac.compare_digest(digest, known):
                found = scopes
        return found

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Check the request's key before the app sees it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        needed = _ROUTE_SCOPES.get(path.rstrip("/") or "/", _ANY_KEY)
        header = _header(scope, b"authorization")
        if header is None:
            if needed is _PUBLIC:
                scope[GRANTED_SCOPES] = frozenset()
                await self.app(scope, receive, send)
                return
            await _refuse(
                send,
                401,
                "missing_api_key",
                "this endpoint needs an API key: send the header `Authorization: Bearer <key>`",
                'Bearer realm="mlplatform"',
            )
            return
        match = _BEARER.fullmatch(header)
        if match is None:
            await _refuse(
                send,
                401,
                "malformed_authorization",
                "the Authorization header must be `Bearer <key>` (one key, no other scheme)",
                'Bearer realm="mlplatform", error="invalid_request"',
            )
            return
        granted = self.granted(match[1])
        if granted is None:
            await _refuse(
                send,
                401,
                "invalid_api_key",
                "the API key is not valid (unknown, or revoked)",
                'Bearer realm="mlplatform", error="invalid_token"',
            )
            return
        if needed and needed not in granted:
            await _refuse(
                send,
                403,
                "insufficient_scope",
                f"the API key lacks the `{needed}` scope this route needs",
                f'Bearer realm="mlplatform", error="insufficient_scope", scope="{needed}"',
            )
            return
        scope[GRANTED_SCOPES] = granted
        await self.app(scope, receive, send)


def _route_path(scope: _Scope) -> str:
    """The request's path below the app's mount point (Ray Serve's route prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: _Scope, name: bytes) -> str | None:
    """The value of a request header (the first, if repeated), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _refuse(send: _Send, status: int, kind: str, message: str, challenge: str) -> None:
    """Answer the request with ``status`` and a JSON body saying what is wrong."""
    body = to_json({"detail": [{"loc": ["header", "authorization"], "msg": message, "type": kind}]})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
