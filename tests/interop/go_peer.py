"""Python side of ``yamux_peer.go``: build it, start it, talk to it.

The command protocol is documented at the top of ``yamux_peer.go``. A
``GoPeer`` wraps one running peer process: a thread reads its stdout (one
JSON object per line) into a list, another keeps the tail of its stderr (the
yamux log) for failure messages. Waiting for something the peer reports
usually needs the fastnat side to keep working (answer a ping, read, grant
window), so the waits take a ``MuxDriver`` and pump it meanwhile.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_SOURCE = HERE / "yamux_peer.go"
YAMUX_IMPORT_PATH = Path("src/github.com/hashicorp/yamux")
DEBIAN_GOPATH = "/usr/share/gocode"
# Names the go binary to use instead of the one on PATH.
GO_ENV = "FASTNAT_GO"


class PeerError(AssertionError):
    """The peer did something the test did not expect (or is gone)."""


def find_toolchain() -> tuple[str | None, str | None, str]:
    """Returns (go binary, GOPATH holding hashicorp/yamux, reason if missing)."""
    go: str | None
    chosen = os.environ.get(GO_ENV)
    if chosen:
        go = chosen if os.access(chosen, os.X_OK) and Path(chosen).is_file() else None
    else:
        go = shutil.which("go")
        if go is None:  # Debian's golang-go without the /usr/bin/go link
            for candidate in sorted(Path("/usr/lib").glob("go-*/bin/go"), reverse=True):
                go = str(candidate)
                break
    candidates = [p for p in os.environ.get("GOPATH", "").split(os.pathsep) if p] + [DEBIAN_GOPATH]
    gopath = next((p for p in candidates if (Path(p) / YAMUX_IMPORT_PATH / "session.go").is_file()), None)
    missing = []
    if go is None:
        where = f"{GO_ENV}={chosen}" if chosen else "`go` on PATH"
        missing.append(f"the Go toolchain ({where}; Debian package golang-go)")
    if gopath is None:
        missing.append(
            "the hashicorp/yamux source (Debian package golang-github-hashicorp-yamux-dev, "
            f"looked in {', '.join(str(Path(p) / YAMUX_IMPORT_PATH) for p in candidates)})"
        )
    return go, gopath, " and ".join(missing)


def build_peer(go: str, gopath: str, out_dir: Path) -> Path:
    """Compile yamux_peer.go in GOPATH mode, without network access."""
    binary = out_dir / "yamux_peer"
    cache = os.environ.get("GOCACHE") or str(out_dir / "gocache")
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=gopath,
        GOCACHE=cache,
        GOFLAGS="",
        GOPROXY="off",
        CGO_ENABLED="0",
        HOME=env.get("HOME") or str(out_dir),
    )
    proc = subprocess.run(
        [go, "build", "-o", str(binary), str(PEER_SOURCE)],
        check=False,
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise PeerError(f"building {PEER_SOURCE.name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return binary


class GoPeer:
    """One running ``yamux_peer`` process."""

    _tags = itertools.count(1)

    def __init__(self, binary: Path, args: list[str]) -> None:
        self.args = [str(binary), *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.messages: list[dict[str, Any]] = []
        self.bad_lines: list[str] = []
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, name="yamux_peer stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="yamux_peer stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ I/O threads

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                with self._cond:
                    self.bad_lines.append(line)
                continue
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    # ------------------------------------------------------------ queries

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self._cond:
            for message in self.messages:
                if predicate(message):
                    return message
        return None

    def find_all(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if predicate(m)]

    def reply(self, tag: str) -> dict[str, Any] | None:
        return self.find(lambda m: m.get("event") == "reply" and m.get("tag") == tag)

    def stream_report(self, stream_id: int) -> dict[str, Any] | None:
        return self.find(lambda m: m.get("event") == "stream" and m.get("id") == stream_id)

    def describe(self) -> str:
        with self._cond:
            messages = list(self.messages[-30:])
        log = "\n    ".join(self.stderr_tail)
        return (
            f"yamux_peer {' '.join(self.args[1:])} (exit code {self.proc.poll()}); last messages:\n    "
            + "\n    ".join(json.dumps(m) for m in messages)
            + f"\n  stderr:\n    {log}"
        )

    # ------------------------------------------------------------ waiting

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
        driver: Any = None,
    ) -> dict[str, Any]:
        """Wait for a message; pump ``driver`` meanwhile if one is given."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.find(predicate)
            if message is not None:
                return message
            detail = f"\n  fastnat: {driver.describe()}" if driver is not None else ""
            if self.proc.poll() is not None and not self._threads[0].is_alive():
                raise PeerError(f"the peer exited while waiting for {what}\n  {self.describe()}{detail}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"timed out after {timeout} s waiting for {what}\n  {self.describe()}{detail}")
            if driver is not None:
                driver.pump(min(left, 0.01))
            else:
                with self._cond:
                    if self.find(predicate) is None:
                        self._cond.wait(min(left, 0.05))

    def wait_event(self, event: str, timeout: float, driver: Any = None) -> dict[str, Any]:
        return self.wait_for(lambda m: m.get("event") == event, timeout, f'the "{event}" event', driver)

    def wait_stream(self, stream_id: int, timeout: float, driver: Any = None) -> dict[str, Any]:
        return self.wait_for(
            lambda m: m.get("event") == "stream" and m.get("id") == stream_id,
            timeout,
            f"the report of stream {stream_id}",
            driver,
        )

    # ------------------------------------------------------------ commands

    def send(self, command: str, *args: object) -> str:
        """Send a command; returns its tag (see ``reply``)."""
        tag = f"c{next(self._tags)}"
        line = " ".join([tag, command, *map(str, args)]) + "\n"
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise PeerError(f"cannot send {line.strip()!r}: {exc}\n  {self.describe()}") from exc
        return tag

    def call(self, command: str, *args: object, driver: Any = None, timeout: float = 10.0) -> dict[str, Any]:
        """Send a command and wait for its reply (pumping ``driver`` meanwhile)."""
        tag = self.send(command, *args)
        return self.wait_for(
            lambda m: m.get("event") == "reply" and m.get("tag") == tag,
            timeout,
            f"the reply to {command} {' '.join(map(str, args))}",
            driver,
        )

    # ------------------------------------------------------------ shutdown

    def close(self, timeout: float = 5.0) -> None:
        """Ask the peer to quit; kill it if it does not. Always reaps it."""
        proc = self.proc
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write("q quit\n")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):
                    pass
                try:
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        finally:
            if proc.poll() is None:  # pragma: no cover - kill did not work in time
                proc.kill()
                proc.wait()
            for t in self._threads:
                t.join(timeout)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
