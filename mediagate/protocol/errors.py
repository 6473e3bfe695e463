"""Domain errors and their one mapping onto HTTP and OpenAI's error envelope.

Workers and schedulers raise these; only the router turns them into responses.
Each class carries its HTTP status and OpenAI ``type``/``code``; instances carry
the ``param`` at fault and an optional honest ``retry_after_s``. They pickle by
their constructor arguments so they survive crossing a Ray handle intact.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field


class MediagateError(Exception):
    """Base class: an error a client may see, with its status and envelope fields."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    # Sent as `x-should-retry`; None leaves the decision to the client's own rules.
    should_retry: ClassVar[bool | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(
    cls: type[MediagateError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None,
) -> MediagateError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class InvalidRequest(MediagateError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class ModerationBlocked(InvalidRequest):
    """A prompt, an upload or an output the moderation checks refused (OpenAI's code);
    no quota is spent on it."""

    default_code = "moderation_blocked"


class Unauthorized(MediagateError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class Forbidden(MediagateError):
    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(MediagateError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(MediagateError):
    """The request conflicts with the service's state: the same request is still being
    processed (an Idempotency-Key repeat), or what it asks for is switched off here."""

    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_in_use"


class Unprocessable(MediagateError):
    """The request contradicts an earlier one (an Idempotency-Key reused for another body)."""

    status = 422
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


class Gone(MediagateError):
    """The resource existed but its content has expired."""

    status = 410
    type = "invalid_request_error"
    default_code = "expired"


class PayloadTooLarge(MediagateError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLarge(MediagateError):
    status = 431
    type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class QuotaExceeded(MediagateError):
    """The account's quota is spent until a reset: retrying before it is useless."""

    status = 429
    type = "insufficient_quota"
    default_code = "insufficient_quota"
    should_retry = False


class RateLimited(MediagateError):
    """A transient limit (cooldown, per-minute rate): retry after ``retry_after_s``."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class Overloaded(MediagateError):
    """The service sheds this request now rather than let it time out later."""

    status = 503
    type = "server_error"
    default_code = "server_overloaded"


class GenerationFailed(MediagateError):
    """The model failed server-side; details stay in the logs."""

    status = 500
    type = "server_error"
    default_code = "generation_failed"


class ModelUnavailable(MediagateError):
    """A model cannot serve now: its weights cannot be loaded (absent, offline,
    unsupported source), its scheduler is restarting, or its worker died under the
    request twice. A 503: the client may retry."""

    status = 503
    type = "server_error"
    default_code = "model_unavailable"


class ModelMoved(ModelUnavailable):
    """The scheduler asked has been replaced by a new version of its model (``mediagate
    models swap``): the router sends the request to the live version instead. A 503 only
    if the router cannot (the client may retry)."""

    default_code = "model_version_changed"


class ModelRemoved(NotFound):
    """The model was taken out of service (``mediagate models remove``) while this
    request waited for it; nothing was charged."""

    default_code = "model_removed"


class ControlUnavailable(MediagateError):
    """The cluster's control plane (the Serve controller) did not answer an operator's
    request; nothing was changed. A 503: retry."""

    status = 503
    type = "server_error"
    default_code = "control_unavailable"


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a Ray ``RayTaskError`` wrapper, or ``exc`` itself."""
    cause = getattr(exc, "cause", None)
    while isinstance(cause, BaseException) and cause is not exc:
        exc, cause = cause, getattr(cause, "cause", None)
    return exc


def caused_by(
    exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    """Whether ``exc``, or the original exception behind its Ray wrappers, is one of
    ``kinds`` (a wrapper can itself be one: Ray's errors subclass each other)."""
    return isinstance(exc, kinds) or isinstance(unwrap(exc), kinds)


class ErrorDetail(BaseModel):
    """The inside of OpenAI's error envelope."""

    message: str = Field(description="What went wrong and what would be accepted.")
    type: str = Field(description="OpenAI error type.")
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: str | None = Field(None, description="Machine-readable error code.")


class ErrorResponse(BaseModel):
    """``{"error": {...}}`` on every non-2xx answer."""

    error: ErrorDetail = Field(description="The error.")


class StoreUnavailable(MediagateError):
    """The backing store cannot be reached: a 503 that tells the client when to retry.

    Callers that can do better (fail open within a budget, say) catch it first.
    """

    status = 503
    type = "server_error"
    default_code = "store_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("retry_after_s", 2.0)
        super().__init__(message, **kwargs)
