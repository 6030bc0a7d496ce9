"""The learned lr scale (mlrs_gamma="learned"): its hypergradient, bounds, exact resume, and its use in training."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback

from hf_mlrs import MLRSNet, MLRSTrainer
from hf_mlrs.scale import LearnedScale
from tests.test_hypergrad import OPTIMIZERS, PendingStep
from tests.test_trainer import AppliedLrProbe, logged_lrs
from tests.testing_utils import constant_stages, tiny_args, tiny_bert, tiny_dataset


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_log_gamma_hypergradient_matches_central_finite_differences(name):
    """dL_meta/dlog(gamma) = <g_meta, delta>: the exact hypergradient of the scale, at no extra cost."""
    pending = PendingStep(OPTIMIZERS[name])
    net_output = 0.61  # A_t: alpha = gamma * A_t is the optimizer's lr
    log_gamma, eps = math.log(pending.lr / net_output), 1e-5

    def meta_loss(s):
        return pending.meta_loss_after(math.exp(s) * net_output)

    finite_difference = (meta_loss(log_gamma + eps) - meta_loss(log_gamma - eps)) / (2 * eps)
    learner = pending.take_with_learner(math.exp(log_gamma) * net_output)
    fast = learner.local_dot(torch.autograd.grad(pending.meta_loss(), learner.params)).item()
    assert abs(finite_difference) > 1e-4  # a real slope
    assert abs(fast - finite_difference) <= 1e-5 * abs(finite_difference)


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e30, 1e30))


@settings(max_examples=200, deadline=None)
@given(grads=st.lists(finite_or_not, max_size=60), start=st.floats(-12, 3), lr=st.floats(1e-3, 5.0),
       max_step=st.floats(1e-3, 2.0))
def test_scale_never_leaves_its_bounds_and_moves_by_at_most_max_step(grads, start, lr, max_step):
    low, high = 1e-6, 1e-1
    scale = LearnedScale(10**start, lr=lr, bounds=(low, high), max_step=max_step)
    assert math.log(low) <= scale.log_gamma <= math.log(high)
    for g in grads:
        before = scale.log_gamma
        scale.update(g)
        assert math.log(low) <= scale.log_gamma <= math.log(high)
        assert abs(scale.log_gamma - before) <= max_step + 1e-12
        assert math.isfinite(scale.gamma) and scale.gamma > 0
    assert scale.num_updates + scale.num_skipped == len(grads)


def test_scale_follows_the_sign_of_a_consistent_hypergradient():
    grows, shrinks = LearnedScale(1e-4, lr=0.1), LearnedScale(1e-4, lr=0.1)
    for _ in range(20):
        grows.update(-3.0)  # dL/dlog(gamma) < 0: a larger lr lowers the held-out loss
        shrinks.update(+1e-9)  # the size of the hypergradient does not matter, its sign does
    assert grows.gamma == pytest.approx(1e-4 * math.exp(2.0), rel=1e-6)  # 20 steps of 0.1 in log
    assert shrinks.gamma == pytest.approx(1e-4 * math.exp(-2.0), rel=1e-6)
    assert not grows.settled and not shrinks.settled


def learned_args(output_dir, **overrides):
    """A learned scale with symmetric updates from learning_rate (no relative start, no growth phase)."""
    values = dict(max_steps=16, mlrs_gamma="learned", mlrs_meta_interval=1, mlrs_scale_lr=0.3, logging_steps=1,
                  mlrs_scale_start_update=None, mlrs_scale_growth=0.0, mlrs_cooldown_fraction=0.0)
    values.update(overrides)
    return tiny_args(output_dir, **values)


def gammas(trainer):
    return [e["mlrs/gamma"] for e in trainer.state.log_history if "mlrs/gamma" in e]


class LeastSquares(torch.nn.Module):
    """A linear model with a mean-squared loss: full-batch, the one-step hypergradient has no noise at all."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}


def least_squares_data(n=64):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "labels": (x @ torch.randn(8, generator=g)).tolist()})


@pytest.mark.parametrize("start, direction", [(1e-6, "up"), (50.0, "down")])
def test_learned_scale_moves_away_from_a_bad_start(tmp_path, start, direction):
    """SGD from 1e-6 (nothing learns) grows; from 50 (beyond 2 / curvature: the loss explodes) shrinks."""
    data = least_squares_data()
    args = learned_args(tmp_path, learning_rate=start, optim="sgd", per_device_train_batch_size=64, max_steps=30,
                        max_grad_norm=0.0)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0))
    trainer.train()
    values = gammas(trainer)
    assert len(values) == 30 and all(1e-8 <= g <= 10 for g in values)
    changes = [b / a for a, b in zip(values, values[1:])]
    if direction == "up":  # every update in the right direction, by the clipped factor once Adam is warm
        assert all(c > 1 for c in changes) and values[-1] > 100 * start
    else:
        assert all(c < 1 for c in changes[:5]) and values[-1] < start / 20


