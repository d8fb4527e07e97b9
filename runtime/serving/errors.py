"""Errors that reach a client: each carries the HTTP status and the gRPC status code to answer with."""

from __future__ import annotations

import grpc


class InferError(Exception):
    """A request the server refuses or cannot serve; the message names the problem."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    overload = False  # the server is overloaded: clients should wait before they try again

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(InferError):
    """Malformed or invalid input (400 / INVALID_ARGUMENT)."""


class NotFound(InferError):
    """Unknown model or version (404 / NOT_FOUND)."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(InferError):
    """A name already taken, such as a shared memory region's (409 / ALREADY_EXISTS)."""

    http_status = 409
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class Forbidden(InferError):
    """The server was not started to allow this."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class PayloadTooLarge(InferError):
    """Request body over the configured limit (413 / RESOURCE_EXHAUSTED)."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(InferError):
    """The model's queue is full: back-pressure (429 / RESOURCE_EXHAUSTED)."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    overload = True


class Unavailable(InferError):
    """Not ready or draining (503 / UNAVAILABLE)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Cancelled(InferError):
    """The client left before its request ran: dropped from the queue, never run (499 / CANCELLED)."""

    http_status = 499
    grpc_code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(InferError):
    """The request's deadline would pass before its answer, or it waited past the queue timeout: dropped from
    the queue, never run (504 / DEADLINE_EXCEEDED)."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelFailure(InferError):
    """The model raised while running a batch (500 / INTERNAL)."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
