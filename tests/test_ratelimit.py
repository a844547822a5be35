"""The sans-IO pieces of the abuse limits: the token bucket and the per-address counts."""

from __future__ import annotations

import pytest

from fastnat.errors import ForwarderBusyError
from fastnat.protocol import HelloReply, HelloStatus, hello_error
from fastnat.ratelimit import AddressCounts, TokenBucket


def test_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=100, burst=10, now=0.0)
    assert bucket.wait(0.0) == 0
    bucket.take(30, 0.0)  # a read larger than the balance: a debt of 20
    assert bucket.balance == -20
    assert bucket.wait(0.0) == pytest.approx(0.2)
    assert bucket.wait(0.1) == pytest.approx(0.1)
    assert bucket.wait(0.2) == 0
    assert bucket.wait(100.0) == 0 and bucket.balance == 10, "saved up to the burst, no more"
    assert bucket.try_take(10, 100.0) and not bucket.try_take(1, 100.0)
    assert bucket.balance == 0, "a refused try_take spends nothing"
    assert bucket.wait(100.0, 1) == pytest.approx(0.01)
    bucket.take(5, 99.0)  # a clock that steps back adds nothing
    assert bucket.balance == -5
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)


def test_address_counts_cap_each_address_and_forget_released_ones() -> None:
    counts = AddressCounts(limit=2)
    assert counts.acquire("10.0.0.1") and counts.acquire("10.0.0.1")
    assert not counts.acquire("10.0.0.1"), "the third from one address"
    assert counts.acquire("10.0.0.2"), "another address is not affected"
    assert (counts.count("10.0.0.1"), counts.total, len(counts)) == (2, 3, 2)
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        counts.release(address)
    assert (counts.total, len(counts)) == (0, 0)
    with pytest.raises(ValueError):
        counts.release("10.0.0.1")
    assert len(counts) == 0
    assert not AddressCounts(limit=0).acquire("x")


@pytest.mark.parametrize(
    "status, limit",
    [
        (HelloStatus.BUSY, "max_pending_handshakes"),
        (HelloStatus.IP_CONNECTIONS, "max_connections_per_ip"),
        (HelloStatus.IP_HANDSHAKES, "max_handshakes_per_ip"),
    ],
)
def test_hello_refusal_names_its_limit(status: int, limit: str) -> None:
    error = hello_error(HelloReply(status, 0, bytes(16), (1,)), "forwarder 127.0.0.1:1")
    assert isinstance(error, ForwarderBusyError) and limit in str(error)
    assert HelloStatus.NAMES[status] in ("BUSY", "IP_CONNECTIONS", "IP_HANDSHAKES")


def test_hello_statuses_keep_their_values() -> None:
    assert (HelloStatus.OK, HelloStatus.VERSION_UNSUPPORTED, HelloStatus.BAD_ROLE, HelloStatus.BUSY) == (0, 1, 2, 3)
    assert len(set(HelloStatus.NAMES)) == len(HelloStatus.NAMES) == 6
