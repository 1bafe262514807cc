"""Which snapshots a retention policy keeps: pure logic, restic's semantics (``restic forget``).

Snapshots are looked at newest first. ``last`` keeps the N newest. Each bucketed rule
(hourly, daily, weekly, monthly) keeps the newest snapshot of each of the N most recent
buckets that hold a snapshot (an hour, a calendar day, an ISO week, a calendar month; UTC,
so that a policy means the same on every host and across DST changes). A snapshot kept by
any rule is kept, with every rule that kept it as the reason. The newest snapshot is always
kept: the next snapshot of a chain is incremental from its checkpoint (snapshot_chain).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from bbsnap.lazy_dataclass import dataclass
from dataclasses import field
from datetime import datetime, timezone

from bbsnap.errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly")


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, rule) < 0:
                raise UsageError(f"--keep-{rule} must be 0 or more, not {getattr(self, rule)}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, rule) for rule in RULES)

    def require_rule(self) -> "Policy":
        """Refuse a policy without any rule: it would remove every snapshot but the newest."""
        if self.empty:
            raise UsageError("no retention rule given",
                             hint="give at least one of --keep-last, --keep-hourly, "
                                  "--keep-daily, --keep-weekly, --keep-monthly")
        return self

    def describe(self) -> str:
        """``last=3 daily=7`` (the rules set, in a fixed order)."""
        return " ".join(f"{rule}={getattr(self, rule)}" for rule in RULES if getattr(self, rule))

    def as_dict(self) -> dict[str, int]:
        return {rule: getattr(self, rule) for rule in RULES}


@dataclass(frozen=True)
class Dated:
    """What retention needs of a snapshot: its id and when it was taken."""

    id: str
    created_at: datetime


@dataclass
class Selection:
    keep: dict[str, list[str]] = field(default_factory=dict)  # id -> the rules keeping it
    remove: list[str] = field(default_factory=list)            # newest first


def _hour(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month, t.day)


def _week(t: datetime) -> tuple[int, ...]:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _month(t: datetime) -> tuple[int, ...]:
    return (t.year, t.month)


_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": _hour, "daily": _day, "weekly": _week, "monthly": _month}


def select(snapshots: Sequence[Dated], policy: Policy) -> Selection:
    """Split *snapshots* into kept (with reasons) and removed, by *policy* (not empty)."""
    policy.require_rule()
    ordered = sorted(snapshots, key=lambda s: (_utc(s.created_at), s.id), reverse=True)
    selection = Selection()
    left = {rule: getattr(policy, rule) for rule in RULES}
    last_bucket: dict[str, tuple[int, ...] | None] = dict.fromkeys(_BUCKETS)
    for index, snapshot in enumerate(ordered):
        when = _utc(snapshot.created_at)
        reasons = []
        if index == 0:
            reasons.append("newest")
        if left["last"] > 0:
            reasons.append("last")
            left["last"] -= 1
        for rule, bucket_of in _BUCKETS.items():
            bucket = bucket_of(when)
            # Newest first: the first snapshot seen in a bucket is that bucket's newest.
            if left[rule] > 0 and bucket != last_bucket[rule]:
                reasons.append(rule)
                left[rule] -= 1
                last_bucket[rule] = bucket
        if reasons:
            selection.keep[snapshot.id] = reasons
        else:
            selection.remove.append(snapshot.id)
    return selection


def _utc(t: datetime) -> datetime:
    return t.astimezone(timezone.utc) if t.tzinfo else t.replace(tzinfo=timezone.utc)
