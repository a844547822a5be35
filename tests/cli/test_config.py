"""``-v``/``-q`` logging, and configuration by ``FASTNAT_*`` environment variables."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from .support import (
    EXPOSE_READY,
    FORWARDER_READY,
    LISTEN_READY,
    LOOPBACK,
    REGISTRY_READY,
    Processes,
    Service,
    clean_env,
    connected,
    echo,
    free_port,
    lookup,
    recv_until_eof,
    registry_url,
    run,
    status_json,
    wait_until,
)

_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", re.M)


def levels(text: str) -> set[str]:
    return set(_LOG.findall(text))


# ------------------------------------------------------------- logging


def test_default_logging_shows_no_info(procs: Processes) -> None:
    proc, port = procs.forwarder()
    procs.expose("web", 80, (LOOPBACK, free_port()), port)
    wait_until(lambda: status_json(port)["servers"] == 1, 10, "the expose to register")
    assert "INFO" not in levels(proc.stderr()) and "DEBUG" not in levels(proc.stderr()), proc.stderr()


def test_verbose_logs_what_happens(procs: Processes) -> None:
    proc = procs.start(["-v", "forwarder", "--host", LOOPBACK, "--port", "0"])
    port = int(proc.wait_line(FORWARDER_READY).group(2))
    expose = procs.start(["-v", "expose", "web", "80", "--forwarder", f"{LOOPBACK}:{port}"])
    expose.wait_line(EXPOSE_READY)
    wait_until(lambda: "registered 'web'" in proc.stderr(), 10, "the forwarder to log the registration")
    assert "INFO" in levels(proc.stderr())
    assert "INFO" in levels(expose.stderr()), expose.stderr()
    assert "DEBUG" not in levels(proc.stderr()), "-v is INFO; DEBUG needs -vv"


def test_very_verbose_is_at_least_as_verbose(procs: Processes) -> None:
    proc = procs.start(["-vv", "forwarder", "--host", LOOPBACK, "--port", "0"])
    port = int(proc.wait_line(FORWARDER_READY).group(2))
    expose = procs.start(["-vv", "expose", "web", "80", "--forwarder", f"{LOOPBACK}:{port}"])
    expose.wait_line(EXPOSE_READY)
    wait_until(lambda: "registered 'web'" in proc.stderr(), 10, "the forwarder to log the registration")


def test_quiet_hides_warnings(procs: Processes, forwarder: int) -> None:
    """A client reaching a missing local service is a WARNING of expose; -q hides it."""
    dead = free_port()
    loud = procs.start(["expose", "loud", "80", "--to", f"{LOOPBACK}:{dead}", "--forwarder", f"{LOOPBACK}:{forwarder}"])
    quiet = procs.start(["-q", "expose", "quiet", "80", "--to", f"{LOOPBACK}:{dead}",
                         "--forwarder", f"{LOOPBACK}:{forwarder}"])
    loud.wait_line(EXPOSE_READY)
    quiet.wait_line(EXPOSE_READY)
    for server_id in ("loud", "quiet"):
        run(["connect", server_id, "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"")
    wait_until(lambda: "WARNING" in levels(loud.stderr()), 10, "expose to warn about the missing local service")
    wait_until(lambda: status_json(forwarder)["clients_active"] == 0, 10, "the clients to end")
    assert quiet.stderr() == "", f"-q printed: {quiet.stderr()!r}"


def test_quiet_still_prints_errors() -> None:
    result = run(["-q", "status", "--forwarder", f"{LOOPBACK}:{free_port()}"])
    assert result.returncode != 0
    assert result.stderr.startswith("fastnat: error: "), result.stderr


# ---------------------------------------------------------- environment


def test_fastnat_port_and_host(procs: Processes) -> None:
    port = free_port()
    proc = procs.start(["forwarder"], clean_env(FASTNAT_PORT=str(port), FASTNAT_HOST=LOOPBACK))
    found = proc.wait_line(FORWARDER_READY)
    assert (found.group(1), int(found.group(2))) == (LOOPBACK, port)
    assert status_json(port)["servers"] == 0


def test_flag_beats_fastnat_port(procs: Processes) -> None:
    port, other = free_port(), free_port()
    proc = procs.start(["forwarder", "--host", LOOPBACK, "--port", str(port)], clean_env(FASTNAT_PORT=str(other)))
    assert int(proc.wait_line(FORWARDER_READY).group(2)) == port


def test_fastnat_forwarders_alone_is_enough(procs: Processes, forwarder: int,
                                            services: Callable[..., Service]) -> None:
    """No registry: expose and connect both take the forwarder from FASTNAT_FORWARDERS."""
    env = clean_env(FASTNAT_FORWARDERS=f"{LOOPBACK}:{forwarder}")
    service = services(echo)
    proc = procs.start(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}"], env)
    assert proc.wait_line(EXPOSE_READY).group(5) == f"{LOOPBACK}:{forwarder}"
    result = run(["connect", "web", "80"], env=env, input=b"via FASTNAT_FORWARDERS")
    assert result.returncode == 0, result
    assert result.stdout == "via FASTNAT_FORWARDERS"
    tunnel = procs.start(["connect", "web", "80", "--listen", f"{LOOPBACK}:{free_port()}"], env)
    found = tunnel.wait_line(LISTEN_READY)
    with connected((found.group(1), int(found.group(2)))) as conn:
        conn.sendall(b"tunnel")
        conn.shutdown(socket.SHUT_WR)
        assert recv_until_eof(conn) == b"tunnel"


def test_fastnat_forwarders_tries_the_next_one(procs: Processes, forwarder: int,
                                               services: Callable[..., Service]) -> None:
    """A dead forwarder first in the list does not stop expose nor connect."""
    env = clean_env(FASTNAT_FORWARDERS=f"{LOOPBACK}:{free_port()},{LOOPBACK}:{forwarder}")
    service = services(echo)
    proc = procs.start(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}"], env)
    assert proc.wait_line(EXPOSE_READY).group(5) == f"{LOOPBACK}:{forwarder}"
    result = run(["connect", "web", "80"], env=env, input=b"second")
    assert result.returncode == 0, result
    assert result.stdout == "second"


def test_fastnat_registry(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    env = clean_env(FASTNAT_REGISTRY=registry_url(forwarder))
    service = services(echo)
    procs.start(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}"], env).wait_line(EXPOSE_READY)
    result = run(["connect", "web", "80"], env=env, input=b"via FASTNAT_REGISTRY")
    assert result.returncode == 0, result
    assert result.stdout == "via FASTNAT_REGISTRY"


def test_registry_flag_beats_the_environment(procs: Processes, forwarder: int,
                                             services: Callable[..., Service]) -> None:
    dead = registry_url(free_port())
    env = clean_env(FASTNAT_REGISTRY=dead)
    service = services(echo)
    procs.start(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}", "--registry", registry_url(forwarder)],
                env).wait_line(EXPOSE_READY)
    result = run(["connect", "web", "80", "--registry", registry_url(forwarder)], env=env, input=b"flag wins")
    assert result.returncode == 0, result
    assert result.stdout == "flag wins"


def test_forwarder_flag_beats_the_environment(forwarder: int) -> None:
    env = clean_env(FASTNAT_FORWARDERS=f"{LOOPBACK}:{free_port()}", FASTNAT_REGISTRY=registry_url(free_port()))
    result = run(["status", "--json", "--forwarder", f"{LOOPBACK}:{forwarder}"], env=env)
    assert result.returncode == 0, result


def test_a_registry_with_a_secret(procs: Processes, services: Callable[..., Service], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``fastnat registry --secret``: a forwarder and an expose that know the
    secret write to it (the forwarder advertises, the server announces); an
    expose that does not is refused, and says why."""
    registry = procs.start(["registry", "--host", LOOPBACK, "--port", "0", "--secret", "reg-s3cret"])
    url = registry_url(int(registry.wait_line(REGISTRY_READY).group(2)))
    _, fwd_port = procs.forwarder("--registry", url, "--secret", "reg-s3cret")
    wait_until(lambda: lookup(url, "__NAT__FORWARDER__") != [], 10, "the forwarder to advertise itself")
    service = services(echo)
    procs.start(["expose", "web", "80", "--to", f"{LOOPBACK}:{service.port}"],
                clean_env(FASTNAT_REGISTRY=url, FASTNAT_SECRET="reg-s3cret")).wait_line(EXPOSE_READY)
    assert lookup(url, "__NAT_SRV__web") == [f"{LOOPBACK}*{fwd_port}"]
    result = run(["connect", "web", "80"], env=clean_env(FASTNAT_REGISTRY=url), input=b"guarded")
    assert result.returncode == 0, result
    assert result.stdout == "guarded"

    # without the secret: the forwarder refuses the id, and says why
    stranger = procs.start(["expose", "other", "80", "--to", f"{LOOPBACK}:{service.port}"], clean_env(FASTNAT_REGISTRY=url))
    assert stranger.wait() != 0
    assert "AUTH_FAILED" in stranger.stderr()
    assert lookup(url, "__NAT_SRV__other") == []


def test_registry_secrets_file_errors_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "secrets"
    bad.write_text("only-an-id\n")
    for args in (["--secrets-file", str(bad)], ["--secrets-file", str(tmp_path / "missing")]):
        result = run(["registry", "--host", LOOPBACK, "--port", "0", *args])
        assert result.returncode != 0
        assert result.stderr.startswith("fastnat: error: cannot read the secrets file") and result.stderr.count("\n") == 1, result