def test_logged_lr_is_applied_with_a_learned_scale(tmp_path, dataset):
    probe = AppliedLrProbe()
    trainer = MLRSTrainer(model=tiny_bert(), args=learned_args(tmp_path, optim="sgd", learning_rate=0.05),
                          train_dataset=dataset, callbacks=[probe])
    trainer.train()
    lrs = logged_lrs(trainer)
    torch.testing.assert_close(torch.tensor(probe.applied), torch.tensor(lrs), rtol=2e-3, atol=0)
    assert max(lrs) / min(lrs) > 1.5  # the scale moved, so the comparison says something


def test_transfer_with_a_learned_scale_keeps_the_net_frozen(tmp_path):
    schedule = constant_stages(0.0, -1.0)  # A = 0.5, then 0.27: the shape is the net's, the scale is learned
    frozen = [p.detach().clone() for p in schedule.parameters()]
    data = least_squares_data()
    args = learned_args(tmp_path, learning_rate=1e-4, optim="sgd", per_device_train_batch_size=64, max_steps=30)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data, schedule=schedule)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(frozen, trainer.schedule.parameters()))
    values = gammas(trainer)
    assert values[-1] > 10 * values[0]
    outputs = [e["mlrs/net_output"] for e in trainer.state.log_history if "mlrs/net_output" in e]
    assert outputs[0] == pytest.approx(0.5, abs=1e-3) and outputs[-1] == pytest.approx(0.2689, abs=1e-3)


def test_growth_phase_grows_until_the_hypergradient_says_stop():
    scale = LearnedScale(1e-6, lr=0.1, growth=0.3)
    for _ in range(10):
        scale.update(-1e-3 * (1 + scale.t % 2))  # a larger lr helps (the size does not matter): keep growing
    assert scale.growing and scale.gamma == pytest.approx(1e-6 * math.exp(3.0), rel=1e-9)
    values = [scale.update(5.0) for _ in range(4)]  # a larger lr hurts, loudly
    assert not scale.growing and scale.settled
    assert values[-1] < values[-2] < values[-3]  # stopped within two updates, then shrinks


