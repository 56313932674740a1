"""Shared runtime: settings, clients, metrics, health, the `tally` CLI and the dev stack."""
