"""Helpers of the command-line tests: ``python -m fastnat`` run as a user runs it.

Every command is a real child process on 127.0.0.1; local services are real
sockets served by threads of the test process. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _net_helpers import free_port, wait_until  # noqa: F401 (re-exported)

LOOPBACK = "127.0.0.1"
FASTNAT = [sys.executable, "-m", "fastnat"]
# The console script installed beside the interpreter (``fastnat``).
FASTNAT_SCRIPT = Path(sys.executable).with_name("fastnat")

FORWARDER_READY = re.compile(r"^fastnat forwarder listening on (\S+):(\d+)$")
REGISTRY_READY = re.compile(r"^fastnat registry listening on (\S+):(\d+)$")
EXPOSE_READY = re.compile(r"^fastnat: (\S+) port (\d+) -> (\S+):(\d+), through (.+)$")
LISTEN_READY = re.compile(r"^fastnat: listening on (\S+):(\d+) -> (\S+) port (\d+)$")

# Bounds of every wait of these tests (seconds).
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
RUN_TIMEOUT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: ours without any ``FASTNAT_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNAT_")}
    env["PYTHONUNBUFFERED"] = "1"
    # A warning that a user would see must be seen by the tests too.
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


def run(args: list[str], *, env: dict[str, str] | None = None, input: bytes | None = None,
        timeout: float = RUN_TIMEOUT, cmd: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fastnat ARGS`` to its end (bounded); text output."""
    try:
        proc = subprocess.run(
            (cmd or FASTNAT) + args, env=env if env is not None else clean_env(), input=input,
            capture_output=True, timeout=timeout, start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"fastnat {' '.join(args)} did not end within {timeout} s; "
                             f"stdout {exc.stdout!r}, stderr {exc.stderr!r}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user's mistake: exit code not 0, nothing on stdout, exactly ONE line on
    stderr starting with ``fastnat: error:`` and no traceback. Returns the line."""
    described = f"exit {result.returncode}, stdout {result.stdout!r}, stderr {result.stderr!r}"
    assert "Traceback" not in result.stderr, f"a traceback for a user's mistake: {described}"
    assert result.returncode not in (0, None), f"a user's mistake exited 0: {described}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"a user's mistake must print ONE line on stderr, got {len(lines)}: {described}"
    assert lines[0].startswith("fastnat: error: "), f"the error line must start with 'fastnat: error: ': {described}"
    assert result.stdout == "", f"a failed command printed on stdout: {described}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"the error line should mention {needle!r}: {lines[0]!r}"
    return lines[0]


# -------------------------------------------------------------- processes


class Proc:
    """A running ``fastnat`` command in its own process group.

    stdout is read line by line by a thread (:meth:`wait_line`); stderr goes
    to a file (:meth:`stderr`). :meth:`kill` always reaps the whole group.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, *, stdin: Any = subprocess.DEVNULL,
                 cmd: list[str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()/wait()
        self.proc = subprocess.Popen((cmd or FASTNAT) + args, stdout=subprocess.PIPE, stderr=self._log, stdin=stdin,
                                     env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"stdout of {args[:1]}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\r\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_line(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first stdout line matching ``pattern`` (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"fastnat {' '.join(self.args)}: no line matching {pattern.pattern!r} within "
                                     f"{timeout} s; stdout {self.seen!r}, stderr {self.stderr()[-3000:]!r}")
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)
                self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"fastnat {' '.join(self.args)} ended (exit {self.proc.returncode}) before "
                                     f"{pattern.pattern!r}; stdout {self.seen!r}, stderr {self.stderr()[-3000:]!r}")
            self.seen.append(line)
            found = pattern.search(line)
            if found:
                return found

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code, waited for at most ``timeout`` s (then the group is killed and the test fails)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fastnat {' '.join(self.args)} did not end within {timeout} s; "
                                 f"stderr {self.stderr()[-3000:]!r}") from None
        self._reader.join(timeout=STOP_TIMEOUT)
        return code

    def rest_of_stdout(self) -> list[str]:
        """Every stdout line not yet consumed (after the process ended)."""
        out = []
        while True:
            try:
                line = self.lines.get(timeout=STOP_TIMEOUT)
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            self.seen.append(line)
            out.append(line)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)
        else:
            # The leader is gone; members it left behind are not.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._log.close()


class Processes:
    """Starts ``fastnat`` commands for one test and kills every one of them afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> Proc:
        log = self.tmp_path / f"proc-{len(self.started)}-{args[0]}.stderr"
        proc = Proc(args, env if env is not None else clean_env(), log, **kwargs)
        self.started.append(proc)
        return proc

    def forwarder(self, *extra: str, env: dict[str, str] | None = None) -> tuple[Proc, int]:
        """``fastnat forwarder --host 127.0.0.1 --port 0 EXTRA``: the process and its port."""
        proc = self.start(["forwarder", "--host", LOOPBACK, "--port", "0", *extra], env)
        found = proc.wait_line(FORWARDER_READY)
        return proc, int(found.group(2))

    def expose(self, server_id: str, port: int, to: tuple[str, int], fwd_port: int, *extra: str,
               env: dict[str, str] | None = None) -> Proc:
        """``fastnat expose`` through the registry the forwarder hosts, ready."""
        proc = self.start(["expose", server_id, str(port), "--to", f"{to[0]}:{to[1]}", *extra],
                          env if env is not None else clean_env(FASTNAT_REGISTRY=registry_url(fwd_port)))
        proc.wait_line(EXPOSE_READY)
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.kill()


def registry_url(port: int, host: str = LOOPBACK) -> str:
    return f"fastnat://{host}:{port}"


# ------------------------------------------------------------ registry


def lookup(url: str, key: str) -> list[str]:
    """The live values of ``key`` in the registry at ``url``."""
    from fastnat.discovery import open_registry

    async def ask() -> list[str]:
        registry = open_registry(url)
        try:
            return await asyncio.wait_for(registry.lookup(key, 50), 10)
        finally:
            await registry.close()

    return asyncio.run(ask())


def status_json(fwd_port: int) -> dict[str, Any]:
    result = run(["status", "--json", "--forwarder", f"{LOOPBACK}:{fwd_port}"])
    assert result.returncode == 0, result
    return json.loads(result.stdout)


# -------------------------------------------------------- local services


class Service:
    """A TCP service on 127.0.0.1 served by a thread: ``handler(conn)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.port = self.address[1]
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="service")
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(RUN_TIMEOUT)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)


def recv_until_eof(conn: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    chunks = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return bytes(chunks)
        chunks += chunk
        if len(chunks) > limit:
            raise AssertionError("more data than expected")


def recv_line(conn: socket.socket, limit: int = 4096) -> bytes:
    data = bytearray()
    while not data.endswith(b"\r\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise AssertionError(f"no line end within {limit} bytes: {bytes(data)!r}")
    return bytes(data)


def echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


@contextlib.contextmanager
def connected(address: tuple[str, int], timeout: float = RUN_TIMEOUT) -> Iterator[socket.socket]:
    with socket.create_connection(address, timeout=timeout) as conn:
        yield conn
