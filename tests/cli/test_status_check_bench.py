"""``status`` (table and JSON), ``check`` and ``bench`` as a user reads them."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable

from .support import (
    LOOPBACK,
    Processes,
    Service,
    clean_env,
    free_port,
    recv_until_eof,
    registry_url,
    run,
    status_json,
    wait_until,
)

# -------------------------------------------------------------- status


def _sink_then_answer(answer: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        recv_until_eof(conn)
        conn.sendall(answer)

    return handler


def test_status_counts_a_relayed_connection(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    upload, answer = os.urandom(123_457), os.urandom(54_321)
    service = services(_sink_then_answer(answer))
    procs.expose("web", 80, service.address, forwarder)
    procs.expose("mail", 25, service.address, forwarder)
    result = run(["connect", "web", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=upload)
    assert result.returncode == 0, result.stderr
    stats = wait_until(lambda: (s := status_json(forwarder))["clients_active"] == 0 and s, 10, "the client to end")
    assert stats["servers"] == 2 and stats["sessions"] == 2, stats
    assert stats["clients_total"] == 1
    assert stats["bytes_client_to_server"] == len(upload), stats
    assert stats["bytes_server_to_client"] == len(answer), stats
    web = stats["per_server"]["web"]
    assert web["ports"] == [80] and web["clients_total"] == 1 and web["clients_active"] == 0
    assert web["bytes_client_to_server"] == len(upload) and web["bytes_server_to_client"] == len(answer)
    assert stats["per_server"]["mail"]["clients_total"] == 0
    assert stats["refusals"] == {} or sum(stats["refusals"].values()) == 0

    table = run(["status", "--forwarder", f"{LOOPBACK}:{forwarder}"])
    assert table.returncode == 0 and table.stderr == "", table
    text = table.stdout
    assert re.search(r"^servers\s+2$", text, re.M), text
    assert re.search(r"^clients\s+0 active, 1 total$", text, re.M), text
    assert f"{len(upload):,} client->server" in text and f"{len(answer):,} server->client" in text, text
    assert re.search(r"^refusals\s+none$", text, re.M), text
    header = re.search(r"^server\s+ports\s+clients\s+total\s+bytes in\s+bytes out\s+refused$", text, re.M)
    assert header, text
    row = re.search(r"^web\s+80\s+0\s+1\s+([\d,]+)\s+([\d,]+)\s+0$", text, re.M)
    assert row, text
    assert row.group(1) == f"{len(upload):,}" and row.group(2) == f"{len(answer):,}"
    assert re.search(r"^mail\s+25\s+0\s+0\s+0\s+0\s+0$", text, re.M), text


def test_status_counts_refusals(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    service = services(lambda conn: None)
    procs.expose("web", 80, service.address, forwarder)
    result = run(["connect", "nobody", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"")
    assert result.returncode != 0
    stats = status_json(forwarder)
    assert sum(stats["refusals"].values()) >= 1, stats
    table = run(["status", "--forwarder", f"{LOOPBACK}:{forwarder}"]).stdout
    assert not re.search(r"^refusals\s+none$", table, re.M), table


def test_status_of_an_idle_forwarder_is_all_zero(forwarder: int) -> None:
    """Nothing connected: no servers, no clients, no bytes, and no
    handshake pending (the status request itself is not one)."""
    stats = status_json(forwarder)
    assert stats["servers"] == 0 and stats["sessions"] == 0 and stats["clients_active"] == 0, stats
    assert stats["bytes_client_to_server"] == 0 and stats["bytes_server_to_client"] == 0, stats
    assert stats["per_server"] == {}
    assert stats["pending_handshakes"] == 0, f"an idle forwarder reports pending handshakes: {stats}"


def test_status_finds_the_forwarder_every_way(forwarder: int) -> None:
    """--forwarder, FASTNAT_FORWARDERS and FASTNAT_REGISTRY give the same answer."""
    by_flag = run(["status", "--json", "--forwarder", f"{LOOPBACK}:{forwarder}"])
    by_list = run(["status", "--json"], env=clean_env(FASTNAT_FORWARDERS=f"{LOOPBACK}:{forwarder}"))
    by_registry = run(["status", "--json"], env=clean_env(FASTNAT_REGISTRY=registry_url(forwarder)))
    by_registry_flag = run(["status", "--json", "--registry", registry_url(forwarder)])
    for result in (by_flag, by_list, by_registry, by_registry_flag):
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["servers"] == 0


# --------------------------------------------------------------- check


def _check_lines(stdout: str) -> dict[str, str]:
    fields = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def test_check_on_the_forwarders_own_host(forwarder: int) -> None:
    test_port = free_port()
    result = run(["check", "--forwarder", f"{LOOPBACK}:{forwarder}", "--port", str(test_port)])
    assert result.returncode == 0, result
    fields = _check_lines(result.stdout)
    assert fields["external address"] == LOOPBACK, result.stdout
    assert fields["local address"] == LOOPBACK, result.stdout
    assert fields["NAT layer needed"].startswith("no "), result.stdout
    assert f"{LOOPBACK}:{test_port}" in fields["NAT layer needed"], result.stdout


def test_check_through_the_registry(forwarder: int) -> None:
    result = run(["check"], env=clean_env(FASTNAT_REGISTRY=registry_url(forwarder)))
    assert result.returncode == 0, result
    assert _check_lines(result.stdout)["NAT layer needed"].startswith("no "), result.stdout


def test_check_says_yes_when_the_forwarder_sees_another_address(forwarder: int) -> None:
    """The forwarder sees 127.0.0.1 while the local address tested is 127.0.0.2:
    the seed's rule says this host needs the NAT layer."""
    result = run(["check", "--forwarder", f"{LOOPBACK}:{forwarder}", "--local-ip", "127.0.0.2"])
    assert result.returncode == 0, result
    fields = _check_lines(result.stdout)
    assert fields["external address"] == LOOPBACK
    assert fields["local address"] == "127.0.0.2"
    assert fields["NAT layer needed"].startswith("yes "), result.stdout


