"""What every edge's security shares: reading token and TLS files, and checking bearer tokens.

See docs/security.md for the threat model. Reading the files blocks (start-up only); checking a token never blocks.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path


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
