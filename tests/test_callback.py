"""MLRSCallback in unmodified Trainers: the lr it sets is the lr applied and logged, and equals MLRSTrainer's."""

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_mlrs import MLRSCallback, MLRSNet, MLRSTrainer
from tests.test_trainer import AppliedLrProbe, logged_lrs
from tests.testing_utils import constant_stages, raise_at, tiny_args, tiny_bert


def plain_args(output_dir, **overrides):
    values = dict(per_device_train_batch_size=16, max_steps=12, learning_rate=0.5, logging_steps=1, report_to="none",
                  use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, optim="sgd")
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


class SmoothedLossTrainer(Trainer):
    """A Trainer subclass with its own compute_loss, which the model's output never carries."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = nn.functional.cross_entropy(outputs.logits, labels, label_smoothing=0.1)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("trainer_cls", [Trainer, SmoothedLossTrainer])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_callback_lr_is_applied_and_logged(tmp_path, dataset, trainer_cls, accumulation):
    probe = AppliedLrProbe()
    schedule = MLRSNet.from_pretrained(_schedule(tmp_path))
    args = plain_args(tmp_path / "run", gradient_accumulation_steps=accumulation)
    callbacks = [probe, MLRSCallback(schedule)]
    trainer = trainer_cls(model=tiny_bert(), args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    lrs = logged_lrs(trainer)
    assert len(lrs) == len(probe.applied) == 12
    torch.testing.assert_close(torch.tensor(probe.applied), torch.tensor(lrs), rtol=2e-3, atol=0)
    assert max(lrs) < 0.5 and min(lrs) > 0  # the schedule's lr, not the linear default decaying from 0.5
    assert "training_step" not in vars(trainer)  # the loss tap is removed after training


def _schedule(tmp_path):
    folder = tmp_path / "schedule"
    if not folder.exists():
        torch.manual_seed(3)
        net = MLRSNet()
        with torch.no_grad():  # make the output depend clearly on the loss
            net.stages[0].head.weight.normal_(0, 2.0)
        net.save_pretrained(folder, write_card=False)
    return folder


@pytest.mark.parametrize("accumulation", [1, 2])
def test_callback_equals_mlrs_trainer_in_transfer_mode(tmp_path, dataset, accumulation):
    schedule = MLRSNet.from_pretrained(_schedule(tmp_path))
    args = dict(max_steps=10, learning_rate=1e-3, gradient_accumulation_steps=accumulation, optim="adamw_torch")
    with_callback = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "a", **args), train_dataset=dataset,
                            callbacks=[MLRSCallback(schedule)])
    with_callback.train()
    ours = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "b", **args), train_dataset=dataset,
                       schedule=schedule)
    ours.train()
    assert logged_lrs(with_callback) == logged_lrs(ours)
    assert len(set(logged_lrs(ours))) > 5


def test_callback_cooldown_anneals_the_last_share_linearly_as_mlrs_trainer_does(tmp_path, dataset):
    """cooldown_fraction=0.25 of 12 steps: the last 3 lrs are 3/4, 2/4, 1/4 of the schedule's (a constant net here,
    so the schedule's lr is known), the lr applied is the lr logged, and MLRSTrainer's mlrs_cooldown_fraction gives
    the same lrs (a loss-reading net there, so both paths take the same lr from the same losses)."""
    probe = AppliedLrProbe()
    args = plain_args(tmp_path / "a", learning_rate=0.4)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset,
                      callbacks=[probe, MLRSCallback(constant_stages(0.0), cooldown_fraction=0.25)])
    trainer.train()
    lrs = logged_lrs(trainer)
    torch.testing.assert_close(torch.tensor(probe.applied), torch.tensor(lrs), rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([0.2] * 9 + [0.15, 0.1, 0.05]), rtol=1e-5, atol=0)
    schedule = MLRSNet.from_pretrained(_schedule(tmp_path))
    common = dict(max_steps=12, learning_rate=1e-3, optim="adamw_torch")
    with_callback = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "b", **common), train_dataset=dataset,
                            callbacks=[MLRSCallback(schedule, cooldown_fraction=0.25)])
    with_callback.train()
    ours = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "c", mlrs_cooldown_fraction=0.25, **common),
                       train_dataset=dataset, schedule=schedule)
    ours.train()
    assert logged_lrs(with_callback) == logged_lrs(ours)
    with pytest.raises(ValueError, match="cooldown_fraction=1.0 is outside"):
        MLRSCallback(schedule, cooldown_fraction=1.0)


def test_a_schedule_that_records_its_start_output_starts_at_learning_rate(tmp_path, dataset):
    """start_output=0.5 on a net that outputs sigmoid(0) = 0.5 whatever the loss: MLRSCallback and a frozen
    MLRSTrainer both apply exactly learning_rate (gamma = learning_rate / 0.5), as a built-in constant schedule would;
    the same net without it applies half; an explicit gamma is the paper's gamma, untouched."""
    net = constant_stages(0.0)
    common = dict(max_steps=6, learning_rate=0.4)

    def lrs_with(schedule, folder, **callback):
        trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path / folder, **common), train_dataset=dataset,
                          callbacks=[MLRSCallback(schedule, **callback)])
        trainer.train()
        return logged_lrs(trainer)

    assert lrs_with(net, "plain") == pytest.approx([0.2] * 6, rel=1e-6)
    net.start_output = 0.5
    net.save_pretrained(tmp_path / "recorded", write_card=False)
    recorded = MLRSNet.from_pretrained(tmp_path / "recorded")
    assert recorded.start_output == 0.5
    assert lrs_with(recorded, "recorded") == pytest.approx([0.4] * 6, rel=1e-6)
    assert lrs_with(recorded, "explicit", gamma=0.4) == pytest.approx([0.2] * 6, rel=1e-6)
    ours = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "trainer", **common), train_dataset=dataset,
                       schedule=recorded)
    ours.train()
    assert logged_lrs(ours) == pytest.approx([0.4] * 6, rel=1e-6)


