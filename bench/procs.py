"""Helper processes for the network benchmarks: start, talk to, always reap.

A :class:`ProcessGroup` starts processes (client, server, relay...), each in
its own process, and talks to them over stdin/stdout lines; a
:class:`Proc` is one of them. Guarantees:

* every wait is bounded (a line, a reply, an exit), and a failure names the
  process, its exit code and the tail of its stderr, and of every other
  process of the group;
* leaving the group (``with ProcessGroup() as group:``, an exception, a
  KeyboardInterrupt, interpreter exit) stops every process it started: EOF on
  its stdin, then SIGTERM, then SIGKILL, each after a bounded wait, and reaps it;
* a process whose driver dies anyway (SIGKILL) is not left behind: each is
  started through a small exec wrapper that asks the kernel for SIGTERM when
  its parent dies (``PR_SET_PDEATHSIG``, Linux), and the helpers also exit at
  EOF on stdin.

Only processes started here are ever signalled, by their own pid.

Also: :func:`build_go_relay` compiles ``bench/go_relay/relay.go`` against
Debian's hashicorp/yamux (GOPATH mode, no network), as the interop tests
build their Go peer.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GO_RELAY_SOURCE = HERE / "go_relay" / "relay.go"
DEBIAN_GOPATH = "/usr/share/gocode"
YAMUX_IMPORT_PATH = Path("src/github.com/hashicorp/yamux")

STOP_TIMEOUT = 5.0  # each step of stopping a process: EOF, SIGTERM, SIGKILL

# Run in the child: ask for SIGTERM when the parent dies, make sure it has not
# died already, then become the real program (the setting survives exec).
_EXEC_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(os.environ['BENCH_DRIVER_PID']):\n"
    "    sys.exit('bench: the driver is gone')\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


class HarnessError(RuntimeError):
    """A helper process failed, timed out, answered an error, or exited."""


class Proc:
    """One helper process, talked to over stdin/stdout lines.

    A thread queues its stdout lines; another keeps the tail of its stderr.
    """

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, group: ProcessGroup | None = None,
                 stops_at_eof: bool = True) -> None:
        self.name = name
        self.stops_at_eof = stops_at_eof  # False: closing stdin does not stop it, go straight to SIGTERM
        self.argv = [str(a) for a in argv]
        self.group = group
        full_env = dict(os.environ if env is None else env)
        full_env["BENCH_DRIVER_PID"] = str(os.getpid())
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WRAPPER, *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            text=True,
            bufsize=1,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the driver only; it stops these
        )
        self.pid = self.popen.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.seen: deque[str] = deque(maxlen=20)  # stdout lines taken, for error messages
        self._next_id = 0
        self._eof = False
        self._threads = [
            threading.Thread(target=self._pump_stdout, name=f"{name} stdout", daemon=True),
            threading.Thread(target=self._pump_stderr, name=f"{name} stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ I/O threads

    def _pump_stdout(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                self.lines.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.popen.stderr is not None
        try:
            for line in self.popen.stderr:
                self.stderr_tail.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------ state

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def describe(self) -> str:
        tail = "\n      ".join(list(self.stderr_tail)[-25:]) or "(empty)"
        seen = "\n      ".join(self.seen) or "(none)"
        return (f"  {self.name} (pid {self.pid}, exit code {self.popen.poll()}): {' '.join(self.argv)}\n"
                f"    last stdout lines:\n      {seen}\n    stderr tail:\n      {tail}")

    def fail(self, message: str) -> HarnessError:
        where = self.group.describe() if self.group is not None else self.describe()
        return HarnessError(f"{self.name}: {message}\n{where}")

    # ------------------------------------------------------------ reading

    def read_line(self, timeout: float) -> str:
        """The next stdout line; HarnessError at EOF or after ``timeout`` seconds."""
        if self._eof:
            raise self.fail("its stdout is closed (the process exited)")
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise self.fail(f"no output line within {timeout:g} s") from None
        if line is None:
            self._eof = True
            try:
                self.popen.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
            raise self.fail("its stdout closed (the process exited)")
        self.seen.append(line)
        return line

    def expect(self, match: Callable[[str], Any], timeout: float, what: str) -> Any:
        """Read lines until ``match(line)`` is truthy (returns it); bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail(f"timed out after {timeout:g} s waiting for {what}")
            try:
                line = self.read_line(left)
            except HarnessError as exc:
                raise HarnessError(f"while waiting for {what}: {exc}") from None
            found = match(line)
            if found:
                return found

    def expect_regex(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        return self.expect(regex.search, timeout, f"a line matching {pattern!r}")

    def expect_json(self, event: str, timeout: float) -> dict[str, Any]:
        def match(line: str) -> dict[str, Any] | None:
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) and obj.get("event") == event else None

        return self.expect(match, timeout, f'the JSON event "{event}"')

    # ------------------------------------------------------------ commands

    def send_line(self, line: str) -> None:
        stdin = self.popen.stdin
        try:
            assert stdin is not None
            stdin.write(line + "\n")
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise self.fail(f"cannot write to its stdin: {exc}") from None

    def call(self, cmd: str, timeout: float, **args: Any) -> dict[str, Any]:
        """Send a JSON command, wait (bounded) for its reply, return its result."""
        self._next_id += 1
        ident = self._next_id
        self.send_line(json.dumps({"id": ident, "cmd": cmd, **args}))

        def match(line: str) -> dict[str, Any] | None:
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) and obj.get("id") == ident else None

        reply = self.expect(match, timeout, f"the reply to {cmd}")
        if not reply.get("ok"):
            raise self.fail(f"{cmd} {json.dumps(args)} failed:\n{reply.get('error')}")
        return reply.get("result", {})

    # ------------------------------------------------------------ stopping

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """EOF on stdin, then SIGTERM, then SIGKILL, each waited for at most
        ``timeout`` s; always reaps. Returns the exit code."""
        popen = self.popen
        steps: list[Callable[[], None]] = [
            self._close_stdin,
            lambda: popen.send_signal(signal.SIGTERM),
            popen.kill,
        ]
        if not self.stops_at_eof:
            self._close_stdin()
            del steps[0]
        for step in steps:
            if popen.poll() is not None:
                break
            try:
                step()
            except (OSError, ValueError):
                pass
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        if popen.poll() is None:  # pragma: no cover - SIGKILL not delivered in time
            popen.wait()
        self._close_stdin()
        for t in self._threads:
            t.join(timeout)
        for pipe in (popen.stdout, popen.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        return popen.returncode

    def _close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except (BrokenPipeError, OSError):
                pass


_live_groups: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()
_atexit_registered = False


def _stop_everything() -> None:
    for group in list(_live_groups):
        group.close()


class ProcessGroup:
    """The processes of one benchmark topology; closing it stops them all."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.procs: list[Proc] = []
        self._closed = False
        global _atexit_registered
        if not _atexit_registered:  # at first use, not at import
            atexit.register(_stop_everything)
            _atexit_registered = True
        _live_groups.add(self)

    def start(self, name: str, argv: Iterable[Any], *, env: dict[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None, stops_at_eof: bool = True) -> Proc:
        """Start a process; ``stops_at_eof=False`` for one that ignores its stdin
        (it is stopped with SIGTERM at once)."""
        if self._closed:
            raise HarnessError(f"group {self.name!r} is closed")
        proc = Proc(name, list(argv), env=env, cwd=cwd, group=self, stops_at_eof=stops_at_eof)
        self.procs.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)

    def check_alive(self) -> None:
        """HarnessError if one of the processes has exited."""
        for proc in self.procs:
            if proc.returncode is not None:
                raise proc.fail(f"exited with code {proc.returncode}")

    def close(self) -> dict[str, int | None]:
        """Stop every process (the last started first); never raises."""
        codes: dict[str, int | None] = {}
        if self._closed:
            return codes
        self._closed = True
        for proc in reversed(self.procs):
            try:
                codes[proc.name] = proc.stop()
            except BaseException:  # pragma: no cover - keep stopping the others
                try:
                    proc.popen.kill()
                    proc.popen.wait(STOP_TIMEOUT)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        _live_groups.discard(self)
        return codes

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


# ------------------------------------------------------------------ Go relay


def find_go_toolchain() -> tuple[str | None, str | None, str]:
    """(go binary, GOPATH holding hashicorp/yamux, what is missing)."""
    go = os.environ.get("FASTNAT_GO") or shutil.which("go")
    if go is None:
        for candidate in sorted(Path("/usr/lib").glob("go-*/bin/go"), reverse=True):
            go = str(candidate)
            break
    candidates = [p for p in os.environ.get("GOPATH", "").split(os.pathsep) if p] + [DEBIAN_GOPATH]
    gopath = next((p for p in candidates if (Path(p) / YAMUX_IMPORT_PATH / "session.go").is_file()), None)
    missing = []
    if go is None:
        missing.append("the Go toolchain (Debian package golang-go)")
    if gopath is None:
        missing.append("hashicorp/yamux (Debian package golang-github-hashicorp-yamux-dev)")
    return go, gopath, " and ".join(missing)


def go_version(go: str) -> str:
    try:
        out = subprocess.run([go, "version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().removeprefix("go version ")


def build_go_relay(out_dir: Path) -> Path:
    """Compile relay.go into ``out_dir`` (GOPATH mode, offline); HarnessError if it cannot."""
    go, gopath, missing = find_go_toolchain()
    if missing:
        raise HarnessError(f"the Go relay needs {missing}")
    assert go is not None and gopath is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "relay"
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOPATH=gopath, GOCACHE=os.environ.get("GOCACHE") or str(out_dir / "gocache"),
               GOFLAGS="", GOPROXY="off", CGO_ENABLED="0", HOME=env.get("HOME") or str(out_dir))
    try:
        proc = subprocess.run([go, "build", "-o", str(binary), str(GO_RELAY_SOURCE)], cwd=out_dir, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        raise HarnessError("building the Go relay took more than 300 s") from None
    if proc.returncode != 0:
        raise HarnessError(f"building {GO_RELAY_SOURCE} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return binary
