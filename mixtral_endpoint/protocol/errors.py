"""Typed errors and the one table that maps them to HTTP statuses.

The message is for the caller: it names the field, the bound and the value, and never
carries prompt text or a traceback. The traceback goes to the log.
"""

from __future__ import annotations

import logging
from typing import Any

# code -> HTTP status. The only place a status code is chosen.
STATUS: dict[str, int] = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "content_filter": 400,
    "not_found": 404,
    "payload_too_large": 413,
    "overloaded": 429,
    "internal_error": 500,
    "model_not_ready": 503,
}


class ScoringError(Exception):
    """A request that cannot be scored; `code` picks the status from STATUS."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(ScoringError):
    code = "invalid_request"


class ContextLengthExceeded(ScoringError):
    code = "context_length_exceeded"


class ContentFiltered(ScoringError):
    """A prompt that content screening flagged (serving/safety.py); the message names the category."""

    code = "content_filter"


class NotFound(ScoringError):
    """A resource the caller named that this server does not hold (a stored response: nothing is stored)."""

    code = "not_found"


class PayloadTooLarge(ScoringError):
    code = "payload_too_large"


class Overloaded(ScoringError):
    code = "overloaded"


class ModelNotReady(ScoringError):
    code = "model_not_ready"


class InternalError(ScoringError):
    code = "internal_error"


def as_scoring_error(exc: Exception, log: logging.Logger, scoring: str = "a request") -> ScoringError:
    """What a door answers for `exc`: a ScoringError as it is; anything else is a fault, whose
    traceback goes to the log and never to the caller."""
    if isinstance(exc, ScoringError):
        return exc
    log.error("unexpected failure while scoring %s", scoring, exc_info=exc)
    return InternalError("an unexpected error occurred; the log has the details")


class ConfigError(ValueError):
    """A setting the server cannot start with; the message names the variable."""


class CheckpointError(Exception):
    """A checkpoint directory that cannot be served; the message names the file."""


class DoesNotFit(CheckpointError):
    """The weights need more memory than the machine allows."""
