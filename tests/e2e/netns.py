"""Test hosts in Linux network namespaces, joined by veth pairs, with NAT routers.

Everything made here carries a tag unique to the run (the pid and a counter)
and is undone by :meth:`Network.destroy`: processes (their whole process
groups), iptables rules, veth links, namespaces. Nothing here touches the
machine's own network: every link is created directly inside the namespaces
of the test, and every address is one the test assigns.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from _net_helpers import wait_until  # noqa: F401 (re-exported)

PREFIX = "fne2e"
_counter = itertools.count(1)

# Bounds (seconds).
CMD_TIMEOUT = 15.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class NetError(RuntimeError):
    """A command building the test network failed."""


def sh(*cmd: str, timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetError(f"{' '.join(cmd)}: no answer within {timeout} s") from None
    if check and result.returncode != 0:
        raise NetError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def missing_requirements() -> str | None:
    """Why this machine cannot run the namespace tests, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root (run as root, as CI does)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (apt-get install -y iproute2 iptables)"
    probe = f"{PREFIX}-{os.getpid()}-probe{next(_counter)}"
    try:
        sh("ip", "netns", "add", probe)
        try:
            sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n")
            sh("ip", "netns", "exec", probe, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        finally:
            sh("ip", "netns", "del", probe, check=False)
    except NetError as exc:
        return f"cannot build a network namespace with NAT here: {exc}"
    return None


def require_namespaces() -> None:
    """Skip the calling test when this machine cannot build the namespaces
    (with the reason); fail it instead when ``CI`` is set, since CI can."""
    import pytest

    reason = missing_requirements()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the namespace test cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)


def sweep_stale() -> None:
    """Delete namespaces left by earlier runs that were killed (their pid is gone)."""
    listing = sh("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.match(rf"^{PREFIX}-(\d+)-", name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)


class NsProcess:
    """A command run in a namespace (``ip netns exec``), in its own process group.

    stdout is read line by line by a thread; stderr goes to a file.
    """

    def __init__(self, ns: str, cmd: Sequence[str], env: dict[str, str], log_path: Path, name: str) -> None:
        self.ns = ns
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"stdout of {name}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\r\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        return f"{self.name} in {self.ns} (exit {self.proc.poll()}; stdout {self.seen[-5:]!r}; stderr {self.stderr()[-2000:]!r})"

    def wait_line(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout} s from {self.describe()}")
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"ended before {pattern.pattern!r}: {self.describe()}")
            self.seen.append(line)
            found = pattern.search(line)
            if found:
                return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the command (not the group: as a user's ^C or kill would) and wait (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout} s of {sig!r}: {self.describe()}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)  # it reads to the end of stdout, then the pipe can go
        with contextlib.suppress(OSError, ValueError):
            self._log.close()
            if self.proc.stdout is not None and not self._reader.is_alive():
                self.proc.stdout.close()


class Network:
    """Namespaces, veth links, routes, NAT rules and processes of one test run."""

    def __init__(self, log_dir: Path) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        # Interface names are at most 15 characters: a short form of the tag.
        self.short = f"f{os.getpid() % 100000}{next(_counter) % 10}"
        self.log_dir = log_dir
        self.namespaces: list[str] = []
        self.links: list[tuple[str, str]] = []  # (namespace, device) of one end of each pair
        self.routers: list[str] = []
        self.processes: list[NsProcess] = []

    # ---------------------------------------------------------- building

    def ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.exec(name, "ip", "link", "set", "lo", "up")
        return name

    def exec(self, ns: str, *cmd: str, timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=check)

    def dev(self, role: str) -> str:
        name = f"{self.short}{role}"
        assert len(name) <= 15, name
        return name

    def veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair made directly inside the two namespaces (never in the machine's own)."""
        sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        self.links.append((ns_a, dev_a))
        self.exec(ns_a, "ip", "link", "set", dev_a, "up")
        self.exec(ns_b, "ip", "link", "set", dev_b, "up")

    def address(self, ns: str, dev: str, cidr: str) -> None:
        self.exec(ns, "ip", "addr", "add", cidr, "dev", dev)

    def default_route(self, ns: str, via: str) -> None:
        self.exec(ns, "ip", "route", "add", "default", "via", via)

    def nat_router(self, ns: str, wan: str, lan: str, lan_subnet: str) -> None:
        """Masquerade the LAN behind the WAN address; forward nothing inward
        but replies (a home router: no port forwarding)."""
        self.routers.append(ns)
        self.exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.exec(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", lan_subnet, "-o", wan, "-j", "MASQUERADE")
        self.exec(ns, "iptables", "-A", "FORWARD", "-i", wan, "-o", lan, "-m", "conntrack",
                  "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.exec(ns, "iptables", "-A", "FORWARD", "-i", wan, "-o", lan, "-j", "DROP")

    # --------------------------------------------------------- processes

    def start(self, ns: str, cmd: Sequence[str], env: dict[str, str], name: str) -> NsProcess:
        log = self.log_dir / f"{len(self.processes):02d}-{name}.stderr"
        proc = NsProcess(ns, cmd, env, log, name)
        self.processes.append(proc)
        return proc

    # ---------------------------------------------------------- teardown

    def destroy(self) -> list[str]:
        """Undo everything, whatever state it is in; the problems met (empty when clean)."""
        problems: list[str] = []
        for proc in reversed(self.processes):
            proc.kill()
        for ns in self.namespaces:
            # Anything else still running in the namespace (a child that left
            # its process group) goes too.
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in self.routers:
            for table in ("nat", "filter"):
                result = self.exec(ns, "iptables", "-t", table, "-F", check=False)
                if result.returncode != 0:
                    problems.append(f"flushing {table} in {ns}: {result.stderr.strip()}")
        for ns, dev in self.links:
            self.exec(ns, "ip", "link", "del", dev, check=False)
        for ns in self.namespaces:
            result = sh("ip", "netns", "del", ns, check=False)
            if result.returncode != 0:
                problems.append(f"deleting {ns}: {result.stderr.strip()}")
        left = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines()
                if line.split() and line.split()[0].startswith(self.tag)]
        if left:
            problems.append(f"namespaces left: {left}")
        links = sh("ip", "-o", "link", "show", check=False).stdout
        stray = [line for line in links.splitlines() if self.short in line]
        if stray:
            problems.append(f"links left in the machine's namespace: {stray}")
        return problems
