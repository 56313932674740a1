"""Settings that contradict each other are refused at start-up, naming both variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_a_default_page_above_the_maximum_is_refused() -> None:
    assert Settings(env="test", default_limit=10_000, max_limit=10_000).default_limit == 10_000
    with pytest.raises(ValidationError, match=r"TALLY_DEFAULT_LIMIT \(10001\) is above TALLY_MAX_LIMIT \(10000\)"):
        Settings(env="test", default_limit=10_001, max_limit=10_000)


def test_a_tls_certificate_without_its_key_is_refused() -> None:
    assert Settings(env="test", tls_cert_file="c.pem", tls_key_file="k.pem").tls_key_file is not None
    with pytest.raises(ValidationError, match="TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE go together"):
        Settings(env="test", tls_cert_file="c.pem")
