"""`queuectl group ...`: limits on how many jobs of a group run at once, and their state."""
from __future__ import annotations

from typing import Optional

import click



def _queue():
    # Imported here, not at the top: cli imports this module at its end (and may be
    # running as __main__, a module of another name).
    from queuectl.cli import _queue as queue

    return queue()


@click.group()
def group() -> None:
    """Groups: at most N jobs of a group run at once, over every worker and host.

    Every job is in a group ('default' unless `add --group G` or JSON "group" says
    otherwise). A group without a limit runs as many as there are free worker slots.

    \b
    Examples:
      queuectl group set backups --parallel 1      # one backup at a time
      queuectl group set downloads --parallel 8
      queuectl add --group backups -- rsync -a /home /mnt/backup
      queuectl group list
      queuectl pause --group downloads              # and resume --group downloads
      queuectl group unset downloads                # no limit any more
    """


@group.command("set")
@click.argument("name")
@click.option("--parallel", "-p", type=int, required=True, metavar="N",
              help="At most N of its jobs run at once (over all workers and hosts).")
def group_set(name: str, parallel: int) -> None:
    """Limit group NAME to N jobs at once. Lowering it kills nothing: new jobs of the group
    start once fewer than N run."""
    _queue().set_group_limit(name, parallel)
    click.echo(f"Group {name}: at most {parallel} job(s) at once.")


@group.command("unset")
@click.argument("name")
def group_unset(name: str) -> None:
    """Remove group NAME's limit."""
    _queue().set_group_limit(name, None)
    click.echo(f"Group {name}: no limit.")


@group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def group_list(as_json: bool) -> None:
    """Each group: its limit, jobs running and waiting, paused or not."""
    from queuectl.cli import _emit_json, _table

    groups = _queue().groups()
    if as_json:
        _emit_json(groups)
        return
    _table([[g["name"], _limit(g["parallel"]), str(g["running"]), str(g["waiting"]),
             "paused" if g["paused"] else "-"] for g in groups],
           ["GROUP", "LIMIT", "RUNNING", "WAITING", "PAUSED"], shrink=(0,))


def _limit(parallel: Optional[int]) -> str:
    return "-" if parallel is None else str(parallel)
