"""Every command in README.md runs, as written.

Blocks marked ``<!-- readme-test: NAME -->`` are extracted and run; the only
changes are addresses: ``relay.example.net`` becomes 127.0.0.1, and the ports
(12345, 8000, 8080) become free ones, so that tests never collide or leave
loopback. ``pip install .`` is skipped: the package under test is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _net_helpers import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.timeout(120)


def blocks() -> dict[str, tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)```", text, re.S):
        found[match.group(1)] = (match.group(2), match.group(3))
    return found


class Addresses:
    def __init__(self) -> None:
        self.relay = free_port()
        self.web = free_port()
        self.local = free_port()

    def apply(self, code: str) -> str:
        code = code.replace("relay.example.net", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        code = re.sub(r"\b12345\b", str(self.relay), code)
        code = re.sub(r"\b8000\b", str(self.web), code)
        return re.sub(r"\b8080\b", str(self.local), code)


def fastnat_argv(command: str) -> list[str]:
    """A README command line, run with this interpreter's fastnat."""
    argv = shlex.split(command)
    if argv[0] == "fastnat":
        return [sys.executable, "-m", "fastnat", *argv[1:]]
    return argv


class Background:
    """Processes started by a test, all stopped at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], ready: str | None = None, timeout: float = 20.0) -> subprocess.Popen[str]:
        log = open(self.tmp / f"proc{len(self.procs)}.err", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        log.close()
        self.procs.append(proc)
        if ready is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout
            line = ""
            os.set_blocking(proc.stdout.fileno(), False)
            while ready not in line:
                assert proc.poll() is None, f"{argv} exited: {(self.tmp / f'proc{len(self.procs) - 1}.err').read_text()}"
                assert time.monotonic() < deadline, f"{argv} did not print {ready!r} in time"
                chunk = proc.stdout.readline()
                if chunk:
                    line = chunk
                else:
                    time.sleep(0.05)
        return proc

    def stop(self) -> list[int | None]:
        codes = []
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes.append(proc.wait(10))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait(5))
        return codes


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(tmp_path)
    try:
        yield bg
    finally:
        bg.stop()


def test_the_readme_marks_its_commands() -> None:
    names = set(blocks())
    assert {"install-and-run", "quickstart-forwarder", "quickstart-expose", "quickstart-connect",
            "quickstart-use", "python-blocking", "python-asyncio", "tls-forwarder", "tls-expose", "tls-connect"} <= names


def test_install_and_run(background: Background) -> None:
    lang, code = blocks()["install-and-run"]
    addresses = Addresses()
    line = addresses.apply(code.strip())
    install, _, run = line.partition(" && ")
    assert install == "pip install ."  # the package under test is installed already
    background.start(fastnat_argv(run), ready="fastnat forwarder listening on")
    with socket.create_connection(("127.0.0.1", addresses.relay), timeout=5):
        pass
    assert background.stop() == [0]


def test_quickstart(background: Background, tmp_path: Path) -> None:
    b = blocks()
    addresses = Addresses()
    (tmp_path / "index.html").write_text("hello from behind the NAT\n")
    background.start(fastnat_argv(addresses.apply(b["quickstart-forwarder"][1].strip())), ready="listening on")
    background.start(
        [sys.executable, "-m", "http.server", str(addresses.web), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    )
    background.start(fastnat_argv(addresses.apply(b["quickstart-expose"][1].strip())), ready="fastnat: my-laptop port 80")
    background.start(fastnat_argv(addresses.apply(b["quickstart-connect"][1].strip())), ready="fastnat: listening on")
    use = addresses.apply(b["quickstart-use"][1].strip())
    deadline = time.monotonic() + 20
    while True:
        result = subprocess.run(shlex.split(use), capture_output=True, text=True, timeout=20)
        if "hello from behind the NAT" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the web server may still be starting
    assert "hello from behind the NAT" in result.stdout, result
    connect, expose, _web, forwarder = background.stop()  # stopped in reverse order of start
    assert (connect, expose, forwarder) == (0, 0, 0)  # fastnat's commands stop cleanly on SIGTERM


@pytest.mark.slow
def test_tls_quickstart(background: Background, tmp_path: Path) -> None:
    """The TLS part's commands, with certificates for 127.0.0.1 made here."""
    from _tls_helpers import make_tls_files

    files = make_tls_files(tmp_path)
    b = blocks()
    addresses = Addresses()

    def command(name: str) -> list[str]:
        code = addresses.apply(b[name][1].strip())
        for file, path in (("cert.pem", files.cert), ("key.pem", files.key), ("ca.pem", files.ca)):
            code = code.replace(f" {file}", f" {path}")
        return fastnat_argv(code)

    (tmp_path / "index.html").write_text("hello over TLS\n")
    background.start(command("tls-forwarder"), ready="listening on")
    background.start(
        [sys.executable, "-m", "http.server", str(addresses.web), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    )
    background.start(command("tls-expose"), ready="fastnat: my-laptop port 80")
    background.start(command("tls-connect"), ready="fastnat: listening on")
    use = addresses.apply(b["quickstart-use"][1].strip())
    deadline = time.monotonic() + 20
    while True:
        result = subprocess.run(shlex.split(use), capture_output=True, text=True, timeout=20, check=False)
        if "hello over TLS" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the web server may still be starting
    assert "hello over TLS" in result.stdout, result
    connect, expose, _web, forwarder = background.stop()
    assert (connect, expose, forwarder) == (0, 0, 0)


def _run_python_block(name: str, background: Background) -> str:
    addresses = Addresses()
    background.start(
        [sys.executable, "-m", "fastnat", "forwarder", "--host", "127.0.0.1", "--port", str(addresses.relay)],
        ready="listening on",
    )
    code = addresses.apply(blocks()[name][1])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_python_blocking_example(background: Background) -> None:
    out = _run_python_block("python-blocking", background)
    assert "you are 127.0.0.1, you said hello" in out


def test_python_asyncio_example(background: Background) -> None:
    out = _run_python_block("python-asyncio", background)
    assert "client at ('127.0.0.1'" in out and "b'ping'" in out


def test_engine_example() -> None:
    result = subprocess.run([sys.executable, "-c", blocks()["engine"][1]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "b'hello'"], result.stdout


# The README's benchmark commands, each run here with arguments that make it
# small (later flags override the same flag given earlier): they must run to
# the end and print their tables. The figures themselves are not checked.
SMALL_RUN = {
    "bench/report_mux.py": ["--rounds", "1", "--min-sample", "0.01"],
    "bench/report_sessions.py": ["--rounds", "1", "--size", "4M", "--streams", "2"],
    "bench/report_relay.py": ["--rounds", "1", "--size", "4M", "--rtt-count", "50", "--rtt-warmup", "5",
                              "--cps-seconds", "0.5", "--cps-loops", "1"],
    "bench/report_memory.py": ["--streams", "300", "--servers", "4", "--clients", "20", "--round-trips", "50",
                               "--connects", "2"],
    "bench/soak.py": ["--duration", "8", "--interval", "1", "--servers", "4", "--clients", "2", "--lifetime", "1", "4",
                      "--group-size", "2", "--kill-every", "3", "--max-size", "64K"],
}


def benchmark_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"`(python bench/(?:report_\w+|soak)\.py[^`]*)`", text)))


def test_the_readme_names_its_benchmark_commands() -> None:
    assert {shlex.split(c)[1] for c in benchmark_commands()} == set(SMALL_RUN)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", benchmark_commands())
def test_benchmark_command_runs(command: str) -> None:
    argv = shlex.split(command)
    script = argv[1]
    root = README.parent
    result = subprocess.run([sys.executable, str(root / script), *argv[2:], *SMALL_RUN[script]],
                            capture_output=True, text=True, timeout=540, cwd=root)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "|---" in result.stdout, f"{command}: no table in its output:\n{result.stdout[-3000:]}"
