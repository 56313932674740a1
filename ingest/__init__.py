"""Ingest service: POST /v1/events -> validated, normalized envelopes durable in Kafka."""
