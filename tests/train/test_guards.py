import math

from lmlab.train.guards import StepGuard


def test_worked_example_from_docstring():
    guard = StepGuard(spike_factor=2.0, spike_window=3, spike_warmup=0)
    assert [guard.check(s, loss, 1.0) for s, loss in enumerate([4.0, 3.0, 3.5])] == [None] * 3
    assert guard.check(3, 9.0, 1.0) == "loss_spike"
    assert guard.check(3, 3.2, 1.0) is None
    assert guard.skipped == 1


def test_nonfinite_loss_and_grad_are_skipped_and_counted_in_a_row():
    guard = StepGuard()
    assert guard.check(0, math.nan, 1.0) == "nonfinite_loss"
    assert guard.check(0, 1.0, math.inf) == "nonfinite_grad"
    assert guard.nonfinite_in_a_row == 2
    assert guard.check(0, 1.0, 1.0) is None
    assert guard.nonfinite_in_a_row == 0
    assert list(guard.losses) == [1.0]  # non-finite values never enter the window


def test_spike_guard_waits_for_warmup_and_a_full_window():
    guard = StepGuard(spike_factor=2.0, spike_window=2, spike_warmup=5)
    for step in range(5):
        assert guard.check(step, [1.0, 1.0, 50.0, 1.0, 1.0][step], 1.0) is None
    assert guard.check(5, 50.0, 1.0) == "loss_spike"
    fresh = StepGuard(spike_factor=2.0, spike_window=3, spike_warmup=0)
    assert fresh.check(0, 1.0, 1.0) is None
    assert fresh.check(1, 50.0, 1.0) is None  # window not full yet


def test_grad_spike_is_optional():
    guard = StepGuard(spike_factor=None, spike_window=2, grad_spike_factor=4.0)
    guard.check(0, 1.0, 1.0)
    guard.check(1, 1.0, 1.0)
    assert guard.check(2, 100.0, 1.0) is None  # loss guard off
    assert guard.check(3, 1.0, 5.0) == "grad_spike"


def test_a_lasting_new_level_is_accepted_after_half_a_window():
    guard = StepGuard(spike_factor=2.0, spike_window=5, spike_warmup=0)
    for step in range(5):
        guard.check(step, 1.0, 1.0)
    verdicts = [guard.check(5, 10.0, 1.0) for _ in range(4)]
    assert verdicts == ["loss_spike", "loss_spike", "loss_spike", None]


def test_state_dict_round_trip_continues_identically():
    losses = [3.0, 2.5, 2.7, 2.4, 9.0, 2.3, math.nan, 2.2, 7.5]
    a = StepGuard(spike_factor=2.0, spike_window=4, spike_warmup=2)
    want = [a.check(s, loss, 1.0) for s, loss in enumerate(losses)]
    b = StepGuard(spike_factor=2.0, spike_window=4, spike_warmup=2)
    got = [b.check(s, loss, 1.0) for s, loss in enumerate(losses[:5])]
    c = StepGuard(spike_factor=2.0, spike_window=4, spike_warmup=2)
    c.load_state_dict(b.state_dict())
    got += [c.check(s, loss, 1.0) for s, loss in enumerate(losses[5:], start=5)]
    assert got == want
    assert "loss_spike" in want and "nonfinite_loss" in want
    assert c.state_dict() == a.state_dict()
