"""``python -m fastnat forwarder`` with shortened timings, for the fleet tests.

    python forwarder_proc.py [-v] forwarder [forwarder flags...]

The command line has no flag or environment variable for the announce TTL and
interval, so this script reads ``FLEET_SETTINGS`` (a JSON object of
:class:`fastnat.settings.Settings` fields, e.g. ``{"announce_ttl": 2,
"announce_interval": 0.5}``), applies it with ``fastnat.configure``, and then
runs the real command line, ``fastnat.cli.main(sys.argv[1:])``: same
output, same signals, same exit status.
"""

from __future__ import annotations

import json
import os
import sys

import fastnat
from fastnat import cli


def main() -> int:
    options = json.loads(os.environ.get("FLEET_SETTINGS") or "{}")
    if options:
        fastnat.configure(**options)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
