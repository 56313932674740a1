"""Kafka TLS/SASL options: every client gets the same ones; SASL without credentials is refused."""

from __future__ import annotations

import ssl

import pytest
from pydantic import ValidationError

from core.kafka import security
from core.settings import Settings


def test_plaintext_by_default() -> None:
    assert security(Settings(env="test")) == {"security_protocol": "PLAINTEXT"}


def test_sasl_over_tls() -> None:
    options = security(Settings(env="test", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                                kafka_sasl_username="tally", kafka_sasl_password="s3cret"))  # noqa: S106
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "tally", "sasl_plain_password": "s3cret"}


def test_tls_with_a_missing_ca_file_fails_loudly(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError):
        security(Settings(env="test", kafka_security_protocol="SSL", kafka_ssl_cafile=f"{tmp_path}/nope.pem"))


def test_sasl_needs_credentials() -> None:
    with pytest.raises(ValidationError, match="TALLY_KAFKA_SASL_USERNAME and TALLY_KAFKA_SASL_PASSWORD"):
        Settings(env="test", kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="tally")
