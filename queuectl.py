#!/usr/bin/env python3
"""Run queuectl from a checkout without installing: ./queuectl.py status (same as `queuectl status`)."""
import sys

try:
    import click  # noqa: F401  (the one dependency; say how to get it rather than a traceback)
except ImportError:
    sys.stderr.write("queuectl needs the 'click' package: pip install .  (or pip install click)\n")
    sys.exit(1)

from queuectl.cli import main

if __name__ == "__main__":
    main()
