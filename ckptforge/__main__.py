"""``python -m ckptforge`` runs the command-line interface."""

from ckptforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
