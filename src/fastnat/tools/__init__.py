"""What the command line's subcommands do, as functions (the flags are parsed in fastnat.cli)."""
