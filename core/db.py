"""Postgres engines. Read and write engines are distinct types so `query/` cannot write."""

from __future__ import annotations

from typing import NewType

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

ReadEngine = NewType("ReadEngine", AsyncEngine)
WriteEngine = NewType("WriteEngine", AsyncEngine)


def asyncpg_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (what users paste) and pick the asyncpg driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported Postgres URL scheme {parsed.drivername!r}")
    return parsed.render_as_string(hide_password=False)


def _engine(
    url: str,
    *,
    pool_size: int,
    app: str,
    statement_timeout_ms: int | None,
    extra: dict[str, str] | None = None,
    max_overflow: int = 0,
    pool_timeout: float = 5.0,
) -> AsyncEngine:
    server_settings = {"application_name": app, **(extra or {})}
    if statement_timeout_ms:
        server_settings["statement_timeout"] = str(statement_timeout_ms)
    return create_async_engine(
        asyncpg_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=False,
        pool_timeout=pool_timeout,
        connect_args={"server_settings": server_settings, "timeout": 5},
    )


def write_engine(url: str, *, pool_size: int = 2, app: str = "tally") -> WriteEngine:
    return WriteEngine(_engine(url, pool_size=pool_size, app=app, statement_timeout_ms=None))


# asyncpg prepares every statement; after five runs Postgres may switch a prepared query to
# a generic plan chosen without its values. For rollup queries, whose time ranges span from
# minutes to months, that plan assumes a narrow range and index-scans whole weeks (measured:
# 973 ms instead of 412 ms; the dashboard bench query 0.8x the rate). Planning each
# execution costs 0.1-0.2 ms. See docs/query-plans.md.
_CUSTOM_PLANS = {"plan_cache_mode": "force_custom_plan"}


def read_engine(
    url: str,
    *,
    pool_size: int,
    statement_timeout_ms: int,
    app: str = "tally-query",
    max_overflow: int = 0,
    pool_timeout: float = 5.0,
) -> ReadEngine:
    """The query service's engine: `pool_timeout` is how long a request waits for a connection
    before SQLAlchemy gives up (query.service turns that into a 503)."""
    return ReadEngine(
        _engine(
            url,
            pool_size=pool_size,
            app=app,
            statement_timeout_ms=statement_timeout_ms,
            extra=_CUSTOM_PLANS,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
        )
    )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception, what SQLAlchemy wrapped (`orig`) and what it was raised from: where a
    driver's error (an asyncpg SQLSTATE, an OSError) is found under SQLAlchemy's wrapper."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
    return seen
