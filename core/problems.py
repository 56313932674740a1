"""One error base class -> one RFC 9457 problem+json shape, for every service."""

from __future__ import annotations

import logging
from typing import Any, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://tally.dev/problems/"


class TallyError(Exception):
    """An error a client should see. Subclasses fix status and title."""

    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class BadRequest(TallyError):
    status, title, slug = 400, "Bad request", "bad-request"


class Unauthorized(TallyError):
    """No usable credentials: missing, malformed, unknown or revoked (RFC 9110 §15.5.2, RFC 6750 §3)."""

    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str, *, challenge: str = 'Bearer realm="tally"') -> None:
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(TallyError):
    """Valid credentials that do not allow this request (a missing scope)."""

    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(TallyError):
    status, title, slug = 404, "Not found", "not-found"


class PayloadTooLarge(TallyError):
    status, title, slug = 413, "Payload too large", "too-large"


class UnsupportedMediaType(TallyError):
    status, title, slug = 415, "Unsupported media type", "media-type"


class Unprocessable(TallyError):
    status, title, slug = 422, "Unprocessable content", "invalid"


class Unavailable(TallyError):
    """Overload or a dependency down: the client should retry after a pause."""

    status, title, slug = 503, "Service unavailable", "unavailable"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


def problem_response(
    status: int,
    title: str,
    detail: str | None,
    *,
    slug: str = "about:blank",
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": slug if slug == "about:blank" else PROBLEM_BASE + slug,
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    if request_id:
        body["request_id"] = request_id
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_for(exc: TallyError, method: str, path: str) -> Response:
    """The problem+json answer to a TallyError: for the exception handlers and plain ASGI routes."""
    cause = exc.__cause__
    if exc.status >= 500 and cause is not None:
        # The client gets the generic detail; the operator gets what failed (a driver error may
        # name SQL, a host or a port), on one line: a dependency down must not flood the log.
        log.warning("%s %s answered %d: %s: %r", method, path, exc.status, exc.detail, cause)
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        slug=exc.slug,
        instance=path,
        errors=exc.errors,
        headers=exc.headers,
    )


async def _tally_error(request: Request, exc: Exception) -> Response:
    return problem_for(cast(TallyError, exc), request.method, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> Response:
    exc = cast(RequestValidationError, exc)
    errors = [{"location": ".".join(str(p) for p in e.get("loc", ())), "error": e.get("msg", "")} for e in exc.errors()]
    names = ", ".join(e["location"] for e in errors)
    return problem_response(
        400,
        "Bad request",
        f"invalid parameter(s): {names}",
        slug="bad-request",
        instance=request.url.path,
        errors=errors,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    exc = cast(StarletteHTTPException, exc)
    return problem_response(
        exc.status_code, str(exc.detail), None, instance=request.url.path, headers=dict(exc.headers or {})
    )


INTERNAL_DETAIL = "the server failed to answer this request; its log has the details under this request id"


def internal_error(path: str, request_id: str | None) -> Response:
    """The answer to an unhandled exception: generic on purpose.

    An exception's text may hold SQL, table names, file paths, server addresses or
    credentials, so none of it reaches the client; the request id lets an operator
    find the traceback in the log.
    """
    return problem_response(
        500, "Internal error", INTERNAL_DETAIL, slug=TallyError.slug, instance=path, request_id=request_id
    )


async def _unhandled(request: Request, exc: Exception) -> Response:
    # Apps behind core.http.MetricsMiddleware answer (and log) there; this covers the others.
    return internal_error(request.url.path, request.scope.get("state", {}).get("request_id"))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TallyError, _tally_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
