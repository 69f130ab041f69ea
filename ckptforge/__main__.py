"""``python -m ckptforge`` runs the command-line interface (same exit codes as the console script)."""

from ckptforge.cli import run

if __name__ == "__main__":
    run()