def test_linear_growth_adds_the_start_while_the_signal_agrees_and_is_exponential_otherwise():
    """growth_linear: after LINEAR_AFTER raw hypergradients in a row that say "larger", each growth update adds c x
    start to gamma (within the max_step clip); a disagreeing sign returns to exponential growth until enough agree."""
    from hf_mlrs.scale import LINEAR_AFTER as n

    start, e = 1e-4, math.exp
    scale = LearnedScale(start, growth=0.1, growth_linear=1.0, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    gammas = [scale.update(-1.0) for _ in range(n + 3)]
    assert gammas[n - 2] == pytest.approx(start * e(0.1 * (n - 1)), rel=1e-12)  # n - 1 exponential updates first
    assert start / gammas[n - 2] > e(0.5) - 1  # then + start would be more than a factor e^0.5: clipped to it
    assert gammas[n - 1] == pytest.approx(gammas[n - 2] * e(0.5), rel=1e-12)
    assert gammas[n + 2] == pytest.approx(gammas[n - 1] + 3 * start, rel=1e-12)  # and +1 x start per update after
    noisy = scale.update(2.0)  # one "smaller": growth goes on (1 of the last 4), exponentially
    assert scale.growing and noisy == pytest.approx(gammas[-1] * e(0.1), rel=1e-12)
    again = [scale.update(-1.0) for _ in range(n)]  # the streak restarts: n - 1 exponential, then linear
    assert again[n - 2] == pytest.approx(noisy * e(0.1 * (n - 1)), rel=1e-12)
    assert again[n - 1] == pytest.approx(again[n - 2] + start, rel=1e-12)
    for _ in range(4):  # the signal turns: growth stops, back to the gamma whose hypergradient last said "larger"
        if scale.growing:
            scale.update(2.0)
    assert not scale.growing and scale.gamma == pytest.approx(again[n - 2], rel=1e-12)
    clipped = LearnedScale(start, growth=0.1, growth_linear=100.0, max_step=0.5)
    jumps = [clipped.update(-1.0) for _ in range(n)]
    assert jumps[n - 1] == pytest.approx(jumps[n - 2] * e(0.5), rel=1e-12)  # +100 x start is clipped to e^0.5
    with pytest.raises(ValueError, match="growth_linear"):
        LearnedScale(start, growth_linear=-1.0)


def test_stop_votes_end_growth_when_the_raw_signal_turns_although_the_average_has_not():
    """The hypergradient shrinks 100x while the loss first falls: Adam's average stays negative long after the raw
    signal turned. With stop_votes=3, 3 of the last 4 raw values positive end the growth."""
    averaged, voted = (LearnedScale(1e-4, growth=0.1, stop_votes=v, bounds=(1e-6, 1.0)) for v in (0, 3))
    for g in [-100.0] * 10 + [2.0, -1.0, 2.0, 2.0]:
        averaged.update(g)
        voted.update(g)
    assert averaged.growing  # m is still about -20: the early -100s dominate it
    assert not voted.growing and voted.settled


@pytest.mark.parametrize("min_growth", [3, 10])
def test_no_stop_before_min_growth_updates(min_growth):
    """A pretrained model's first raw hypergradients are noise: with min_growth, "smaller" from the first update on
    (votes and average alike) ends the growth only at update min_growth, having grown by exp(growth) per update."""
    scale = LearnedScale(1e-4, growth=0.1, stop_votes=3, bounds=(1e-6, 1.0), min_growth=min_growth)
    growing, before = [], []
    for _ in range(12):
        before.append(scale.gamma)
        scale.update(5.0)
        growing.append(scale.growing)
    stop = growing.index(False)  # 0-based: the update that ended the growth
    assert stop == min_growth - 1
    assert math.isclose(before[stop], 1e-4 * math.exp(0.1 * stop), rel_tol=1e-9)  # grown at every update before


def test_backoff_returns_to_the_last_gamma_the_raw_signal_called_too_small():
    scale = LearnedScale(1e-4, lr=0.1, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    # 12 growth updates, not a confident growth (the first said "smaller"); the 12th was taken at 1e-4 * e^1.1 and
    # said "larger"
    for g in [1.0] + [-100.0] * 9 + [2.0, -1.0]:
        scale.update(g)
    assert not scale.confident
    assert scale.growing and scale.log_gamma == pytest.approx(math.log(1e-4) + 1.2)
    scale.update(2.0)
    scale.update(2.0)  # 3 of the last 4 positive: stop, back to e^1.1 (not 0.9 below the current e^1.4)
    assert not scale.growing and scale.gamma == pytest.approx(1e-4 * math.exp(1.1), rel=1e-12)
    assert scale.m == 0.0 and scale.v == 0.0 and scale.adam_t == 0  # Adam restarts from there
    scale.update(3.0)  # and the first tracking step follows the new signal alone: down by lr x 1
    assert scale.gamma == pytest.approx(1e-4 * math.exp(1.0), rel=1e-9)
    capped = LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.2, bounds=(1e-6, 1.0))
    for g in [-100.0] * 5 + [2.0] * 3:
        capped.update(g)  # "larger" last at e^0.4; stopped at e^0.7: back by the cap 0.2 only
    assert not capped.growing and capped.gamma == pytest.approx(1e-4 * math.exp(0.5), rel=1e-12)
    early = LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    for g in (1.0, 1.0, 1.0):  # no raw signal ever said "larger": back to the start, never below it
        early.update(g)
    assert not early.growing and early.gamma == pytest.approx(1e-4, rel=1e-12)


def test_after_a_confident_growth_the_backoff_returns_to_where_its_agreeing_streak_ended():
    """A confident growth ("larger" from the first update on) ends its agreeing streak where the one-step signal
    crosses zero; the votes after it are noise around zero while growth goes on. The backoff goes to the last gamma
    of that streak, not to a later "larger" (session 28: a from-scratch LM's late "larger" came 2.5x past the
    crossing, and the scale held there stalled the run); Adam restarts there, the margin below it, as before."""
    def grown(votes, **kwargs):
        scale = LearnedScale(1e-4, **{"growth": 0.1, "stop_votes": 3, "backoff": 0.9, "bounds": (1e-6, 1.0), **kwargs})
        for g in votes:
            scale.update(g)
        return scale

    noisy_after = [-100.0] * 10 + [2.0, -1.0, 2.0, 2.0]  # agreeing through the 10th update, taken at e^0.9
    scale = grown(noisy_after)
    assert scale.confident and not scale.growing
    assert scale.gamma == pytest.approx(1e-4 * math.exp(0.9), rel=1e-12)  # not e^1.1, its last "larger"
    assert scale.m == 0.0 and scale.v == 0.0 and scale.adam_t == 0
    assert grown(noisy_after, margin=0.6).gamma == pytest.approx(0.6 * 1e-4 * math.exp(0.9), rel=1e-12)
    # the backoff's cap still bounds how far back it goes
    assert grown(noisy_after, backoff=0.3).gamma == pytest.approx(1e-4 * math.exp(1.0), rel=1e-12)  # from e^1.3
    # a new agreeing streak (LINEAR_AFTER "larger" in a row once confident) moves the crossing on
    later = grown([-100.0] * 10 + [2.0] + [-1.0] * 6 + [2.0] * 3)  # agreeing again at updates 16-17 (e^1.5, e^1.6)
    assert later.gamma == pytest.approx(1e-4 * math.exp(1.6), rel=1e-12)
    # the crossing rides in the checkpointed state; a state written before it resumes with the old target
    restored = grown([-100.0] * 10 + [2.0, -1.0])
    resumed = LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    resumed.load_state_dict(restored.state_dict())
    for g in (2.0, 2.0):
        resumed.update(g)
    assert resumed.gamma == pytest.approx(scale.gamma, rel=1e-12)
    legacy = LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    # as the rule before it wrote it: the last "larger" of all, the 12th update's e^1.1
    legacy.load_state_dict({**restored.state_dict(), "last_larger": math.log(1e-4) + 1.1})
    for g in (2.0, 2.0):
        legacy.update(g)
    assert legacy.gamma == pytest.approx(1e-4 * math.exp(1.1), rel=1e-12)


def test_margin_lowers_the_stopped_gamma_once_by_its_factor():
    """margin: when growth stops, gamma after the backoff is multiplied by the margin, once; tracking then moves it
    by its usual Adam step, and a margin of 1 leaves every value bitwise as without one."""
    signals = [-100.0] * 10 + [2.0, -1.0, 2.0, 2.0, 3.0, -1.0]
    plain, low = (LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0), margin=m)
                  for m in (1.0, 0.8))
    unset = LearnedScale(1e-4, growth=0.1, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0))
    for k, g in enumerate(signals):
        a, b, c = plain.update(g), low.update(g), unset.update(g)
        assert a == c  # margin 1: bitwise the scale without a margin
        stopped = k >= 13  # the 14th update stops the growth (3 of the last 4 raw values positive)
        assert b == pytest.approx(a * (0.8 if stopped else 1.0), rel=1e-12)
    assert not low.growing and low.gamma < 1e-4 * math.exp(1.1)  # tracking after the stop, below it
    from hf_mlrs.config import learned_scale

    assert learned_scale(1e-3, hold=True).margin == 0.8 and learned_scale(1e-3).margin == 1.0  # the defaults
    assert learned_scale(1e-3, hold=True, confident_hold=True).margin == 0.6  # a frozen schedule's confident hold
    assert learned_scale(1e-3, hold=True, confident_hold=True).growth_linear == 2.7
    assert learned_scale(1e-3, hold=True).growth_linear == 1.35
    for bad in (0.0, 1.5, float("nan")):  # a factor in (0, 1]
        with pytest.raises(ValueError, match="margin"):
            LearnedScale(1e-4, margin=bad)


