"""A standalone registry service in its own process, for the contract tests.

    python registry_proc.py --port-file PATH [--port N] [--max-keys N] [--max-values-per-key N]

Listens on 127.0.0.1, writes the port it got to PATH (atomically) once it
listens, and serves until SIGTERM or SIGINT, then closes and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from fastnat.discovery.service import RegistryLimits, RegistryServer


async def main(args: argparse.Namespace) -> None:
    limits = RegistryLimits(max_keys=args.max_keys, max_values_per_key=args.max_values_per_key)
    server = RegistryServer("127.0.0.1", args.port, limits=limits)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.port))
    os.replace(tmp, args.port_file)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-keys", type=int, default=100_000)
    parser.add_argument("--max-values-per-key", type=int, default=1_000)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(parser.parse_args()))
