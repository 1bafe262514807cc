"""`bbsnap servers schedule SRV ...` and `bbsnap schedule run|list` (services/schedule.py)."""

from __future__ import annotations

from typing import Any

import click

from bbsnap.cli.options import output_options, say
from bbsnap.cli.prune import keep_options, policy_from


@click.command("schedule")
@click.argument("server_id", metavar="SRV")
@click.option("--every", metavar="DURATION", help="Snapshot every DURATION (30m, 1h, 1d, 1w).")
@keep_options
@click.option("--no-quiesce", is_flag=True,
              help="Do not freeze filesystems through the guest agent.")
@click.option("--off", is_flag=True, help="Remove the server's schedule.")
@click.pass_obj
def schedule_server(app: Any, server_id: str, every: str | None, keep_last: int,
                    keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
                    no_quiesce: bool, off: bool) -> None:
    """Snapshot SRV every DURATION and prune it by the --keep rules (`bbsnap schedule run`
    does the work: run it from cron or a systemd timer)."""
    from bbsnap.errors import UsageError
    from bbsnap.services.schedule import format_duration, parse_duration

    policy = policy_from(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    if off:
        if every or not policy.empty or no_quiesce:
            raise UsageError("--off takes no other option")
        removed = app.scheduler().off(server_id)
        say(f"Removed the schedule of server {removed.server}")
        return
    if every is None:
        raise UsageError("give --every DURATION, or --off")
    interval = parse_duration(every)
    made = app.scheduler().set(server_id, interval, policy, quiesce=not no_quiesce)
    say(f"Server {made.server}: a snapshot every {format_duration(made.every_seconds)}"
        + (f", keeping {policy.describe()}" if not policy.empty else ", none pruned"))


@click.group("schedule", invoke_without_command=True)
@click.pass_context
def schedule(ctx: click.Context) -> None:
    """Scheduled snapshots and prunes (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_schedules)


@schedule.command("list")
@output_options
@click.pass_obj
def list_schedules(app: Any, output_format: str = "table", simple: bool = False) -> None:
    """The schedules and when each server is next due."""
    from bbsnap.services.schedule import format_duration, policy_of
    from bbsnap.cli import render

    rows, records = [], []
    for entry, due in app.scheduler().entries():
        keep = policy_of(entry).describe() or "-"
        last = entry.last_run.strftime("%Y-%m-%d %H:%M:%S") if entry.last_run else "never"
        rows.append([entry.server, format_duration(entry.every_seconds), keep, last,
                     due.strftime("%Y-%m-%d %H:%M:%S"), entry.last_result or ""])
        records.append({"server": entry.server, "server_uuid": entry.server_uuid,
                        "every_seconds": entry.every_seconds, "keep": entry.retention,
                        "quiesce": entry.quiesce,
                        "last_run": entry.last_run.isoformat() if entry.last_run else None,
                        "next_due": due.isoformat(), "last_result": entry.last_result})
    click.echo(render.listing(("server", "every", "keep", "last", "next due", "result"), rows,
                              records, output_format, simple), nl=False)


@schedule.command("run")
@click.pass_obj
def run_schedules(app: Any) -> None:
    """Do every due snapshot and prune once, then exit (1 if any failed)."""
    from bbsnap.errors import BbsnapError
    from bbsnap.text import escape

    results = app.scheduler().run()
    for result in results:
        click.echo(escape(f"{result.server}: {result.outcome}"
                          + (f": {result.detail}" if result.detail else "")))
    if any(r.failed for r in results):
        raise click.exceptions.Exit(BbsnapError.exit_code)