def test_a_streak_after_a_noisy_start_is_not_confident_and_keeps_the_gentle_growth():
    """The linear growth engages (and a growth counts as confident) only if the signal said "larger" from the first
    update on; the same streak after one "smaller" (a pretrained model's head learning after a noisy start) keeps
    growing exponentially and is not held. Once confident, a later streak turns linear again."""
    from hf_mlrs.scale import LINEAR_AFTER as n

    def scale():
        return LearnedScale(1e-4, growth=0.1, growth_linear=1.0, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0),
                            margin=0.8, min_growth=3, confident_hold=True)

    late, early = scale(), scale()
    late.update(2.0)  # one "smaller" first
    gammas = [late.update(-1.0) for _ in range(2 * n)]
    assert gammas[-1] == pytest.approx(gammas[0] * math.exp(0.1 * (2 * n - 1)), rel=1e-12)  # exponential throughout
    assert not late.confident
    for g in [2.0] * 3:  # the signal turns: a stop that is tracked, not held
        late.update(g)
    assert late.settled and not late.holds
    early.update(float("nan"))  # a skipped (non-finite) update counts neither way
    gammas = [early.update(-1.0) for _ in range(n + 1)]
    assert early.confident and gammas[n] == pytest.approx(gammas[n - 1] + 1e-4, rel=1e-12)  # linear: + the start


def test_confident_hold_holds_only_after_the_linear_growth_engaged():
    """confident_hold: a stop after LINEAR_AFTER raw "larger" in a row (the linear growth engaged) holds, with the
    margin; a stop while the signal was still noise does not hold (MetaLearner keeps meta-updating it) and gets no
    margin. Without confident_hold every stop holds, as before; the flag rides in the checkpointed state."""
    from hf_mlrs.hypergrad import MetaLearner
    from hf_mlrs.scale import LINEAR_AFTER as n

    def scale(**kw):
        return LearnedScale(1e-4, growth=0.1, growth_linear=1.0, stop_votes=3, backoff=0.9, bounds=(1e-6, 1.0),
                            margin=0.8, min_growth=3, **kw)

    confident, noisy, old = scale(confident_hold=True), scale(confident_hold=True), scale()
    for g in [-1.0] * n + [2.0] * 3:  # n "larger" in a row, then the signal turns
        confident.update(g)
    for g in [-1.0, 2.0] * 3 + [2.0] * 3:  # never more than one "larger" in a row, then "smaller"
        noisy.update(g)
        old.update(g)
    assert confident.confident and confident.settled and confident.holds
    assert not noisy.confident and noisy.settled and not noisy.holds
    assert old.holds  # without confident_hold a stop on noise holds
    assert noisy.gamma == pytest.approx(old.gamma / 0.8, rel=1e-12)  # no margin where it goes on tracking
    learner = MetaLearner(MLRSNet(), [torch.nn.Parameter(torch.zeros(1))], interval=4, meta_lr=0.0, weight_decay=0.0,
                          max_steps=100, train_net=False, scale=noisy, hold=True)
    assert learner.current_interval() == 4  # still meta-updating: the scale tracks
    learner.scale = confident
    assert learner.current_interval() == 101  # never due again: it holds
    restored = scale(confident_hold=True)
    restored.load_state_dict(confident.state_dict())
    assert restored.confident and restored.holds
    legacy = {k: v for k, v in confident.state_dict().items() if k != "confident"}
    restored.load_state_dict(legacy)  # a checkpoint from before session 22: not confident
    assert not restored.confident


