"""MLRSScheduler in a plain PyTorch loop: order, stages, gamma, warmup, bounds, non-finite losses, state."""

import math

import pytest
import torch

from hf_mlrs import MLRSNet, MLRSScheduler
from hf_mlrs.scheduler import LOSS_EMA_BETA, paper_gamma
from tests.testing_utils import constant_stages


def optimizer(lr=1e-3, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (k + 1)} for k, p in enumerate(params)])


def test_horizon_free_loss_mode_switches_when_the_smoothed_loss_reaches_the_recorded_level():
    net = constant_stages(2.0, 0.0, -2.0)
    net.stage_switch_losses[1:] = torch.tensor([0.7, 0.4])
    scheduler = MLRSScheduler(optimizer(), net, gamma=1.0, stage_by="loss")
    losses = [max(0.1, 1.0 - 0.05 * t) for t in range(30)]
    stages, ema = [], None
    expected = []
    for loss in losses:
        scheduler.observe(loss)
        stages.append(scheduler.stage)
        x = loss / losses[0]
        ema = x if ema is None else LOSS_EMA_BETA * ema + (1 - LOSS_EMA_BETA) * x
        expected.append(2 if ema <= 0.4 else 1 if ema <= 0.7 else 0)
    assert stages == expected and stages[0] == 0 and stages[-1] == 2


def test_read_from_start_after_a_rewind_reads_the_loss_curve_again():
    """After a rewind the model is back at its start: in loss mode the stage and the smoothed loss start over (a probe
    that crossed a switch loss must not leave the rerun in a later stage); the loss scale is kept; the recurrent
    state is fresh in every mode, and a stage set by progress or fixed is left alone."""
    net = constant_stages(2.0, 0.0, -2.0)
    net.stage_switch_losses[1:] = torch.tensor([0.7, 0.4])
    scheduler = MLRSScheduler(optimizer(), net, gamma=1.0, stage_by="loss")
    for t in range(30):
        scheduler.observe(max(0.1, 1.0 - 0.05 * t))
    assert scheduler.stage == 2 and scheduler.loss_ema < 0.4
    scheduler.read_from_start()
    assert scheduler.stage == 0 and scheduler.loss_ema is None and not scheduler.recent_losses
    assert scheduler.initial_loss == 1.0
    assert all(torch.equal(a, b) for a, b in zip(scheduler.hidden, net.init_state("cpu")))
    scheduler.observe(1.0)  # reads the rerun's first loss as the run's first: stage 0 again
    assert scheduler.stage == 0 and scheduler.loss_ema == pytest.approx(1.0)
    fixed = MLRSScheduler(optimizer(), net, gamma=1.0, stage_by="fixed", stage=1)
    fixed.observe(1.0)
    fixed.read_from_start()
    assert fixed.stage == 1 and fixed.loss_ema is not None


def test_loss_mode_needs_recorded_switch_losses():
    with pytest.raises(ValueError, match="switch losses recorded at meta-training"):
        MLRSScheduler(optimizer(), constant_stages(1.0, 0.0), gamma=1.0, stage_by="loss")


def test_progress_mode_needs_the_horizon():
    with pytest.raises(ValueError, match="num_training_steps"):
        MLRSScheduler(optimizer(), constant_stages(1.0, 0.0), gamma=1.0, stage_by="progress")


def test_auto_gamma_is_the_paper_heuristic_and_is_recomputed_at_stage_switches():
    assert abs(paper_gamma(2.3, 10) - 0.67) < 0.01 and abs(paper_gamma(4.6, 100) - 1.04) < 0.02
    assert math.isnan(paper_gamma(0.1, 10))  # loss * C = 1: the heuristic vanishes
    scheduler = MLRSScheduler(optimizer(), constant_stages(1.0, 1.0), gamma="auto", num_labels=10,
                              num_training_steps=4)
    scheduler.observe(2.3)
    assert scheduler.gamma == paper_gamma(2.3, 10)
    scheduler.observe(1.5)
    scheduler.observe(0.5)  # stage 1 starts here: gamma from the mean of the recent losses
    assert scheduler.gamma == paper_gamma((2.3 + 1.5 + 0.5) / 3, 10)
    with pytest.raises(ValueError, match="vanishes"):
        MLRSScheduler(optimizer(), MLRSNet(), gamma="auto", num_labels=10).observe(0.1)


def test_warmup_groups_and_reported_lr():
    net = constant_stages(0.0)
    opt = optimizer(lr=1e-3, groups=2)  # the second group starts at twice the lr: the ratio is kept
    scheduler = MLRSScheduler(opt, net, gamma=0.2, warmup_steps=4)
    lrs = [scheduler.observe(1.0) for _ in range(6)]
    assert lrs == pytest.approx([0.1 * k / 4 for k in (1, 2, 3, 4)] + [0.1, 0.1])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1])
    assert scheduler.get_last_lr() == [g["lr"] for g in opt.param_groups]
    scheduler.step()  # the LRScheduler step after optimizer.step() leaves the lr alone
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1])


def test_nonfinite_loss_keeps_lr_and_state():
    scheduler = MLRSScheduler(optimizer(), MLRSNet(), gamma=1e-2)
    lr = scheduler.observe(1.2)
    hidden = [t.clone() for t in scheduler.hidden]
    with pytest.warns(RuntimeWarning, match="non-finite training loss"):
        assert scheduler.observe(float("nan")) == lr
    assert all(torch.equal(a, b) for a, b in zip(hidden, scheduler.hidden)) and scheduler.nonfinite_skips == 1


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    net = MLRSNet()
    first = MLRSScheduler(optimizer(), net, gamma=1e-2)
    losses = [2.0, 1.7, 1.5, 1.1, 0.9, 0.8, 0.6, 0.5]
    for loss in losses[:4]:
        first.observe(loss)
    state = first.state_dict()
    rest_a = [first.observe(loss) for loss in losses[4:]]
    second = MLRSScheduler(optimizer(), net, gamma=1e-2)
    second.load_state_dict(state)
    assert [second.observe(loss) for loss in losses[4:]] == rest_a
    with pytest.raises(ValueError, match="not written by hf_mlrs"):
        second.load_state_dict({"last_epoch": 0})
