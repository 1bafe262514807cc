"""Which guest user a snapshot records as its login user (services/snapshots/login_user.py)."""

from __future__ import annotations

from datetime import datetime, timezone

from bbsnap.hypervisor import GuestUser
from bbsnap.services.snapshots.login_user import choose


def _at(hour: int) -> datetime:
    return datetime(2026, 1, 1, hour, tzinfo=timezone.utc)


def test_the_most_recently_logged_in_user_other_than_root_is_chosen():
    users = [GuestUser("admin", _at(8)), GuestUser("debian", _at(9)), GuestUser("root", _at(10))]
    assert choose(users) == "debian"


def test_nobody_but_root_or_nobody_at_all_gives_no_user():
    assert choose([GuestUser("root", _at(10))]) is None
    assert choose([]) is None


def test_names_bbsnap_cannot_record_as_a_login_name_are_passed_over():
    users = [GuestUser("ok-user", _at(1)), GuestUser("Administrator", _at(5), domain="CORP"),
             GuestUser("-oProxyCommand=x", _at(6)), GuestUser("a b", _at(7))]
    assert choose(users) == "ok-user"


def test_equal_login_times_choose_the_same_user_whatever_the_order():
    users = [GuestUser("bob", _at(9)), GuestUser("alice", _at(9))]
    assert choose(users) == choose(list(reversed(users))) == "bob"
