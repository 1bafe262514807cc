"""Retention selection (services/retention.py): restic's `forget` semantics."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from bbsnap.errors import UsageError
from bbsnap.services.retention import Dated, Policy, select

T0 = datetime(2026, 11, 30, 23, 50, tzinfo=timezone.utc)  # a Monday


def snaps(*offsets: timedelta) -> list[Dated]:
    """Snapshots taken at T0 minus each offset, named s0 (newest given first) ..."""
    return [Dated(f"s{i}", T0 - offset) for i, offset in enumerate(offsets)]


def kept(selection) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(selection.keep)


def test_no_rule_is_refused_rather_than_deleting_everything():
    with pytest.raises(UsageError) as refused:
        select(snaps(timedelta(0)), Policy())
    assert refused.value.exit_code == 2


def test_negative_counts_are_refused():
    with pytest.raises(UsageError):
        Policy(last=-1)


def test_keep_last_keeps_the_n_newest():
    found = select(snaps(*(timedelta(minutes=m) for m in (5, 1, 30, 10))), Policy(last=2))
    assert kept(found) == ["s0", "s1"]  # 5 and 1 minutes ago
    assert found.remove == ["s3", "s2"]  # newest first


def test_the_newest_is_always_kept_and_says_why():
    found = select(snaps(timedelta(days=40), timedelta(0)), Policy(monthly=1))
    assert found.keep["s1"] == ["newest", "monthly"]
    assert found.remove == ["s0"]  # October's: monthly=1 is November's bucket only


def test_keep_hourly_takes_the_newest_in_each_of_the_n_most_recent_hours_with_snapshots():
    # Hours 23 (two snapshots), 22, then nothing until 19.
    found = select(snaps(timedelta(minutes=1), timedelta(minutes=40), timedelta(minutes=70),
                         timedelta(minutes=100), timedelta(hours=4, minutes=10)),
                   Policy(hourly=3))
    assert kept(found) == ["s0", "s2", "s4"]  # 23:49, 22:40, 19:40: empty hours don't count
    assert found.remove == ["s1", "s3"]


def test_keep_daily_weekly_monthly_buckets():
    days = [timedelta(days=d) for d in range(70)]
    found = select(snaps(*days), Policy(daily=3, weekly=2, monthly=3))
    by_day = {f"s{d}": (T0 - timedelta(days=d)).date() for d in range(70)}
    dates = sorted(by_day[i] for i in found.keep)
    # Daily: 30 Nov, 29, 28. Weekly: this ISO week's newest (Mon 30 Nov), last week's
    # (Sun 29 Nov). Monthly: November (30 Nov), October (31 Oct), September (30 Sep).
    assert [d.isoformat() for d in dates] == ["2026-09-30", "2026-10-31", "2026-11-28",
                                              "2026-11-29", "2026-11-30"]
    assert found.keep["s0"] == ["newest", "daily", "weekly", "monthly"]
    assert found.keep["s1"] == ["daily", "weekly"]


def test_a_snapshot_kept_by_any_rule_is_kept():
    found = select(snaps(timedelta(0), timedelta(days=1), timedelta(days=2),
                         timedelta(days=3)), Policy(last=1, daily=3))
    assert kept(found) == ["s0", "s1", "s2"] and found.remove == ["s3"]
    assert found.keep["s0"] == ["newest", "last", "daily"]


def test_more_rules_than_snapshots_keeps_them_all():
    found = select(snaps(timedelta(0), timedelta(hours=5)), Policy(last=10, monthly=10))
    assert kept(found) == ["s0", "s1"] and found.remove == []


def test_naive_times_are_utc_and_ties_are_broken_by_id():
    naive = [Dated("a", datetime(2026, 1, 1, 10)), Dated("b", datetime(2026, 1, 1, 10))]
    assert list(select(naive, Policy(last=1)).keep) == ["b"]


def test_iso_weeks_cross_the_year():
    found = select([Dated("mon", datetime(2024, 12, 30, tzinfo=timezone.utc)),
                    Dated("sun", datetime(2024, 12, 29, tzinfo=timezone.utc)),
                    Dated("sat", datetime(2024, 12, 28, tzinfo=timezone.utc))], Policy(weekly=2))
    assert kept(found) == ["mon", "sun"]  # 2025-W01 and 2024-W52


def test_describe():
    assert Policy(last=3, daily=7).describe() == "last=3 daily=7"


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("1h", 3600), ("1d", 86400),
                                               ("2w", 14 * 86400), (" 90m ", 5400)])
def test_durations(text, seconds):
    from bbsnap.services.schedule import format_duration, parse_duration

    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(seconds)).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0m", "1", "h", "1.5h", "-1h", "1y", "1h30m", "01h",
                                  "9999999m"])
def test_invalid_durations_are_usage_errors(text):
    from bbsnap.services.schedule import parse_duration

    with pytest.raises(UsageError):
        parse_duration(text)


def test_format_duration_picks_the_largest_unit():
    from bbsnap.services.schedule import format_duration

    assert [format_duration(s) for s in (60, 5400, 7200, 86400, 604800)] == [
        "1m", "90m", "2h", "1d", "1w"]
