"""mlrs_scale_rewind: once the learned scale stops growing, the model is put back to its starting weights (optimizer
state cleared) and trains again from there at the found gamma; only after a probe of at most
mlrs_scale_rewind_max_share of the run, and by default wherever a learned gamma holds."""

import pytest
import torch
from transformers import TrainerCallback

from hf_mlrs import MLRSTrainer, MLRSTrainingArguments
from tests.test_scale import LeastSquares, NetAndScaleProbe, gammas, least_squares_data
from tests.test_trainer import logged_lrs
from tests.testing_utils import constant_stages, tiny_args


class StateProbe(TrainerCallback):
    """The model's weights and the optimizer's state size at the start and at the end of every step (added after
    MLRSTrainer's own hooks, so it sees a step after the rewind)."""

    def __init__(self, trainer):
        self.trainer, self.start, self.after = trainer, None, {}

    def weights(self):
        return [p.detach().clone() for p in self.trainer.model.parameters()]

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = (self.weights(), len(self.trainer.optimizer.optimizer.state))


def rewind_args(output_dir, **overrides):
    """AdamW on a noise-free least-squares problem from lr 0.1: the scale grows, stops near step 10, and holds (a
    probe of ~40% of the run: rewinding after it needs a max share above the default)."""
    values = dict(max_steps=24, mlrs_gamma="learned", mlrs_scale_rewind=True, mlrs_scale_rewind_max_share=1.0,
                  optim="adamw_torch", learning_rate=0.1,
                  mlrs_scale_start_update=None, per_device_train_batch_size=64, mlrs_meta_batch_size=64,
                  max_grad_norm=0.0, weight_decay=0.0)
    values.update(overrides)
    return tiny_args(output_dir, **values)


def train(output_dir, resume=None, schedule=None, **overrides):
    data = least_squares_data()
    trainer = MLRSTrainer(model=LeastSquares(), args=rewind_args(output_dir, **overrides), train_dataset=data,
                          meta_dataset=data, schedule=schedule)
    probe = StateProbe(trainer)
    trainer.add_callback(probe)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe


def test_rewind_restores_the_start_and_the_run_then_equals_plain_adamw_from_it(tmp_path):
    trainer, probe = train(tmp_path)
    k = trainer.lr_scheduler.rewind.step
    values = gammas(trainer)
    assert k is not None and 3 <= k <= 16, k
    assert values[k - 1] == values[-1] and values[k - 2] != values[k - 1]  # the step whose meta-update stopped it
    weights, optimizer_state = probe.after[k]
    assert all(torch.equal(a, b) for a, b in zip(weights, probe.start)) and optimizer_state == 0
    assert not all(torch.equal(a, b) for a, b in zip(probe.after[k - 1][0], probe.start))  # it had moved
    assert probe.after[k + 1][1] > 0  # and the optimizer starts again
    # Independent reference: torch's AdamW from the starting weights, fresh, at the lrs logged after the rewind
    # (full-batch least squares: every step sees the same data, whatever the order).
    reference = LeastSquares()
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), probe.start))
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1.0, weight_decay=0.0)
    data = least_squares_data()
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    for lr in logged_lrs(trainer)[k:]:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        reference(x, y)["loss"].backward()
        optimizer.step()
    for ours, theirs in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert trainer.lr_scheduler.state_dict()["rewind"] == {"step": k, "skipped": False, "weights": None}


@pytest.mark.parametrize("checkpoint", [4, 12])  # before the rewind (the start rides in it) and after it
def test_resume_across_the_rewind_is_bitwise_exact(tmp_path, checkpoint):
    settings = dict(save_strategy="steps", save_steps=4)
    full, _ = train(tmp_path / "full", **settings)
    assert 4 < full.lr_scheduler.rewind.step < 12
    resumed, _ = train(tmp_path / "full", resume=str(tmp_path / "full" / f"checkpoint-{checkpoint}"), **settings)
    assert resumed.lr_scheduler.rewind.step == full.lr_scheduler.rewind.step
    assert logged_lrs(resumed)[-8:] == logged_lrs(full)[-8:] and gammas(resumed)[-8:] == gammas(full)[-8:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), full.model.parameters()))