# --------------------------------------------------------------- bench


_ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<unit>MB/s|us)\s+(?P<relay>[\d,.]+)\s+(?P<direct>[\d,.]+)\s+(?P<ratio>[\d.]+)x$")


def test_bench_prints_a_table_of_ratios() -> None:
    result = run(["bench", "--size", "4", "--round-trips", "50", "--rounds", "1"], timeout=60)
    assert result.returncode == 0, result
    rows = {}
    for line in result.stdout.splitlines():
        found = _ROW.match(line)
        if found:
            rows[found.group("name")] = found
    assert any(name.startswith("bulk") for name in rows), result.stdout
    assert any("round trip" in name for name in rows), result.stdout
    assert re.search(r"through fastnat\s+direct TCP\s+ratio", result.stdout), result.stdout
    for found in rows.values():
        relay = float(found.group("relay").replace(",", ""))
        direct = float(found.group("direct").replace(",", ""))
        ratio = float(found.group("ratio"))
        assert relay > 0 and direct > 0
        # The printed ratio is the printed figures' ratio (to their rounding).
        assert abs(ratio - relay / direct) <= 0.02 * max(ratio, 1.0) + 0.01, found.group(0)
    assert "4 MiB" in result.stdout and "50 round trips" in result.stdout, result.stdout
    # Progress goes to stderr, never into the table.
    assert "round 1/1" in result.stderr
    assert "round 1/1" not in result.stdout


def test_bench_json() -> None:
    result = run(["bench", "--size", "4", "--round-trips", "50", "--rounds", "1", "--json"], timeout=60)
    assert result.returncode == 0, result
    data = json.loads(result.stdout)
    assert data["settings"] == {"size_mib": 4, "round_trips": 50, "rounds": 1}
    for side in ("relay", "direct"):
        assert data[side]["bulk_mb_s"] > 0 and data[side]["rtt_p50_us"] > 0
    assert abs(data["ratios"]["bulk"] - data["relay"]["bulk_mb_s"] / data["direct"]["bulk_mb_s"]) < 1e-6
    assert abs(data["ratios"]["rtt_p50"] - data["relay"]["rtt_p50_us"] / data["direct"]["rtt_p50_us"]) < 1e-6


def test_bench_refuses_silly_sizes() -> None:
    from .support import assert_user_error

    assert_user_error(run(["bench", "--size", "0"]), "--size")
    assert_user_error(run(["bench", "--round-trips", "1"]), "--round-trips")
