"""Errors of the service; the app maps each to its HTTP status with the message as the body."""

from __future__ import annotations

from stagewise.errors import StagewiseError


class ServeError(StagewiseError):
    """Base class of the service's errors; ``status`` is the HTTP status it is answered with."""

    status = 500


class RequestError(ServeError, ValueError):
    """A request the service cannot take: a bad parameter, tensor or body; the message says which."""

    status = 400


class PayloadTooLargeError(RequestError):
    """The request body is over the service's size limit (``--max-body-mb``)."""

    status = 413


class ForbiddenError(RequestError):
    """A request the service refuses on principle (e.g. a reload of a path outside ``--reload-dir``)."""

    status = 403


class RequestTimeoutError(RequestError):
    """The client did not send its whole request within the service's ``client_timeout_s``."""

    status = 408


class QueueFullError(ServeError):
    """The request queue is full; retry after a moment or lower the request rate."""

    status = 503


class ShuttingDownError(ServeError):
    """The service is shutting down and takes no new requests."""

    status = 503