def test_rewind_needs_a_learned_scale_that_holds(tmp_path):
    with pytest.raises(ValueError, match="mlrs_scale_rewind.*Set mlrs_gamma='learned'"):
        MLRSTrainingArguments(str(tmp_path), mlrs_scale_rewind=True, use_cpu=True)
    with pytest.raises(ValueError, match="mlrs_scale_rewind.*mlrs_scale_hold=False"):
        MLRSTrainingArguments(str(tmp_path), mlrs_scale_rewind=True, mlrs_gamma="learned", mlrs_scale_hold=False,
                              use_cpu=True)


def test_a_growth_that_never_stops_drops_the_kept_weights(tmp_path):
    trainer, _ = train(tmp_path, learning_rate=1e-4, max_steps=10)  # still growing when the cooldown begins
    rewind = trainer.lr_scheduler.rewind
    assert rewind.skipped and rewind.step is None and rewind.weights is None


def test_without_a_growth_phase_the_rewind_waits_for_the_scale_to_settle(tmp_path):
    # mlrs_scale_growth=0: no growth phase; the scale holds once its signal stops agreeing in sign (settled), and only
    # then is there a found gamma to rewind with.
    trainer, _ = train(tmp_path, mlrs_scale_growth=0.0, mlrs_settle_interval=1)
    rewind, scale = trainer.lr_scheduler.rewind, trainer.lr_scheduler.scale
    assert rewind.step is None or rewind.step >= scale.settle_after, rewind.step


def test_a_probe_longer_than_the_max_share_goes_on_as_a_run_without_the_rewind(tmp_path):
    full, _ = train(tmp_path / "full")
    k = full.lr_scheduler.rewind.step
    assert k is not None  # with a max share of 1 this run rewinds after step k
    # a max share just below k's: the same probe, then no rewind, and the run equals one that never kept a copy
    late, _ = train(tmp_path / "late", mlrs_scale_rewind_max_share=(k - 1) / 24)
    never, _ = train(tmp_path / "never", mlrs_scale_rewind=False)
    assert late.lr_scheduler.rewind.skipped and late.lr_scheduler.rewind.weights is None
    assert never.lr_scheduler.rewind is None
    assert logged_lrs(late) == logged_lrs(never) and gammas(late) == gammas(never)
    assert all(torch.equal(a, b) for a, b in zip(late.model.parameters(), never.model.parameters()))
    # and a max share that admits step k rewinds there, as the unlimited one
    on_time, _ = train(tmp_path / "on_time", mlrs_scale_rewind_max_share=k / 24)
    assert on_time.lr_scheduler.rewind.step == k


def test_by_default_it_rewinds_only_where_a_learned_scale_holds(tmp_path):
    data = least_squares_data()

    def rewind_of(**overrides):
        args = rewind_args(tmp_path, **{"mlrs_scale_rewind": None, **overrides})
        trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data)
        trainer.create_optimizer_and_scheduler(num_training_steps=24)
        return trainer.lr_scheduler.rewind

    default = rewind_of()
    assert default is not None and not default.required and default.latest_step == 24
    assert rewind_of(mlrs_scale_rewind_max_share=0.2).latest_step == 4  # floor(0.2 x 24)
    assert rewind_of(mlrs_scale_hold=False) is None  # a scale that tracks never settles for good
    assert rewind_of(mlrs_scale_rewind=False) is None
    args = tiny_args(tmp_path, max_steps=24, learning_rate=0.1)  # a fixed gamma: nothing to rewind with
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=24)
    assert trainer.lr_scheduler.rewind is None


def test_a_checkpoint_without_the_rewind_resumes_without_it_unless_it_was_asked_for(tmp_path):
    settings = dict(save_strategy="steps", save_steps=4)
    without, _ = train(tmp_path, mlrs_scale_rewind=False, **settings)
    checkpoint = str(tmp_path / "checkpoint-4")
    resumed, _ = train(tmp_path, resume=checkpoint, mlrs_scale_rewind=None, **settings)  # the default: goes on
    assert resumed.lr_scheduler.rewind.skipped and resumed.lr_scheduler.rewind.step is None
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), without.model.parameters()))
    with pytest.raises(ValueError, match="written without mlrs_scale_rewind"):
        train(tmp_path, resume=checkpoint, **settings)  # asked for explicitly: its start is not in the checkpoint