def test_relative_start_makes_the_run_independent_of_learning_rate(tmp_path):
    """The first step is rescaled to move the weights by start_update x their norm: any lr gives the same run."""
    data = least_squares_data()
    runs = []
    for start in (1e-5, 1e-1):
        args = learned_args(tmp_path / str(start), learning_rate=start, optim="adamw_torch", max_steps=12,
                            per_device_train_batch_size=64, mlrs_scale_start_update=1e-3, mlrs_scale_growth=0.3)
        trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                              schedule=constant_stages(8.0))
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        probe = FirstStepProbe()
        trainer.add_callback(probe)
        trainer.train()
        runs.append(logged_lrs(trainer))
        moved = (probe.after - before).norm() / before.norm()
        assert moved.item() == pytest.approx(1e-3, rel=1e-4)  # the first step, as taken, is the calibrated one
    # equal up to float32 rounding of the first step taken four decades apart
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=2e-3, atol=0)
    assert runs[0][5] > runs[0][0] * 2  # and it grew from there


class FirstStepProbe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.after = torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_horizon_windows_thin_out_once_the_scale_settles(tmp_path, dataset):
    args = learned_args(tmp_path, max_steps=40, learning_rate=1e-3, mlrs_settle_interval=1, mlrs_meta_interval=4,
                        mlrs_horizon=4, mlrs_scale_hold=False)  # tracks after settling, over 4-step windows
    trainer = MLRSTrainer(model=tiny_bert(), args=args, train_dataset=dataset)
    trainer.train()
    learner = trainer.lr_scheduler.meta_learner
    assert learner.scale.settled and learner.window_length == 4  # windows of 4 steps after settling, ...
    assert 40 <= learner.next_due < 44  # ... every 4th step to the end (a holding scale: none after settling) ...
    assert learner.scale.settle_after < learner.num_meta_steps < 40  # ... so fewer meta steps than steps, ...
    assert learner.scale.num_updates == learner.num_meta_steps  # ... each of which updated the scale


@pytest.mark.parametrize("hold", [None, True])
def test_a_horizon_that_a_holding_scale_would_never_use_is_refused(tmp_path, dataset, hold):
    args = learned_args(tmp_path, mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=4, mlrs_scale_hold=hold)
    with pytest.raises(ValueError, match="mlrs_horizon=4 would never be used.*mlrs_settle_interval=4"):
        MLRSTrainer(model=tiny_bert(), args=args, train_dataset=dataset)  # meta-trains the net: holds by default
    args = learned_args(tmp_path, mlrs_settle_interval=4, mlrs_meta_interval=4, mlrs_horizon=4, mlrs_scale_hold=hold)
    MLRSTrainer(model=tiny_bert(), args=args, train_dataset=dataset)  # windows of 4 throughout: accepted


# ---- exact resume -----------------------------------------------------------------------------------------------


def build(output_dir: str, max_steps: int = 12, variant: str = "windows") -> MLRSTrainer:
    """Meta-trains the net and learns the scale, with dropout (RNG state) and checkpoints every 4 steps.

    "windows": symmetric updates over 2-step windows; "defaults": the library's defaults for a learned scale
    (calibrated start, growth, a meta step every step until settled, cooldown); "next_batch": the shipped default
    frozen, its scale learned from the next step's gradient (a checkpoint during the growth holds a pending update)."""
    torch.set_num_threads(1)
    common = dict(max_steps=max_steps, save_strategy="steps", save_steps=4, per_device_train_batch_size=8,
                  mlrs_meta_lr=1e-2)
    if variant == "windows":
        args = learned_args(output_dir, mlrs_meta_interval=2, mlrs_settle_interval=2, mlrs_horizon=2, **common)
    elif variant == "defaults":
        args = tiny_args(output_dir, mlrs_gamma="learned", mlrs_meta_interval=None, **common)
    else:
        args = tiny_args(output_dir, mlrs_gamma="learned", mlrs_meta_interval=None, mlrs_meta_source="next_batch",
                         **common)
        return MLRSTrainer(model=tiny_bert(dropout=0.1), args=args, train_dataset=tiny_dataset(n=120),
                           schedule=MLRSNet.from_pretrained("multitask-default"))
    return MLRSTrainer(model=tiny_bert(dropout=0.1), args=args, train_dataset=tiny_dataset(n=120))


def outcome(trainer):
    return (logged_lrs(trainer), gammas(trainer), [p.detach().clone() for p in trainer.schedule.parameters()],
            [p.detach().clone() for p in trainer.model.parameters()])


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from transformers import TrainerCallback
from tests.test_scale import build

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

