"""``python -m fastnat``: the command line."""

from fastnat.cli import main

raise SystemExit(main())
