"""Restart decisions as pure functions of specs, exits and monotonic time."""

import pytest

from mesh import supervision as sv


@pytest.mark.parametrize("restart, how, expected", [
    ("permanent", sv.CRASH, True), ("permanent", sv.NORMAL, True), ("permanent", sv.TIMEOUT, True),
    ("permanent", sv.SHUTDOWN, False),
    ("transient", sv.CRASH, True), ("transient", sv.TIMEOUT, True), ("transient", sv.NORMAL, False),
    ("temporary", sv.CRASH, False), ("temporary", sv.NORMAL, False),
    # losing a node is not the agent's exit: everyone moves
    ("temporary", sv.LOST, True), ("transient", sv.LOST, True),
])
def test_should_restart(restart, how, expected):
    assert sv.should_restart(restart, how) is expected


@pytest.mark.parametrize("reason, how", [
    ("normal", sv.NORMAL), ("shutdown", sv.NORMAL), (("shutdown", "done"), sv.NORMAL), (["shutdown", 3], sv.NORMAL),
    ("broken", sv.CRASH), (("shutdown",), sv.CRASH), (("other", "x"), sv.CRASH), ("Shutdown", sv.CRASH),
])
def test_stop_reasons_that_are_normal_exits(reason, how):
    assert sv.stop_exit(reason) == how


def test_strategies_pick_the_children_to_restart():
    kids = ["a", "b", "c", "d"]
    assert sv.to_restart("one_for_one", kids, "b") == ["b"]
    assert sv.to_restart("one_for_all", kids, "b") == kids
    assert sv.to_restart("rest_for_one", kids, "b") == ["b", "c", "d"]
    assert sv.to_restart("rest_for_one", kids, "d") == ["d"]
    with pytest.raises(ValueError):
        sv.to_restart("all_for_none", kids, "b")


def test_intensity_allows_exactly_intensity_restarts_per_period():
    history = ()
    for t in (0.0, 1.0, 2.0):
        allowed, history = sv.allow_restart(history, t, intensity=3, period_s=5.0)
        assert allowed
    allowed, _ = sv.allow_restart(history, 3.0, intensity=3, period_s=5.0)
    assert not allowed  # the fourth within 5 s is one too many


def test_intensity_forgets_restarts_older_than_the_period():
    history = ()
    for t in (0.0, 1.0, 2.0):
        _, history = sv.allow_restart(history, t, 3, 5.0)
    allowed, history = sv.allow_restart(history, 5.5, 3, 5.0)  # 0.0 has aged out
    assert allowed and history == (1.0, 2.0, 5.5)


def test_zero_intensity_allows_no_restart():
    assert sv.allow_restart((), 0.0, 0, 5.0)[0] is False


def test_liveness():
    assert not sv.liveness_expired(10.0, 10.99, 0.25, 4)
    assert sv.liveness_expired(10.0, 11.0, 0.25, 4)


def test_restart_backoff_first_restart_at_once_then_doubling_up_to_the_cap():
    delays, streak = [], 0
    for _ in range(8):
        delay, streak = sv.restart_backoff(streak, 0.01, 0.1, 1.0)
        delays.append(delay)
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0] and streak == 8


def test_restart_backoff_resets_after_a_long_enough_run_and_can_be_switched_off():
    assert sv.restart_backoff(6, 1.0, 0.1, 1.0) == (0.0, 1)   # ran as long as the cap: a new streak
    assert sv.restart_backoff(6, 0.99, 0.1, 1.0) == (1.0, 7)
    assert sv.restart_backoff(6, 0.0, 0.0, 1.0) == (0.0, 7)   # backoff_s = 0: never wait


def crash_loop(spec, start_s):
    """A child whose every start fails `start_s` after it: when does its supervisor give up?
    Exits count against the intensity when they happen; restarts wait their backoff."""
    now, history, streak = 0.0, (), 0
    for exits in range(1, 10_000):
        allowed, history = sv.allow_restart(history, now, spec.intensity, spec.period_s)
        if not allowed:
            return exits, now
        delay, streak = sv.restart_backoff(streak, start_s, spec.backoff_s, spec.backoff_max_s)
        now += delay + start_s
    return None, now


def test_a_fast_crash_loop_still_escalates_as_in_otp():
    spec = sv.SupervisorSpec("s", intensity=3, period_s=5.0, backoff_s=0.1, backoff_max_s=5.0)
    exits, at = crash_loop(spec, 0.001)
    assert exits == 4 and at < 0.5         # the 4th exit within 5 s gives up, as without backoff
    off = sv.SupervisorSpec("s", intensity=3, period_s=5.0, backoff_s=0.0)
    assert crash_loop(off, 0.001)[0] == 4


def test_a_slow_crash_loop_costs_one_start_per_cap():
    spec = sv.SupervisorSpec("s", intensity=100, period_s=10.0, backoff_s=0.1, backoff_max_s=5.0)
    exits, at = crash_loop(spec, 0.001)
    assert exits is None                    # 100 in 10 s never happens
    assert at > 5.0 * 9_000                 # ~10,000 exits took hours, not the 10 s it took without
