"""A fastnat MuxSession peer in its own process, for the tests that need one.

Run by the tests as ``python peer_proc.py --listen`` (or ``--dial PORT``); it
must be a separate process so that it can be killed (SIGKILL) or frozen
(SIGSTOP) mid-transfer, and so that large transfers use two CPUs.

The engine is the one ``fastnat.mux`` picks, so the parent selects it with
``FASTNAT_NO_EXTENSIONS=1`` in the environment. ``--loop uvloop`` runs uvloop.

Output on stdout, one JSON object per line:

    {"event": "listening", "port": P}       (--listen) before accepting
    {"event": "ready", "engine": "compiled"|"python", "pid": N}
    {"event": "stream", "id": N, "action": "...", "read": n, "read_sha256": h,
     "written": n, "written_sha256": h, "error": ""}
    {"event": "reply", "cmd": "...", ...}   answer to a stdin command
    {"event": "session-closed", "error": "..."}

Streams opened by the other side start with one action line:

    echo              copy everything back; at EOF, write_eof
    sink              read to EOF, then write "<n> <sha256hex>\n", close
    send N SEED       write N bytes of test_data(SEED), write_eof, then read to EOF
    sink-send N SEED  read to EOF, then write N bytes, close
    hold              never read; keep the stream open

Commands on stdin, one per line:

    open ACTION...    open a stream and run ACTION on it (no action line is sent)
    ping              reply has "rtt"
    goaway            send Go Away (code 0) without closing the connection
    close             MuxSession.close()
    quit              exit 0 (also on EOF of stdin)

Only 127.0.0.1 is used. The process exits by itself after --lifetime seconds
(a last resort against leaked processes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from payload import DataSource  # noqa: E402

from fastnat import mux  # noqa: E402
from fastnat.aio import MuxSession, MuxStream  # noqa: E402
from fastnat.mux_config import MuxConfig  # noqa: E402

LOOPBACK = "127.0.0.1"


def emit(**message: object) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def read_to_eof(stream: MuxStream, h: "hashlib._Hash") -> int:
    n = 0
    while True:
        data = await stream.read(1 << 20)
        if not data:
            return n
        h.update(data)
        n += len(data)


async def send(stream: MuxStream, n: int, seed: int, h: "hashlib._Hash") -> int:
    written = 0
    for chunk in DataSource(seed).chunks(n):
        stream.write(chunk)
        h.update(chunk)
        written += len(chunk)
        await stream.drain()
    return written


async def run_action(stream: MuxStream, action: list[str], origin: str) -> None:
    report: dict[str, object] = {"event": "stream", "id": stream.stream_id, "origin": origin, "action": " ".join(action)}
    rh, wh = hashlib.sha256(), hashlib.sha256()
    read = written = 0
    try:
        verb = action[0] if action else ""
        if verb == "echo":
            while True:
                data = await stream.read(1 << 20)
                if not data:
                    break
                rh.update(data)
                read += len(data)
                stream.write(data)
                wh.update(data)
                written += len(data)
                await stream.drain()
            stream.write_eof()
            await stream.drain()
        elif verb == "sink":
            read = await read_to_eof(stream, rh)
            line = f"{read} {rh.hexdigest()}\n".encode()
            stream.write(line)
            written = len(line)
            await stream.drain()
        elif verb == "send":
            written = await send(stream, int(action[1]), int(action[2]), wh)
            stream.write_eof()
            read = await read_to_eof(stream, rh)
        elif verb == "sink-send":
            read = await read_to_eof(stream, rh)
            written = await send(stream, int(action[1]), int(action[2]), wh)
        elif verb == "hold":
            await stream.transport.session.wait_closed()
        else:
            raise ValueError(f"unknown action {action!r}")
        stream.close()
        await stream.wait_closed()
        report["error"] = ""
    except Exception as exc:  # reported, the peer goes on
        report["error"] = f"{type(exc).__name__}: {exc}"
    report.update(read=read, read_sha256=rh.hexdigest(), written=written, written_sha256=wh.hexdigest())
    emit(**report)


async def serve_streams(session: MuxSession, tasks: set[asyncio.Task]) -> None:
    async for stream in session:
        task = asyncio.create_task(accepted(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def accepted(stream: MuxStream) -> None:
    try:
        line = await stream.readuntil(b"\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        emit(event="stream", id=stream.stream_id, origin="remote", action="", error=repr(exc))
        return
    await run_action(stream, line.decode().split(), "remote")


async def commands(session: MuxSession, tasks: set[asyncio.Task]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        words = line.decode().split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "open":
                stream = await session.open_stream()
                task = asyncio.create_task(run_action(stream, words[1:], "local"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                emit(event="reply", cmd=cmd, id=stream.stream_id)
            elif cmd == "ping":
                emit(event="reply", cmd=cmd, rtt=await session.ping())
            elif cmd == "goaway":
                session.go_away()
                await session.ping()  # flushes the Go Away, and proves it went out first
                emit(event="reply", cmd=cmd)
            elif cmd == "close":
                session.close()
                await session.wait_closed()
                emit(event="reply", cmd=cmd)
            elif cmd == "quit":
                emit(event="reply", cmd=cmd)
                return
            else:
                emit(event="reply", cmd=cmd, error="unknown command")
        except Exception as exc:
            emit(event="reply", cmd=cmd, error=f"{type(exc).__name__}: {exc}")


async def main(args: argparse.Namespace) -> None:
    keepalive = None if args.keepalive <= 0 else args.keepalive
    options: dict[str, object] = {"keepalive_interval": keepalive}
    if args.window:
        options["config"] = MuxConfig(initial_stream_window=args.window, max_stream_window=max(args.window, 16 << 20))
    if args.listen:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind((LOOPBACK, 0))
        lsock.listen(1)
        lsock.setblocking(False)
        emit(event="listening", port=lsock.getsockname()[1])
        conn, _ = await loop.sock_accept(lsock)
        lsock.close()
        session = await MuxSession.from_socket(conn, client=False, **options)
    else:
        session = await MuxSession.connect(LOOPBACK, args.dial, **options)
    closed_error: list[str] = []
    session.set_error_callback(lambda s, where, exc: closed_error.append(f"{where}: {exc!r}"))
    emit(event="ready", engine=type(session.engine).__module__.rsplit(".", 1)[-1], pid=os.getpid(),
         implementation=mux.IMPLEMENTATION)
    tasks: set[asyncio.Task] = set()
    serving = asyncio.create_task(serve_streams(session, tasks))
    control = asyncio.create_task(commands(session, tasks))
    closed = asyncio.create_task(session.wait_closed())
    await asyncio.wait({control, closed}, return_when=asyncio.FIRST_COMPLETED)
    if closed.done():
        # let the stream tasks report how they ended
        if tasks:
            await asyncio.wait(set(tasks), timeout=5)
        emit(event="session-closed", error="; ".join(closed_error))
    session.close()
    await session.wait_closed()
    for task in (serving, control, closed, *tasks):
        task.cancel()
    await asyncio.gather(serving, control, closed, *tasks, return_exceptions=True)


def cli() -> None:
    parser = argparse.ArgumentParser()
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--listen", action="store_true")
    side.add_argument("--dial", type=int)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--keepalive", type=float, default=0.0, help="keepalive interval; 0 disables")
    parser.add_argument("--window", type=int, default=0, help="initial stream window; 0: the default")
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()

    async def bounded() -> None:
        try:
            await asyncio.wait_for(main(args), args.lifetime)
        except TimeoutError:
            emit(event="lifetime-expired")

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


if __name__ == "__main__":
    cli()
