"""Domain errors. The gRPC edge maps each class to one status code."""

from __future__ import annotations


class ClassifydError(Exception):
    """Base class of errors that are the caller's or the situation's fault, never a crash."""


class InvalidInput(ClassifydError):
    """The request itself is wrong: bad image, bad tensor, bad top_k (INVALID_ARGUMENT)."""


class ModelNotFound(ClassifydError):
    """No such model, or a pinned version that does not exist (NOT_FOUND)."""


class ModelUnavailable(ClassifydError):
    """The model exists but no version can serve right now (UNAVAILABLE)."""


class Overloaded(ClassifydError):
    """The model's queue is full (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(ClassifydError):
    """The request's deadline passed before it could be computed (DEADLINE_EXCEEDED)."""


class InferenceFailed(ClassifydError):
    """The model raised while computing the request's batch (INTERNAL)."""
