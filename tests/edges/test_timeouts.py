"""Timeouts with absurd integers are the client's mistake (400 / INVALID_ARGUMENT), never an OverflowError (500)."""

from __future__ import annotations

import pytest

from server.core.errors import InvalidInput
from server.edges.common.oip_codec import parse_timeout
from server.edges.http.classify import timeout_field


def test_a_400_digit_timeout_ms_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="timeout_ms must be a number"):
        timeout_field({"timeout_ms": 10**400}, "timeout_ms", 1e-3)
    assert timeout_field({"timeout_ms": 1500}, "timeout_ms", 1e-3) == pytest.approx(1.5)


def test_an_oip_timeout_beyond_int64_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="positive 64-bit integer"):
        parse_timeout({"timeout": 10**400})
    assert parse_timeout({"timeout": 2_000_000}) == pytest.approx(2.0)