def test_a_schedule_that_records_a_cooldown_is_applied_with_it_unless_told_otherwise(tmp_path, dataset):
    """MLRSNet.cooldown_fraction (saved in its config) is the default of MLRSCallback and of a frozen MLRSTrainer:
    both give the lrs of an explicit cooldown_fraction=0.25, and an explicit 0 turns it off."""
    recorded = MLRSNet.from_pretrained(_schedule(tmp_path))
    recorded.cooldown_fraction = 0.25
    recorded.save_pretrained(tmp_path / "recorded", write_card=False)
    recorded = MLRSNet.from_pretrained(tmp_path / "recorded")
    plain = MLRSNet.from_pretrained(_schedule(tmp_path))
    common = dict(max_steps=12, learning_rate=1e-3, optim="adamw_torch")

    def lrs_with(callback, folder):
        trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path / folder, **common), train_dataset=dataset,
                          callbacks=[callback])
        trainer.train()
        return logged_lrs(trainer)

    explicit = lrs_with(MLRSCallback(plain, cooldown_fraction=0.25), "explicit")
    assert lrs_with(MLRSCallback(recorded), "recorded") == explicit
    assert lrs_with(MLRSCallback(recorded, cooldown_fraction=0.0), "off") == lrs_with(MLRSCallback(plain), "none")
    assert explicit != lrs_with(MLRSCallback(plain), "none2")
    ours = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "trainer", **common), train_dataset=dataset,
                       schedule=recorded)
    ours.train()
    assert logged_lrs(ours) == explicit


@pytest.mark.parametrize("stage_by", ["progress", "loss"])
def test_stages_switch_by_progress_or_loss(tmp_path, dataset, stage_by):
    schedule = constant_stages(2.0, 0.0, -2.0)
    schedule.stage_switch_losses[1:] = torch.tensor([1.5, 0.0])  # loss mode: stage 1 at once, stage 2 never
    args = plain_args(tmp_path, max_steps=12, learning_rate=1e-3, optim="adamw_torch")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset,
                      callbacks=[MLRSCallback(schedule, stage_by=stage_by)])
    trainer.train()
    levels = [round(lr / 1e-3, 2) for lr in logged_lrs(trainer)]
    if stage_by == "progress":  # 12 steps, stages start at 0, 1/3, 2/3 of training
        assert levels == [0.88] * 4 + [0.5] * 4 + [0.12] * 4
    else:
        assert levels == [0.5] * 12


def test_callback_refuses_mlrs_trainer(tmp_path, dataset):
    trainer = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, max_steps=2), train_dataset=dataset,
                          schedule=MLRSNet(), callbacks=[MLRSCallback(MLRSNet())])
    with pytest.raises(ValueError, match="use MLRSTrainer\\(schedule=...\\)"):
        trainer.train()


def test_callback_needs_a_schedule():
    with pytest.raises(TypeError, match="needs an MLRSNet"):
        MLRSCallback("text-bbc")


def test_a_train_that_raised_leaves_no_stale_tap(tmp_path, dataset):
    """After a failed train(), the next one reads each loss once (a stale tap would count it twice)."""
    callback = MLRSCallback(MLRSNet.from_pretrained(_schedule(tmp_path)))
    failing = raise_at(3)
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "run", max_steps=6, optim="adamw_torch",
                                                         learning_rate=1e-3),
                      train_dataset=dataset, callbacks=[callback, failing])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    trainer.remove_callback(failing)
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert callback.scheduler.recent_losses[-1] == pytest.approx(logged[-1], rel=1e-5)
    assert "training_step" not in vars(trainer)