trainer = build({out!r}, variant={variant!r})
trainer.add_callback(Kill())
trainer.train()
"""


@pytest.mark.parametrize("variant", ["windows", "defaults", "next_batch"])
def test_sigkill_then_resume_is_bitwise_exact_with_a_learned_scale(tmp_path, variant):
    full = build(str(tmp_path / "full"), variant=variant)
    full.train()
    expected = outcome(full)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = KILL_SCRIPT.format(root=str(ROOT), out=str(run_dir), variant=variant)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    if variant == "next_batch":  # the checkpoint was written with a scale update waiting for step 5's gradient
        saved = torch.load(run_dir / "checkpoint-4" / "scheduler.pt", weights_only=True)
        assert saved["meta_learner"]["pending_alpha"] is not None and len(saved["meta_learner"]["pending_delta"])
    resumed = build(str(run_dir), variant=variant)
    resumed.train(resume_from_checkpoint=str(run_dir / "checkpoint-4"))
    lrs, values, net, model = outcome(resumed)
    assert lrs == expected[0] and values == expected[1] and len(set(values)) > 3
    assert all(torch.equal(a, b) for a, b in zip(net, expected[2]))
    assert all(torch.equal(a, b) for a, b in zip(model, expected[3]))


def test_resuming_a_fixed_gamma_checkpoint_with_a_learned_scale_is_refused(tmp_path, dataset):
    args = tiny_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    MLRSTrainer(model=tiny_bert(), args=args, train_dataset=dataset).train()
    trainer = MLRSTrainer(model=tiny_bert(), args=learned_args(tmp_path, max_steps=6), train_dataset=dataset)
    with pytest.raises(ValueError, match="fixed gamma.*learns it"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_saved_schedule_records_the_relative_scale_trajectory(tmp_path, dataset):
    trainer = MLRSTrainer(model=tiny_bert(), args=learned_args(tmp_path, learning_rate=1e-5), train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = MLRSNet.from_pretrained(tmp_path / "final" / "mlrs_schedule")
    trajectory = saved.provenance["gamma_trajectory"]
    assert trajectory[0][1] == 1.0 and len(trajectory) > 5
    assert all(0.0 <= progress <= 1.0 for progress, _ in trajectory)
    assert trajectory[-1] == [1.0, pytest.approx(gammas(trainer)[-1] / gammas(trainer)[0], rel=1e-9)]
    assert saved.provenance["gamma_rule"] == "learned"
    assert "gamma_trajectory" in (tmp_path / "final" / "mlrs_schedule" / "README.md").read_text()


def test_callback_learns_only_the_scale_of_a_frozen_schedule_and_resumes_exactly(tmp_path):
    """Plain Trainer + MLRSCallback(gamma="learned", meta_dataset=...): the net stays frozen, gamma is learned and
    logged, the lr logged is the lr applied, and a resumed run continues bitwise."""
    from transformers import Trainer, TrainingArguments

    from hf_mlrs import MLRSCallback

    data = least_squares_data()

    def run(output_dir, max_steps=12, resume=None):
        schedule = constant_stages(0.0, -1.0)
        args = TrainingArguments(str(output_dir), max_steps=max_steps, per_device_train_batch_size=16,
                                 learning_rate=1e-3, optim="sgd", logging_steps=1, report_to="none", use_cpu=True,
                                 save_strategy="steps", save_steps=4, disable_tqdm=True, seed=0)
        probe = AppliedLrProbe()
        callback = MLRSCallback(schedule, gamma="learned", meta_dataset=data, meta_interval=2)
        trainer = Trainer(model=LeastSquares(), args=args, train_dataset=data, callbacks=[probe, callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback, probe, schedule

    trainer, callback, probe, schedule = run(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(schedule.parameters(), constant_stages(0.0, -1.0).parameters()))
    values = gammas(trainer)
    assert len(values) == 12 and len(set(values)) > 5 and callback.scheduler.scale.calibrated
    torch.testing.assert_close(torch.tensor(probe.applied), torch.tensor(logged_lrs(trainer)), rtol=2e-3, atol=0)

    resumed, *_ = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert logged_lrs(resumed)[-8:] == logged_lrs(trainer)[-8:] and gammas(resumed)[-8:] == values[-8:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), trainer.model.parameters()))


def near_solution_data():
    """Noise-free least squares whose solution is 0.3% of LeastSquares' starting weights away: a learned scale's
    relative start is near its stop, so a confident growth stops within a few steps."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    with torch.no_grad():
        labels = LeastSquares().linear(x).squeeze(-1) + 0.003 * (x @ torch.randn(8, generator=g))
    return Dataset.from_dict({"x": x.tolist(), "labels": labels.tolist()})


