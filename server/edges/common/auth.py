"""What every edge's security shares: reading token and TLS files, and checking bearer tokens.

See docs/security.md for the threat model. Reading the files blocks (start-up only); checking a token never blocks.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

from server.core.errors import Status

Refusal = tuple[Status, str]


class SecurityConfigError(ValueError):
    """A certificate, key or token file is missing, unreadable or empty."""


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, which must not be empty. Blocks. Raises SecurityConfigError naming ``what``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """Raise SecurityConfigError unless the TLS options make sense together (no file is read)."""
    if (cert is None) != (key is None):
        raise SecurityConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    if client_ca is not None and cert is None:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")


def read_tokens(path: Path) -> list[str]:
    """The accepted bearer tokens: one per non-empty line (several allow rotation). Raises SecurityConfigError."""
    try:
        text = read_file(path, "token file").decode("utf-8")
    except UnicodeDecodeError:
        raise SecurityConfigError(f"token file {path} is not UTF-8") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if any(not t.isascii() or not t.isprintable() or " " in t for t in tokens):
        raise SecurityConfigError(f"token file {path}: tokens must be printable ASCII without spaces")
    return tokens


class TokenChecker:
    """Decides whether an ``authorization`` value carries one of the accepted bearer tokens. Never blocks."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise SecurityConfigError("token auth needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def problem(self, authorization: str | bytes | None) -> str | None:
        """Why a call with this ``authorization`` value is refused, or None when its token is valid."""
        if authorization is None:
            return "missing bearer token: send the metadata 'authorization: Bearer <token>'"
        value = authorization if isinstance(authorization, str) else authorization.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        presented = token.strip().encode("utf-8", "replace")
        # Compare with every token, in constant time, so timing says nothing about which one nearly matched.
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return None if matched else "invalid bearer token"


class AdminRule:
    """Who may make model-control calls (docs/security.md, "Who may call what"), for every edge.

    With ``admin_tokens`` (``--admin-token-file``) a call needs one of them: a client token (``client_tokens``,
    ``--auth-token-file``) is PERMISSION_DENIED, no token or another one UNAUTHENTICATED. Without admin tokens, only
    calls from this machine (a loopback address or a Unix socket) are accepted, unless ``allow_remote``
    (``--allow-remote-admin``); others are PERMISSION_DENIED. Never blocks.
    """

    def __init__(self, admin_tokens: Sequence[str] = (), client_tokens: Sequence[str] = (), *,
                 allow_remote: bool = False) -> None:
        self._admin = TokenChecker(admin_tokens) if admin_tokens else None
        self._clients = TokenChecker(client_tokens) if client_tokens else None
        self._allow_remote = allow_remote

    @property
    def needs_peer(self) -> bool:
        """Whether :meth:`refusal` looks at the caller's address (no admin tokens, remote callers refused)."""
        return self._admin is None and not self._allow_remote

    def refusal(self, what: str, authorization: str | bytes | None, is_local: Callable[[], bool],
                peer: str = "") -> Refusal | None:
        """Why the model-control call ``what`` is refused (its status and message), or None when it is allowed.
        ``is_local()`` says whether the caller is on this machine, ``peer`` names it in the message."""
        if self._admin is not None:
            return self._token_refusal(what, authorization)
        if self._allow_remote or is_local():
            return None
        return (Status.PERMISSION_DENIED, f"{what} is a model-control call: without --admin-token-file it is "
                f"accepted only from this machine (loopback), not from {peer}; configure --admin-token-file or "
                "--allow-remote-admin")

    def _token_refusal(self, what: str, authorization: str | bytes | None) -> Refusal | None:
        assert self._admin is not None
        problem = self._admin.problem(authorization)
        if problem is None:
            return None
        if self._clients is not None and self._clients.problem(authorization) is None:
            return (Status.PERMISSION_DENIED, f"{what} is a model-control call: it needs a token of "
                    "--admin-token-file; client tokens (--auth-token-file) do not suffice")
        return Status.UNAUTHENTICATED, f"{what} is a model-control call and needs an admin token: {problem}"


def is_loopback(host: str) -> bool:
    """Whether an IP address (``127.0.0.1``, ``::1``, ``::ffff:127.0.0.1``) is this machine's loopback."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's view of IPv4 loopback
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
