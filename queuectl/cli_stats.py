"""``queuectl stats``: parsing and printing only (figures from queuectl/stats.py)."""
from __future__ import annotations

import math

import click

LIMIT = 20  # commands (or groups) shown in text output (--json has all of them)


def per_second(rate: float) -> str:
    """Three significant digits, never an exponent: 10 runs in an hour show as 0.00278,
    not as 0.00."""
    if rate <= 0:
        return "0"
    return f"{rate:.{max(0, 2 - math.floor(math.log10(rate)))}f}"


@click.command()
@click.option("--since", default="1h", show_default=True,
              help="How far back to look (30m, 12h, 7d).")
@click.option("--by", type=click.Choice(["command", "group"]), default="command", show_default=True,
              help="One line per command, or per group.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(since: str, by: str, as_json: bool) -> None:
    """Throughput, failure rate and p50/p95 run durations per command (or group), over a
    recent window.

    Counts runs that finished in the window and are still in the database (retention
    deletes old jobs; see config keep_completed). A failed attempt that is retried counts
    as a failed run; failure rate is failed / (completed + failed).

    \b
    Examples:
      queuectl stats
      queuectl stats --since 24h --json
      queuectl stats --by group
    """
    from queuectl.cli import _emit_json, _queue, _short
    from queuectl.stats import BY, summarize
    from queuectl.timeutil import format_duration, parse_duration

    window = parse_duration(since, "--since")
    if window <= 0:
        from queuectl.errors import InvalidInput

        raise InvalidInput("--since must be longer than 0 (e.g. 1h)")
    queue = _queue()
    now = queue.clock()
    figures = summarize(queue.runs_since(now - window), window, by)
    if as_json:
        _emit_json(figures)
        return

    def line(name: str, row: dict) -> str:
        return (f"{row['runs']:>7} {per_second(row['throughput']):>8} {row['failure_rate'] * 100:>6.1f}% "
                f"{format_duration(row['p50']):>8} {format_duration(row['p95']):>8}  {name}")

    click.echo(f"Runs finished in the last {format_duration(window)}:")
    click.echo(f"{'RUNS':>7} {'PER SEC':>8} {'FAILED':>7} {'P50':>8} {'P95':>8}  {by.upper()}")
    rows = figures[BY[by]]
    for row in rows[:LIMIT]:
        click.echo(line(_short(row[by], 60), row))
    if len(rows) > LIMIT:
        click.echo(f"... and {len(rows) - LIMIT} more {BY[by]} (--json lists them all)")
    click.echo(line("(all)", figures["total"]))

