"""The one error table of every edge: a domain :class:`Status` as an HTTP status, and back.

gRPC uses the status's name as its code (``grpc.StatusCode[status.name]``); HTTP
uses :data:`HTTP_FOR_STATUS`, so the same failure gets the matching code on every
edge. Errors that aiohttp raises itself (no route, body too large) are named with
:func:`status_for_http`.
"""

from __future__ import annotations

from server.core.errors import Status

HTTP_FOR_STATUS: dict[Status, int] = {
    Status.OK: 200,
    Status.INVALID_ARGUMENT: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.FAILED_PRECONDITION: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
    Status.INTERNAL: 500,
    Status.UNIMPLEMENTED: 501,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}
_STATUS_FOR_HTTP = {400: Status.INVALID_ARGUMENT, 401: Status.UNAUTHENTICATED, 403: Status.PERMISSION_DENIED,
                    404: Status.NOT_FOUND, 405: Status.UNIMPLEMENTED, 413: Status.RESOURCE_EXHAUSTED,
                    415: Status.INVALID_ARGUMENT, 429: Status.RESOURCE_EXHAUSTED, 503: Status.UNAVAILABLE,
                    504: Status.DEADLINE_EXCEEDED}
RETRYABLE = frozenset({Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE})
"""Statuses whose HTTP answer carries ``Retry-After``."""


def http_status(status: Status) -> int:
    """The HTTP status code for ``status`` (500 for anything without a closer match)."""
    return HTTP_FOR_STATUS.get(status, 500)


def status_for_http(code: int) -> Status:
    """The domain status an HTTP error code raised outside our handlers (by aiohttp) stands for."""
    return _STATUS_FOR_HTTP.get(code, Status.INTERNAL if code >= 500 else Status.INVALID_ARGUMENT)
