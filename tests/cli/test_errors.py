"""A user's mistake: ONE line ``fastnat: error: ...`` on stderr, no traceback, exit not 0.

Each case is a real command run to its end with a bound. Where the mistake
needs something to be wrong *about* (an unknown id, a missing local service),
a real forwarder runs on 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from .support import (
    LOOPBACK,
    Processes,
    Service,
    assert_user_error,
    clean_env,
    free_port,
    registry_url,
    run,
)

# ------------------------------------------------------------ bad ports


@pytest.mark.parametrize(
    "args",
    [
        ["forwarder", "--host", LOOPBACK, "--port", "-1"],
        ["registry", "--host", LOOPBACK, "--port", "-1"],
    ],
    ids=["forwarder-negative", "registry-negative"],
)
def test_negative_listening_port(args: list[str]) -> None:
    line = assert_user_error(run(args, timeout=10))
    assert "port" in line.lower(), f"the error should say the port is wrong: {line!r}"


@pytest.mark.parametrize("command", ["forwarder", "registry"])
def test_listening_port_above_65535_is_refused(command: str) -> None:
    """``--port 99999`` is a mistake; it must not silently listen on another
    port (99999 mod 65536 = 34463) and run forever."""
    result = run([command, "--host", LOOPBACK, "--port", "99999"], timeout=8)
    assert_user_error(result, "port")


@pytest.mark.parametrize("command", ["forwarder", "registry"])
def test_listening_port_that_is_not_a_number(command: str) -> None:
    assert_user_error(run([command, "--host", LOOPBACK, "--port", "abc"], timeout=10), "port")


def test_listening_port_in_use(procs: Processes) -> None:
    _, port = procs.forwarder()
    line = assert_user_error(run(["forwarder", "--host", LOOPBACK, "--port", str(port)], timeout=10))
    assert "in use" in line, line
    line = assert_user_error(run(["registry", "--host", LOOPBACK, "--port", str(port)], timeout=10))
    assert "in use" in line, line


def test_listening_address_not_of_this_host() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a host.
    line = assert_user_error(run(["forwarder", "--host", "192.0.2.1", "--port", "0"], timeout=10))
    assert "192.0.2.1" in line, line


@pytest.mark.parametrize("port", ["0", "70000"])
@pytest.mark.parametrize("command", ["expose", "connect"])
def test_service_port_out_of_range(command: str, port: str, forwarder: int) -> None:
    args = [command, "web", port, "--forwarder", f"{LOOPBACK}:{forwarder}"]
    line = assert_user_error(run(args, input=b"", timeout=15))
    assert port in line and "port" in line, line


def test_service_port_not_a_number(forwarder: int) -> None:
    assert_user_error(run(["expose", "web", "http", "--forwarder", f"{LOOPBACK}:{forwarder}"], timeout=10), "port")


@pytest.mark.parametrize("flag", ["--forwarder", "--to", "--listen"])
def test_address_with_port_out_of_range(flag: str, forwarder: int) -> None:
    command = "connect" if flag == "--listen" else "expose"
    args = [command, "web", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"]
    args += [flag, f"{LOOPBACK}:99999"]
    assert_user_error(run(args, input=b"", timeout=10), "99999")


def test_listen_error_names_the_listen_address_not_a_forwarder(forwarder: int) -> None:
    """A bad ``--listen`` address is not a bad *forwarder* address."""
    args = ["connect", "web", "80", "--forwarder", f"{LOOPBACK}:{forwarder}", "--listen", f"{LOOPBACK}:99999"]
    result = run(args, timeout=10)
    assert "forwarder" not in result.stderr.lower(), result.stderr


def test_listen_on_port_zero_picks_a_free_port(procs: Processes, forwarder: int) -> None:
    """``--listen HOST:0`` is how a user asks for any free port; the ready
    line then says which one (like every listening command here)."""
    proc = procs.start(["connect", "web", "80", "--forwarder", f"{LOOPBACK}:{forwarder}", "--listen", f"{LOOPBACK}:0"])
    from .support import LISTEN_READY

    found = proc.wait_line(LISTEN_READY, timeout=10)
    assert int(found.group(2)) != 0


# ----------------------------------------------------------- unknown ids


def test_unknown_id_through_the_registry(forwarder: int) -> None:
    env = clean_env(FASTNAT_REGISTRY=registry_url(forwarder))
    assert_user_error(run(["connect", "nobody", "80"], env=env, input=b"hello"), "nobody")


def test_unknown_id_at_a_named_forwarder(forwarder: int) -> None:
    result = run(["connect", "nobody", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"hello")
    assert_user_error(result, "nobody")


def test_known_id_unknown_port(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    service = services(lambda conn: None)
    procs.expose("web", 80, service.address, forwarder)
    result = run(["connect", "web", "81", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"hello")
    assert_user_error(result, "81")


def test_id_held_by_another_expose(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    service = services(lambda conn: None)
    procs.expose("web", 80, service.address, forwarder)
    result = run(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}", "--no-persist",
                  "--forwarder", f"{LOOPBACK}:{forwarder}"], timeout=20)
    assert_user_error(result, "web")


# --------------------------------------------------- unreachable forwarder


def _dead_port() -> int:
    return free_port()


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["check"],
        ["connect", "web", "80"],
        ["expose", "web", "80", "--no-persist"],
    ],
    ids=["status", "check", "connect", "expose"],
)
def test_unreachable_forwarder_named_by_flag(args: list[str]) -> None:
    dead = _dead_port()
    result = run([*args, "--forwarder", f"{LOOPBACK}:{dead}"], input=b"", timeout=20)
    assert_user_error(result, str(dead))


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["check"],
        ["connect", "web", "80"],
        ["expose", "web", "80", "--no-persist"],
    ],
    ids=["status", "check", "connect", "expose"],
)
def test_unreachable_forwarder_through_its_registry(args: list[str]) -> None:
    """``FASTNAT_REGISTRY`` names the forwarder's own address: nothing listens there."""
    dead = _dead_port()
    env = clean_env(FASTNAT_REGISTRY=registry_url(dead))
    assert_user_error(run(args, env=env, input=b"", timeout=20), str(dead))


