"""Domain errors, each with a neutral :class:`Status`; every edge maps the status to its own wire code.

The status names are gRPC's (the richest of the protocols served); the HTTP
edge maps each to a 4xx/5xx code. Nothing here imports grpc.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The outcome of a call, independent of the protocol it came in on."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ClassifydError(Exception):
    """Base class of errors that are the caller's or the situation's fault, never a crash."""

    status = Status.INTERNAL


class InvalidInput(ClassifydError):
    """The request itself is wrong: bad image, bad tensor, bad top_k (INVALID_ARGUMENT)."""

    status = Status.INVALID_ARGUMENT


class ModelNotFound(ClassifydError):
    """No such model, or a pinned version that does not exist (NOT_FOUND)."""

    status = Status.NOT_FOUND


class ModelUnavailable(ClassifydError):
    """The model exists but no version can serve right now (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class Overloaded(ClassifydError):
    """The model's queue is full (RESOURCE_EXHAUSTED)."""

    status = Status.RESOURCE_EXHAUSTED


class DeadlineExpired(ClassifydError):
    """The request's deadline passed before it could be computed (DEADLINE_EXCEEDED)."""

    status = Status.DEADLINE_EXCEEDED


class PreconditionFailed(ClassifydError):
    """The call does not fit the state the daemon or the model is in (FAILED_PRECONDITION): e.g. a model-control call
    that the --model-control mode refuses, or a model that was asked to load and failed to."""

    status = Status.FAILED_PRECONDITION


class InferenceFailed(ClassifydError):
    """The model raised while computing the request's batch (INTERNAL)."""

    status = Status.INTERNAL


MAX_STATUS_MESSAGE = 2000
"""Status details travel in a header: a client-supplied name echoed in full could exceed the header size limit."""


def status_for(exc: BaseException) -> tuple[Status, str]:
    """The status and message a request that raised ``exc`` gets; anything unexpected is INTERNAL."""
    if isinstance(exc, ClassifydError):
        return exc.status, clip(str(exc))
    return Status.INTERNAL, clip(f"internal error: {type(exc).__name__}: {exc}")


def clip(message: str) -> str:
    """``message``, cut to :data:`MAX_STATUS_MESSAGE` characters."""
    return message if len(message) <= MAX_STATUS_MESSAGE else message[:MAX_STATUS_MESSAGE - 15] + "… (truncated)"
