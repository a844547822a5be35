"""The background loop thread: one per process, daemonic, stopped cleanly
at interpreter exit (checked in child processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aio.support import engine_env

pytestmark = pytest.mark.timeout(60)

SCRIPT = r'''
import socket, sys, threading, time
from fastnat.blocking import BlockingSession, loop_thread

mode = sys.argv[1]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
sessions = []
for _ in range(3):
    client = BlockingSession.connect("127.0.0.1", listener.getsockname()[1], timeout=5)
    conn, _ = listener.accept()
    server = BlockingSession.from_socket(conn, client=False)
    sessions += [client, server]
a = sessions[0].open_stream()
a.sendall(b"x")
b = sessions[1].accept_stream(5)
assert b.recv(1) == b"x"
if mode == "blocked-reader":
    threading.Thread(target=b.recv, args=(10,), daemon=True).start()
    threading.Thread(target=a.sendall, args=(bytes(64 << 20),), daemon=True).start()
    time.sleep(0.2)
elif mode == "closed":
    a.close()
    b.close()
    for s in sessions:
        s.close()
    listener.close()
loops = {id(s.session._loop) for s in sessions}
names = [t.name for t in threading.enumerate() if t.name.startswith("fastnat")]
print(len(loops), names, type(loop_thread.get_loop()).__module__, type(sessions[0].session.engine).__module__)
sys.stdout.flush()
# leave the rest to interpreter exit
'''


@pytest.mark.parametrize("mode", ["open", "closed", "blocked-reader"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("engine_name", [pytest.param("compiled", marks=pytest.mark.compiled), "python"])
def test_process_exits_promptly_and_quietly(tmp_path: Path, mode: str, loop: str, engine_name: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    env = engine_env(engine_name)
    if loop == "asyncio":
        env["FASTNAT_NO_UVLOOP"] = "1"
    else:
        env.pop("FASTNAT_NO_UVLOOP", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"the child printed on stderr:\n{proc.stderr}"
    out = proc.stdout.strip()
    assert out.startswith("1 ['fastnat-loop'] "), out  # one loop, one thread, for six sessions
    assert ("uvloop" in out) == (loop == "uvloop"), out
    assert out.endswith("_mux_py" if engine_name == "python" else "_mux"), out
    assert elapsed < 4, f"the child took {elapsed:.1f} s to exit"
