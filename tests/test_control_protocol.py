"""The control protocol's parsers, on input a hostile peer could send."""

from __future__ import annotations

import pytest

from fastnat.protocol import (
    ControlProtocolError,
    MessageReader,
    encode_message,
    encode_request,
    parse_reply,
    parse_request,
)


def test_a_bad_message_after_good_ones_loses_none_of_them() -> None:
    """Messages decoded before bad input in the same feed are returned; the
    error comes with the next feed, and stays (the stream is broken)."""
    reader = MessageReader()
    good = [encode_message({"n": n}) for n in range(3)]
    assert reader.feed(b"".join(good) + b"\x00\x00\x00\x02{x") == [{"n": 0}, {"n": 1}, {"n": 2}]
    with pytest.raises(ControlProtocolError, match="not valid UTF-8 JSON"):
        reader.feed(b"")
    with pytest.raises(ControlProtocolError):
        reader.feed(encode_message({"n": 3}))


def test_bad_input_alone_raises_at_once() -> None:
    with pytest.raises(ControlProtocolError, match="cap"):
        MessageReader(max_size=10).feed(b"\x00\x01\x00\x00")


@pytest.mark.parametrize(
    "ip",
    ["fe80::1%eth0\nFORGED LOG LINE", "fe80::1%x y", "fe80::1%" + "a" * 16, "fe80::1%", "10.0.0.1%eth0"],
)
def test_open_refuses_an_address_with_a_bad_zone(ip: str) -> None:
    """ipaddress takes any text after "%" as an IPv6 zone; the protocol takes an
    interface name or number, and only on IPv6."""
    message = {"id": 1, "request": "open", "value": {"server": "s", "port": 80, "client": [ip, 5]}}
    with pytest.raises(ControlProtocolError, match="bad zone|not an IP address") as info:
        parse_request(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ip", ["fe80::1%eth0", "fe80::1%3", "fe80::1%br-4f2a.100", "192.0.2.7", "2001:db8::1"])
def test_open_takes_real_addresses(ip: str) -> None:
    request = parse_request({"id": 1, "request": "open", "value": {"server": "s", "port": 80, "client": [ip, 5]}})
    assert request.value["client"] == [ip, 5]
    assert MessageReader().feed(request.encode()) == [{"id": 1, "request": "open", "value": request.value}]


def test_peer_text_in_errors_is_quoted_and_cut() -> None:
    """Field names and names a peer chose reach log lines through these errors:
    control characters are escaped and long text is cut."""
    forged = "x\nWARNING forged entry " + "y" * 70_000
    for bad in (
        {"id": 1, "request": "stats", "value": None, forged: 1},
        {"id": 1, "request": "reg_serv", "value": {"server": "s", forged: 1}},
        {"id": 1, "request": forged, "value": None},
    ):
        with pytest.raises(ControlProtocolError) as info:
            parse_request(bad)
        text = str(info.value)
        assert "\n" not in text and len(text) < 200, text
        assert "'x\\nWARNING forged" in text
    with pytest.raises(ControlProtocolError) as info:
        parse_reply({"id": 1, "status": forged, "value": None})
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_encode_request_refuses_what_parse_request_refuses() -> None:
    with pytest.raises(ControlProtocolError, match="bad zone"):
        encode_request(1, "open", {"server": "s", "port": 80, "client": ["fe80::1%a b", 5]})
