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

A streamed CSV export frozen mid-transfer: its body is cut off within the deadline of the chunk
it was fetching, and its slot is free for the next export. Before the fix this test came with, it
waited for ever, holding one of TALLY_MAX_EXPORTS.

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
from datetime import datetime
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


async def test_a_streamed_export_ends_when_postgres_freezes_mid_transfer(
    settings: Settings, private_postgres: devstack.EmbeddedServer
) -> None:
    """An export may take as long as its reader, but each step on the database gets the deadline:
    frozen mid-transfer, the body is cut off within the deadline (plus slack) and the export's slot
    is free again (one slot: a held one would refuse the next export as "already running")."""
    # The first rows of ~790k need the whole grouping (a few hundred ms; seconds on a loaded machine).
    timeout_ms = 4 * STATEMENT_TIMEOUT_MS
    bound = timeout_ms / 1000 + DEADLINE_MARGIN_SECONDS + 1.5
    config = settings.model_copy(update={
        "postgres_url": private_postgres.url, "statement_timeout_ms": timeout_ms, "max_exports": 1})
    await migrate(config)
    conn = await asyncpg.connect(private_postgres.url)
    try:  # every minute of WHOLE x 3 types x 3 sources: ~27 MB of CSV, more than the socket buffers hold
        rows = await conn.fetchval(
            "WITH i AS (INSERT INTO agg_events_by_type (bucket, type, source, count)"
            " SELECT b, t, s, 1 FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 minute',"
            " interval '1 minute') b, unnest(ARRAY['buy', 'click', 'view']) t, unnest(ARRAY['', 'ios', 'web']) s"
            " RETURNING 1) SELECT count(*) FROM i",
            datetime.fromisoformat(WHOLE["from"]), datetime.fromisoformat(WHOLE["to"]))
    finally:
        await conn.close()
    export = {**WHOLE, "granularity": "minute", "fields": "bucket,type,source,count", "format": "csv",
              "limit": "1000000"}
    async with serve(query_app(config)) as url, httpx.AsyncClient(base_url=url, timeout=30) as query:
        lines = 0
        async with query.stream("GET", ROLLUP, params=export) as response:
            assert response.status_code == 200 and response.headers["x-cache"] == "stream", await response.aread()
            chunks = response.aiter_raw()
            lines += (await anext(chunks)).count(b"\n")
            signal_all(private_postgres, signal.SIGSTOP)
            try:
                frozen = time.monotonic()
                with pytest.raises(httpx.RemoteProtocolError):  # the server closed the unfinished body
                    async for chunk in chunks:
                        lines += chunk.count(b"\n")
                cut = time.monotonic() - frozen
                during = await probe(query, ROLLUP, params=export)  # the slot is free: the database is not
            finally:
                signal_all(private_postgres, signal.SIGCONT)
        after = await probe(query, ROLLUP, params={**export, "limit": "20000"})
    print(f"export cut {cut:.2f} s after the freeze, after {lines - 1} of {rows} rows; "
          f"the next export while frozen: {during.status} in {during.elapsed:.2f} s")
    assert cut < bound, cut
    assert 1 < lines < rows + 1
    assert_problem_503([during], bound)
    assert "already running" not in json.loads(during.body)["detail"], during  # the slot was given back
    assert after.status == 200 and after.body.count(b"\n") == 20_001  # header + rows, after the thaw