def callback_run(output_dir, max_steps=80, resume=None, save_steps=None, **callback_options):
    """A plain Trainer + MLRSCallback(gamma="learned") on near_solution_data, SGD."""
    from transformers import Trainer, TrainingArguments

    from hf_mlrs import MLRSCallback

    data = near_solution_data()
    args = TrainingArguments(str(output_dir), max_steps=max_steps, per_device_train_batch_size=64, learning_rate=1e-3,
                             optim="sgd", max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, seed=0)
    callback = MLRSCallback(constant_stages(8.0), gamma="learned", meta_dataset=data, **callback_options)
    trainer = Trainer(model=LeastSquares(), args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_callback_learned_scale_holds_and_rewinds_as_mlrs_trainer_with_a_frozen_schedule(tmp_path):
    """MLRSCallback(gamma="learned") follows MLRSTrainer(schedule=..., mlrs_gamma="learned") step for step: its
    defaults (a relative start, growth, a hold after a confident growth with its margin, the rewind after a probe of
    at most 20% of the run, the cooldown), lrs and final weights. The growth here is confident and stops by step 16
    of 80, so both hold and rewind; with rewind=False the callback goes on from the probe's weights."""
    from hf_mlrs import MLRSTrainingArguments

    plain, callback = callback_run(tmp_path / "callback")
    data = near_solution_data()
    args = MLRSTrainingArguments(str(tmp_path / "trainer"), mlrs_gamma="learned", max_steps=80,
                                 per_device_train_batch_size=64, learning_rate=1e-3, optim="sgd", max_grad_norm=0.0,
                                 logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, seed=0)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0))
    trainer.train()
    scale, rewind = callback.scheduler.scale, callback.scheduler.rewind
    assert scale.confident and scale.holds and scale.margin == 0.6
    assert rewind.step is not None and rewind.step == trainer.lr_scheduler.rewind.step <= 16
    assert callback.scheduler.meta_learner.num_meta_steps == rewind.step  # none once it holds
    torch.testing.assert_close(torch.tensor(gammas(plain)), torch.tensor(gammas(trainer)), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(logged_lrs(plain)), torch.tensor(logged_lrs(trainer)), rtol=1e-6, atol=0)
    for ours, theirs in zip(plain.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    no_rewind, without = callback_run(tmp_path / "no_rewind", rewind=False)
    assert without.scheduler.rewind is None and gammas(no_rewind) == gammas(plain)
    # Both runs end at this least-squares problem's solution (bitwise, on some versions), so compare where the rewind
    # acts: the rewound run's first step after it starts from the starting weights again, the other from the probe's.
    losses = [[h["loss"] for h in run.state.log_history if "loss" in h] for run in (plain, no_rewind)]
    assert losses[0][rewind.step] == losses[0][0] and losses[1][rewind.step] < 1e-2 * losses[0][0]


def test_callback_resumed_before_its_rewind_rewinds_to_the_run_start_bitwise(tmp_path):
    """A checkpoint saved during the probe carries the starting weights (inside its completion marker); resumed from
    it, the run rewinds to the same start and ends bitwise as the uninterrupted one. Without that file the resume
    names the problem and the fix."""
    full, callback = callback_run(tmp_path / "run", save_steps=2)
    k = callback.scheduler.rewind.step
    assert k is not None and k > 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "hf_mlrs_rewind_weights.pt").is_file()
    assert not (tmp_path / "run" / f"checkpoint-{k + k % 2}" / "hf_mlrs_rewind_weights.pt").exists()  # after it
    resumed, again = callback_run(tmp_path / "run", save_steps=2, resume=str(checkpoint))
    assert again.scheduler.rewind.step == k
    assert logged_lrs(resumed)[-(80 - 2):] == logged_lrs(full)[-(80 - 2):]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), full.model.parameters()))
    (checkpoint / "hf_mlrs_rewind_weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rewind=False"):
        callback_run(tmp_path / "run", save_steps=2, resume=str(checkpoint))



def test_cooldown_decays_linearly_and_stops_meta_updates(tmp_path):
    data = least_squares_data()
    args = learned_args(tmp_path, learning_rate=1e-3, optim="sgd", per_device_train_batch_size=64, max_steps=20,
                        mlrs_cooldown_fraction=0.25)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0))
    trainer.train()
    values, lrs = gammas(trainer), logged_lrs(trainer)
    assert len(set(values[:15])) == 15 and len(set(values[15:])) == 1  # no meta-update in the last 5 steps
    output = torch.sigmoid(torch.tensor(8.0)).item()
    expected = [values[-1] * output * k / 6 for k in (5, 4, 3, 2, 1)]
    torch.testing.assert_close(torch.tensor(lrs[15:]), torch.tensor(expected), rtol=1e-6, atol=0)


def test_callback_with_a_learned_gamma_cools_down_by_default_as_mlrs_trainer_does(tmp_path):
    """MLRSCallback(gamma="learned") with no cooldown_fraction: the last 20% of the run (4 of 20 steps) anneal
    linearly with no meta-update, as MLRSTrainer's learned gamma does, whatever the schedule records (0 here)."""
    from transformers import Trainer, TrainingArguments

    from hf_mlrs import MLRSCallback

    data = least_squares_data()
    args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=64, learning_rate=1e-3,
                             optim="sgd", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    schedule = constant_stages(8.0)
    assert schedule.cooldown_fraction == 0.0
    trainer = Trainer(model=LeastSquares(), args=args, train_dataset=data,
                      callbacks=[MLRSCallback(schedule, gamma="learned", meta_dataset=data)])
    trainer.train()
    values, lrs = gammas(trainer), logged_lrs(trainer)
    assert len(set(values[:16])) > 5 and len(set(values[16:])) == 1  # no meta-update in the last 4 steps
    output = torch.sigmoid(torch.tensor(8.0)).item()
    expected = [values[-1] * output * k / 5 for k in (4, 3, 2, 1)]
    torch.testing.assert_close(torch.tensor(lrs[16:]), torch.tensor(expected), rtol=1e-6, atol=0)


