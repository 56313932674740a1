"""Tally's contracts: event rules, the Kafka envelope, rollup specs, tables, API models.

This package imports nothing else of Tally's, so every service can depend on it.
"""
