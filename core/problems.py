"""One error base class -> one RFC 9457 problem+json shape, for every service."""

from __future__ import annotations

from typing import Any, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

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
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def _tally_error(request: Request, exc: Exception) -> Response:
    exc = cast(TallyError, exc)
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        slug=exc.slug,
        instance=request.url.path,
        errors=exc.errors,
        headers=exc.headers,
    )


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


async def _unhandled(request: Request, exc: Exception) -> Response:
    # Never leak a stack trace or SQL to the client; the log has it.
    return problem_response(500, "Internal error", None, instance=request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TallyError, _tally_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
