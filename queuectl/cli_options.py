"""Options of the commands that start workers (`worker`, `worker start|scale`, `supervise`,
`service install`), checked once here so each refuses bad values with the same line.

A module of its own because cli.py imports the command modules that use them (cli_service)
at its end, and they must not import cli.py at theirs.
"""
from __future__ import annotations

from typing import Any, List, Optional

import click

from queuectl.errors import InvalidInput

MAX_COUNT = 256
MAX_CONCURRENCY = 1024


def check_count(count: int) -> None:
    if not (1 <= count <= MAX_COUNT):
        raise InvalidInput(f"--count must be from 1 to {MAX_COUNT}, got {count}")


def capacity_options(concurrency: int, groups: Optional[str]) -> List[str]:
    """The worker's --concurrency and --groups options, checked here (one clear line)."""
    from queuectl.jobspec import validate_group

    if not (1 <= concurrency <= MAX_CONCURRENCY):
        raise InvalidInput(f"--concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
    options = ["--concurrency", str(concurrency)] if concurrency > 1 else []
    if groups is not None:
        names = [g.strip() for g in groups.split(",") if g.strip()]
        if not names:
            raise InvalidInput("--group needs at least one group name")
        for name in names:
            validate_group(name)
        options += ["--groups", ",".join(dict.fromkeys(names))]
    return options


def capacity(func: Any) -> Any:
    """The -c/--concurrency and --group options, on every command that starts workers."""
    func = click.option("--group", "-g", "groups", metavar="G[,G2]",
                        help="Serve only these groups (default: every group).")(func)
    return click.option("--concurrency", "-c", default=1, show_default=True, type=int,
                        help=f"Slots per worker: jobs each runs at once (1-{MAX_CONCURRENCY}).")(func)
