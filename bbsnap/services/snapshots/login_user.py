"""The login user of a snapshot that has nobody to inherit one from, asked of the guest agent.

A snapshot of a domain bbsnap did not create (virt-manager's, virsh's) has no catalogue
ancestor whose ``username`` it could take, and without one ``servers ssh`` on its clones
tries root, which cloud images refuse. The guest agent knows who is logged in (qemu-ga's
guest-get-users reads the guest's utmp): the most recently logged-in user other than root
is the guest's own login user as far as anyone can tell, so the snapshot records that one.

Only that path asks, and only once the snapshot's instant is fixed (never inside the freeze
window): the snapshot's worker, in a thread beside QEMU's copy and the copy's storing
(finish.py), bounded by :data:`AGENT_TIMEOUT`, so the command's latency has none of it
(scripts/bench_login_user.py), nor, unless the agent is slower than the copy, the time
until available.
"""

from __future__ import annotations

from collections.abc import Sequence

from bbsnap.errors import GuestAgentError, UsageError
from bbsnap.hypervisor import GuestUser, Hypervisor
from bbsnap.reporting import Reporter
from bbsnap.services import image_fields

AGENT_TIMEOUT = 2  # seconds; libvirt answers at once when no agent is connected
SUPERUSER = "root"


def choose(users: Sequence[GuestUser]) -> str | None:
    """The most recently logged-in user that is not root and that bbsnap can record as a
    login name (a Windows "DOMAIN\\user" or an odd name is passed over), or None."""
    usable = [u for u in users if u.name != SUPERUSER and _recordable(u.name)]
    if not usable:
        return None
    return max(usable, key=lambda u: (u.login_time, u.name)).name


def ask(hypervisor: Hypervisor, domain: str) -> str | None:
    """The guest agent's answer: None when there is no agent, it does not answer in time,
    or nobody but root is logged in (servers ssh then names the user). Says nothing, so a
    thread of the worker may ask (finish.py) while the copy goes on."""
    try:
        users = hypervisor.logged_in_users(domain, AGENT_TIMEOUT)
    except GuestAgentError:
        return None
    return choose(users)


def note(reporter: Reporter, domain: str, image_id: str, chosen: str) -> None:
    reporter.note(f"the guest agent of {domain} reports {chosen} as the most recently "
                  f"logged-in user other than root: recorded as {image_id}'s login user "
                  f"(servers ssh on its clones logs in as {chosen}; "
                  f"'bbsnap images update {image_id} -u USER' changes it)")


def _recordable(name: str) -> bool:
    try:
        image_fields.check_username(name)
    except UsageError:
        return False
    return True
