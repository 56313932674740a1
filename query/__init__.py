"""The read API: rollup queries planned purely, run on a read-only engine, cached in Redis.

Pure modules (no I/O): `timerange`, `params`, `cursor`, `planner`, `render`,
`cache_policy`, `catalog`. I/O sits at the edges: `cache` (Redis), `service`
(Postgres), `lag` (Kafka + Postgres), `routes` and `app` (HTTP).
"""
