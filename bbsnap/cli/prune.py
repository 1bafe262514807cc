"""`bbsnap servers prune`: remove a server's snapshots outside a retention policy."""

from __future__ import annotations

from typing import Any

import click

from bbsnap.cli.options import output_options, say


def keep_options(func: Any) -> Any:
    """--keep-last/-hourly/-daily/-weekly/-monthly N (services/retention.py)."""
    for rule in reversed(("last", "hourly", "daily", "weekly", "monthly")):
        what = "newest snapshots" if rule == "last" else \
            f"newest snapshot of each of the N most recent {RULE_UNITS[rule]}s with one"
        func = click.option(f"--keep-{rule}", f"keep_{rule}", type=click.IntRange(min=0),
                            default=0, metavar="N", help=f"Keep the N {what}.")(func)
    return func


RULE_UNITS = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}


@click.command("prune")
@click.argument("server_id", metavar="SRV")
@keep_options
@click.option("--dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@output_options
@click.pass_obj
def prune_server(app: Any, server_id: str, keep_last: int, keep_hourly: int, keep_daily: int,
                 keep_weekly: int, keep_monthly: int, dry_run: bool, output_format: str,
                 simple: bool) -> None:
    """Remove SRV's snapshots outside the retention policy (the newest is always kept).

    A removed snapshot that later ones are stored on is merged into them; snapshots that
    servers or other images use as their base are kept.
    """
    from bbsnap.cli import render

    policy = policy_from(keep_last, keep_hourly, keep_daily, keep_weekly,
                         keep_monthly).require_rule()
    report = app.pruner().prune(server_id, policy, dry_run=dry_run)
    gone = "would remove" if dry_run else "removed"
    rows, records = [], []
    for d in report.decisions:
        action = "keep" if d.keep else gone
        why = ", ".join(d.reasons) if d.keep else \
            (f"merged into {', '.join(d.merged_into)}" if d.merged_into else "")
        rows.append([d.image.id, d.image.created_at.strftime("%Y-%m-%d %H:%M:%S"), action, why])
        records.append({"id": d.image.id, "created_at": d.image.created_at.isoformat(),
                        "action": action, "reasons": d.reasons if d.keep else [],
                        "merged_into": d.merged_into})
    click.echo(render.listing(("id", "created", "action", "why"), rows, records,
                              output_format, simple), nl=False)
    say(f"{'Would remove' if dry_run else 'Removed'} {len(report.removed)} of "
        f"{len(report.decisions)} snapshots of server {report.server}")


def policy_from(keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int,
                keep_monthly: int) -> Any:
    from bbsnap.services.retention import Policy

    return Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
