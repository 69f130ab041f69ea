"""``python -m ckptforge`` runs the command-line interface (same exit codes as the console script)."""

import sys


def _main() -> None:
    try:  # issue 11: Ctrl-C while the CLI's modules import is one line and exit 130, not a traceback
        from ckptforge.cli import interrupted, run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        run()
    except KeyboardInterrupt:  # after main() returned, while exiting
        sys.exit(interrupted())


if __name__ == "__main__":
    _main()
