"""Kafka -> Postgres aggregation workers with an exactly-once effect (DESIGN §5).

Shaped as small steps, each a module with one job: `decode` (records -> events,
undecodable records -> DLQ), `validate` (events the aggregator cannot use ->
DLQ), `aggregate` (pure pre-aggregation), `batch` (one poll -> one prepared
batch, pure), `flush` (one Postgres transaction), glued by `runner` and started
by `main.run`. Pure steps never do I/O so they are tested without servers.
"""