@pytest.mark.parametrize("args", [["status"], ["connect", "web", "80"], ["expose", "web", "80"]],
                         ids=["status", "connect", "expose"])
def test_no_forwarder_configured_at_all(args: list[str]) -> None:
    line = assert_user_error(run(args, input=b"", timeout=15))
    assert "FASTNAT_FORWARDERS" in line or "FASTNAT_REGISTRY" in line, line


# ------------------------------------------------------ bad registry URLs


@pytest.mark.parametrize("url", ["nonsense", "foo://127.0.0.1:1", "fastnat://127.0.0.1", "fastnat://:12345"])
@pytest.mark.parametrize("command", ["expose", "connect", "status", "check"])
def test_bad_registry_url_flag(command: str, url: str) -> None:
    args = [command, "web", "80"] if command in ("expose", "connect") else [command]
    assert_user_error(run([*args, "--registry", url], input=b"", timeout=15))


@pytest.mark.parametrize("command", ["expose", "connect", "status", "forwarder"])
def test_bad_registry_url_from_environment(command: str) -> None:
    args = {"expose": ["expose", "web", "80"], "connect": ["connect", "web", "80"], "status": ["status"],
            "forwarder": ["forwarder", "--host", LOOPBACK, "--port", "0"]}[command]
    assert_user_error(run(args, env=clean_env(FASTNAT_REGISTRY="nonsense"), input=b"", timeout=15), "nonsense")


def test_bad_forwarders_list_from_environment() -> None:
    result = run(["status"], env=clean_env(FASTNAT_FORWARDERS="127.0.0.1:notaport"), timeout=15)
    assert_user_error(result, "notaport")


def test_bad_port_from_environment() -> None:
    """``FASTNAT_PORT`` is read when the parser is built: a bad value must
    still be one line, and must not break commands that do not use it."""
    assert_user_error(run(["forwarder", "--host", LOOPBACK], env=clean_env(FASTNAT_PORT="abc"), timeout=10), "FASTNAT_PORT")
    result = run(["status", "--help"], env=clean_env(FASTNAT_PORT="abc"), timeout=10)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result


# -------------------------------------------------- missing local service


@pytest.mark.parametrize("payload", [b"", b"GET / HTTP/1.0\r\n\r\n"], ids=["nothing-sent", "request-sent"])
def test_missing_local_service(procs: Processes, forwarder: int, payload: bytes) -> None:
    """``expose`` of a port nothing listens on: every client is told, in one
    line, with a non-zero exit -- whether or not it sent something first
    (tried several times: the outcome must not depend on timing)."""
    dead = _dead_port()
    procs.expose("web", 80, (LOOPBACK, dead), forwarder)
    env = clean_env(FASTNAT_REGISTRY=registry_url(forwarder))
    for attempt in range(6):
        result = run(["connect", "web", "80"], env=env, input=payload, timeout=20)
        try:
            assert_user_error(result)
        except AssertionError as exc:
            raise AssertionError(f"attempt {attempt + 1}: {exc}") from None


def test_missing_local_service_is_logged_by_expose(procs: Processes, forwarder: int) -> None:
    dead = _dead_port()
    proc = procs.expose("web", 80, (LOOPBACK, dead), forwarder)
    run(["connect", "web", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"x", timeout=20)
    from .support import wait_until

    wait_until(lambda: f"{LOOPBACK}:{dead}" in proc.stderr(), 10, "expose to log the unreachable local service")
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert proc.alive(), "a missing local service must not stop expose"


def test_secrets_file_missing() -> None:
    assert_user_error(run(["forwarder", "--host", LOOPBACK, "--port", "0", "--secrets-file", "/nonexistent/secrets"],
                          timeout=10), "/nonexistent/secrets")


def test_connect_refused_by_a_plain_tcp_port() -> None:
    """A ``--forwarder`` that is some other TCP service (it closes at once)."""
    with socket.socket() as other:
        other.bind((LOOPBACK, 0))
        other.listen(4)
        port = other.getsockname()[1]
        import threading

        def close_all() -> None:
            other.settimeout(15)
            for _ in range(4):
                try:
                    conn, _ = other.accept()
                except OSError:
                    return
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.close()

        t = threading.Thread(target=close_all, daemon=True)
        t.start()
        result = run(["status", "--forwarder", f"{LOOPBACK}:{port}"], timeout=20)
        assert_user_error(result)
