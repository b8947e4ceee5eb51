"""Allow ``python -m queuectl``."""
import sys

try:
    import click  # noqa: F401  (the one dependency; say how to get it rather than a traceback)
except ImportError:
    sys.stderr.write("queuectl needs the 'click' package: pip install .  (or pip install click)\n")
    sys.exit(1)

from queuectl.cli import main

if __name__ == "__main__":
    main()
