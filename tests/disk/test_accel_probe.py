"""The acceleration probe runs a real QEMU: its boot sector must succeed under TCG,
so that a KVM failure really means KVM, not a broken probe."""

from bbsnap.accel import probe_kvm, resolve_accel
from bbsnap.errors import UsageError

import pytest


def test_probe_guest_runs_to_completion_under_tcg():
    result = probe_kvm(accel="tcg")
    assert result.usable, result.reason


def test_explicit_choices_skip_the_probe_and_bad_ones_are_refused():
    assert resolve_accel("tcg") == "tcg" and resolve_accel("kvm") == "kvm"
    with pytest.raises(UsageError):
        resolve_accel("warp")


def test_auto_follows_the_probe_verdict():
    verdict = probe_kvm()
    assert resolve_accel("auto", verdict) == ("kvm" if verdict.usable else "tcg")
