"""A frozen Postgres (every process SIGSTOPped, as a hung host or a network partition looks to a
client): the query API answers 503 within its deadline instead of hanging, and recovers after.
Then a Postgres that refuses new sessions while it shuts down: 503s, not 500s.

A stopped server refuses connections at once; a frozen one accepts TCP (the kernel does) and
then says nothing, and the statement timeout, enforced by the server, never fires. Before the
fix this test came with, a query on a pooled connection waited for ever. The query API now gives
each query the statement timeout plus DEADLINE_MARGIN_SECONDS, then closes the connection's
socket (the query in flight fails at once, the pool drops it) and answers 503 problem+json with
Retry-After.

What must hold, with a 1 s statement timeout: while frozen, every uncached query (one after the
other, and a concurrent burst that needs new connections) answers 503 within BOUND seconds;
after the thaw the API answers 200 with exact totals again within RECOVERY_BOUND seconds.

Then Postgres gets SIGTERM (a smart shutdown) while the test holds one session open: for as long
as that session lives, every new session is refused with 57P03 ("the database system is shutting
down", as also in the moments of any restart). SQLAlchemy raises it as a plain DBAPIError, which
the query API answered with a 500 before the fix this test came with. A query app started now
(an empty pool: every query needs a new session) must answer 503 problem+json, fast.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from decimal import Decimal

import asyncpg
import httpx
import pytest

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from query.app import create_app as query_app
from query.routes import DEADLINE_MARGIN_SECONDS, LAG_KAFKA_SECONDS
from tests.conftest import serve
from tests.fault.support import NO_CACHE, ROLLUP, Probe, assert_problem_503, probe, signal_all
from tests.integration.query_support import WHOLE, insert_rows, make_rows

pytestmark = pytest.mark.fault

STATEMENT_TIMEOUT_MS = 1_000
BOUND = STATEMENT_TIMEOUT_MS / 1000 + DEADLINE_MARGIN_SECONDS + 1.5  # + scheduling on a loaded machine
LAG_BOUND = STATEMENT_TIMEOUT_MS / 1000 + DEADLINE_MARGIN_SECONDS + LAG_KAFKA_SECONDS + 3.0  # + the probe's cleanup
RECOVERY_BOUND = 10.0


def total(p: Probe) -> Decimal:
    data = json.loads(p.body, parse_float=Decimal)["data"]
    return Decimal(data[0]["count"]) if data else Decimal(0)


async def test_a_frozen_postgres_gets_503s_within_the_deadline(
    settings: Settings, private_postgres: devstack.EmbeddedServer
) -> None:
    config = settings.model_copy(
        update={"postgres_url": private_postgres.url, "statement_timeout_ms": STATEMENT_TIMEOUT_MS}
    )
    await migrate(config)
    rows = make_rows()
    await insert_rows(config, rows)
    want = sum(r["count"] for r in rows)

    def params(i: int) -> dict[str, str]:  # a distinct query each: no answer shared in the cache
        return {**WHOLE, "fields": "count", "limit": str(100 + i)}

    async with serve(query_app(config)) as url, httpx.AsyncClient(base_url=url, timeout=30) as query:
        # Several pooled connections, idle and open, as in a service that has been answering.
        warm = await asyncio.gather(*(probe(query, ROLLUP, params=params(i), headers=NO_CACHE) for i in range(4)))
        signal_all(private_postgres, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            one_by_one = [await probe(query, ROLLUP, params=params(10 + i), headers=NO_CACHE) for i in range(3)]
            lag, *burst = await asyncio.gather(
                probe(query, "/v1/ops/lag"),
                *(probe(query, ROLLUP, params=params(20 + i), headers=NO_CACHE) for i in range(8)),
            )
            held = time.monotonic() - frozen
        finally:
            signal_all(private_postgres, signal.SIGCONT)
        thawed = time.monotonic()
        answers: list[Probe] = []

        async def answered() -> None:
            while not answers or answers[-1].status != 200:
                answers.append(await probe(query, ROLLUP, params=params(30 + len(answers)), headers=NO_CACHE))
                await asyncio.sleep(0.1)

        await asyncio.wait_for(answered(), RECOVERY_BOUND)
        recovered = time.monotonic() - thawed
        again = await probe(query, ROLLUP, params=params(0), headers=NO_CACHE)

    frozen_answers = [*one_by_one, *burst]
    print(
        f"frozen {held:.1f} s: {len(frozen_answers)} queries, slowest {max(p.elapsed for p in frozen_answers):.2f} s "
        f"(deadline {STATEMENT_TIMEOUT_MS / 1000 + DEADLINE_MARGIN_SECONDS:g} s); 200 again {recovered:.2f} s "
        f"after the thaw, after {len(answers) - 1} more 503s; /v1/ops/lag answered {lag.status} in {lag.elapsed:.2f} s"
    )
    assert [(p.status, total(p)) for p in warm] == [(200, want)] * 4
    assert_problem_503(frozen_answers, BOUND)
    assert all("did not answer within" in json.loads(p.body)["detail"] for p in frozen_answers), frozen_answers
    assert all(p.status in (200, 503) for p in answers), answers
    assert_problem_503([lag], LAG_BOUND)
    assert (again.status, total(again)) == (200, want), again

    holder = await asyncpg.connect(private_postgres.url)
    try:
        assert private_postgres.process is not None
        private_postgres.process.send_signal(signal.SIGTERM)
        why = await refusing(private_postgres.url)
        async with serve(query_app(config)) as url, httpx.AsyncClient(base_url=url, timeout=30) as query:
            refused = [await probe(query, ROLLUP, params=params(50 + i), headers=NO_CACHE) for i in range(3)]
            lag_refused = await probe(query, "/v1/ops/lag")
    finally:
        await holder.close()
    print(f"shutting down ({why}): {[round(p.elapsed, 3) for p in refused]} s; lag {lag_refused.elapsed:.3f} s")
    assert_problem_503([*refused, lag_refused], 1.5, why)
    assert all(json.loads(p.body)["detail"] == "the database is unreachable" for p in refused), refused


async def refusing(url: str, timeout: float = 10.0) -> str:
    """Until Postgres refuses new sessions with 57P03; its message."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(url)
        except asyncpg.CannotConnectNowError as exc:
            return str(exc)
        await conn.close()
        assert time.monotonic() < deadline, "Postgres still accepts sessions after SIGTERM"
        await asyncio.sleep(0.05)
