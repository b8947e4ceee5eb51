#!/usr/bin/env python3
"""Run queuectl from a checkout without installing: ./queuectl.py status (same as `queuectl status`)."""
from queuectl.cli import main

if __name__ == "__main__":
    main()