@pytest.mark.parametrize("growth, confident", [(0.1, True), (1.0, False)])
def test_a_frozen_schedule_rewinds_and_holds_only_after_a_confident_growth(tmp_path, growth, confident):
    """A frozen schedule's default (mlrs_scale_hold unset): growth x1.105 per update says "larger" 5 times in a row
    before the noise-free signal turns, so the stop is trusted: the run rewinds and gamma holds. Growth x e per
    update reaches the turn within 4 updates, before the linear growth could engage: that stop is not trusted, the
    starting weights are dropped without a rewind, and gamma goes on tracking the signal."""
    data = least_squares_data()
    args = rewind_args(tmp_path, mlrs_scale_rewind=None, mlrs_scale_growth=growth, mlrs_scale_min_growth=3,
                       mlrs_meta_interval=1)
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=data, meta_dataset=data,
                          schedule=constant_stages(8.0))
    probe, growing = StateProbe(trainer), NetAndScaleProbe(trainer)
    trainer.add_callback(probe)
    trainer.add_callback(growing)
    trainer.train()
    scale, rewind, values = trainer.lr_scheduler.scale, trainer.lr_scheduler.rewind, gammas(trainer)
    assert scale.settled and scale.confident_hold and scale.confident == confident and scale.holds == confident
    stop = growing.growing.index(False)  # 0-based step whose meta-update ended the growth
    assert stop <= 12
    if confident:
        k = rewind.step
        assert k is not None and values[k - 1] == values[-1]  # held from the step that stopped it
        assert all(torch.equal(a, b) for a, b in zip(probe.after[k][0], probe.start))
    else:
        assert rewind.skipped and rewind.step is None and rewind.weights is None
        tracked = values[stop + 1:-4]  # to the cooldown (the last 20% of the 24 steps, no meta-update)
        assert len(tracked) > 5 and len(set(tracked)) == len(tracked)  # tracking: a meta-update every step moves it


def test_the_kept_copy_is_dropped_once_the_latest_rewind_step_has_passed(tmp_path):
    """A growth still going past the last step that may rewind (mlrs_scale_rewind_max_share) will not rewind: the
    kept starting state is dropped then, not when the growth stops (it is a whole model in CPU memory and in every
    checkpoint)."""
    data = least_squares_data()
    trainer = MLRSTrainer(model=LeastSquares(), args=rewind_args(tmp_path, mlrs_scale_rewind_max_share=3 / 24),
                          train_dataset=data, meta_dataset=data)
    kept = []

    class Kept(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rewind = trainer.lr_scheduler.rewind
            kept.append((rewind.weights is not None, trainer.lr_scheduler.scale.growing))

    trainer.add_callback(Kept())
    trainer.train()
    assert kept[:3] == [(True, True)] * 3  # steps 1-3 may still rewind (3 = floor(3 / 24 x 24) is the last)
    assert kept[3] == (False, True)  # at step 4 the growth is still going: it can no longer rewind, the copy goes
    assert trainer.lr_scheduler.rewind.skipped and trainer.lr_scheduler.rewind.step is None


@pytest.mark.parametrize("growth, checkpoint", [(0.1, 4), (0.1, 16), (1.0, 4), (1.0, 16)])
def test_a_frozen_schedule_resumes_bitwise_before_and_after_its_confident_or_noisy_stop(tmp_path, growth, checkpoint):
    """A frozen schedule's default (confident hold): resumed from a checkpoint before the stop or after it, the run
    ends as the uninterrupted one, bit for bit, whether it rewound and held (a confident growth) or tracks (a stop
    before the signal could agree 5 times in a row): the confident flag and the rewind ride in the checkpoint."""
    settings = dict(save_strategy="steps", save_steps=4, mlrs_scale_rewind=None, mlrs_scale_growth=growth,
                    mlrs_scale_min_growth=3, mlrs_meta_interval=1)
    full, _ = train(tmp_path / "full", schedule=constant_stages(8.0), **settings)
    scale, rewind = full.lr_scheduler.scale, full.lr_scheduler.rewind
    assert scale.confident == (growth == 0.1) and (rewind.step is not None) == scale.confident
    assert rewind.step is None or 4 < rewind.step < 16  # checkpoint 4 is before the stop, 16 after (the noisy: step 6)
    resumed, _ = train(tmp_path / "full", resume=str(tmp_path / "full" / f"checkpoint-{checkpoint}"),
                       schedule=constant_stages(8.0), **settings)
    assert resumed.lr_scheduler.scale.state_dict() == scale.state_dict()
    assert resumed.lr_scheduler.rewind.step == rewind.step and resumed.lr_scheduler.rewind.skipped == rewind.skipped
    assert logged_lrs(resumed)[-8:] == logged_lrs(full)[-8:] and gammas(resumed)[-8:] == gammas(full)[-8:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), full.model.parameters()))