class NetAndScaleProbe(TrainerCallback):
    """After every step: the trained (last) stage's parameters and whether the scale is still growing (the earlier
    stages receive snapshots of it at fixed fractions of the run, hold or not)."""

    def __init__(self, trainer):
        self.trainer, self.nets, self.growing = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        live = self.trainer.schedule.stages[-1]
        self.nets.append(torch.cat([p.detach().flatten().clone() for p in live.parameters()]))
        self.growing.append(self.trainer.lr_scheduler.scale.growing)


@pytest.mark.parametrize("hold, frozen, holds", [(True, False, True), (False, False, False), (None, False, True),
                                                 (None, True, True), (False, True, False)])
def test_hold_ends_meta_steps_once_growth_stops(tmp_path, hold, frozen, holds):
    """mlrs_scale_hold: once the growth phase ends, gamma and the meta-trained net keep their values to the end of
    the run; without it they keep moving. Its default holds when the net is meta-trained, and when a frozen
    schedule is applied after a confident growth (the signal here says "larger" at every step until it turns).
    Noise-free least squares, SGD: the one-step signal turns at about 1 / curvature, reached by growth from 0.1
    within the run."""
    data = least_squares_data()
    args = learned_args(tmp_path, learning_rate=0.1, optim="sgd", per_device_train_batch_size=64, max_steps=40,
                        max_grad_norm=0.0, mlrs_scale_growth=0.1, mlrs_settle_interval=1, mlrs_meta_interval=1,
                        mlrs_meta_lr=1e-2, mlrs_scale_hold=hold)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0) if frozen else None)
    probe = NetAndScaleProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    values = gammas(trainer)
    margin = 0.6 if frozen and hold is None else 0.8 if holds else 1.0  # the margin's default follows the hold
    assert trainer.lr_scheduler.scale.margin == margin
    assert trainer.lr_scheduler.scale.confident_hold == (frozen and hold is None)
    assert trainer.lr_scheduler.scale.confident  # the noise-free signal said "larger" at every step before the turn
    stop = probe.growing.index(False)  # 0-based step whose meta-update ended the growth
    assert 3 <= stop < 30 and values[stop] > 2 * values[0]
    after_values, after_nets = values[stop + 1:], probe.nets[stop:]
    if holds:
        assert len(set(after_values)) == 1
        assert all(torch.equal(net, after_nets[0]) for net in after_nets)
        assert trainer.lr_scheduler.scale.num_updates == stop + 1
    else:
        assert len(set(after_values)) == len(after_values)  # a meta-update every step moved gamma ...
        assert frozen or not torch.equal(after_nets[0], after_nets[-1])  # ... and the net, unless it is frozen


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_a_tracking_frozen_scale_uses_its_share_of_each_meta_batch(tmp_path, share):
    """mlrs_scale_track_batch_share: a frozen schedule's scale that tracks after its growth stopped reads the first
    `share` of each meta batch (the same examples, in the same order: a resume draws them alike); its growth reads
    the whole batch; a meta-trained net always does."""
    from hf_mlrs.metastep import MetaStep

    data = least_squares_data()
    sizes = []
    original = MetaStep.meta_batch

    def counted(self, m, share=1.0):
        batch = original(self, m, share)
        sizes.append((self.scheduler.scale.settled, len(batch["labels"])))
        return batch

    args = learned_args(tmp_path, learning_rate=0.1, optim="sgd", per_device_train_batch_size=64, max_steps=40,
                        max_grad_norm=0.0, mlrs_scale_growth=0.1, mlrs_meta_batch_size=8, mlrs_scale_hold=False,
                        mlrs_scale_track_batch_share=share)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetaStep, "meta_batch", counted)
        trainer.train()
    growing = [n for settled, n in sizes if not settled]
    tracking = [n for settled, n in sizes if settled]
    assert growing and tracking and set(growing) == {8}
    assert set(tracking) == {8 if share == 1.0 else 4}
    meta_batch = trainer._meta_step.meta_batch(3, share)["labels"]
    assert torch.equal(meta_batch, trainer._meta_step.meta_batch(3)["labels"][:len(meta_batch)])  # its first share
    assert trainer.lr_scheduler.meta_learner.track_batch_share == share


def test_track_batch_share_must_be_a_share():
    from hf_mlrs import MLRSTrainingArguments

    with pytest.raises(ValueError, match="mlrs_scale_track_batch_share.*not a share in"):
        MLRSTrainingArguments("out", mlrs_scale_track_batch_share=0.0)
