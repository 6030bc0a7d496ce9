"""MLRSTrainer end to end on a tiny BERT: learning, the lr really applied, loss scaling, checkpoints, refusals."""

import math
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_mlrs import MLRSNet, MLRSScheduler, MLRSTrainer, MLRSTrainingArguments
from hf_mlrs.integration import model_scales_loss_itself
from tests.testing_utils import tiny_args, tiny_bert, tiny_dataset


class AppliedLrProbe(TrainerCallback):
    """Measures the lr each SGD step really applied from the weights: lr = -<w_new - w_old, g> / <g, g>.

    Registered before MLRSTrainer's own hooks, so it sees the final (clipped) gradient before anything else runs.
    """

    def __init__(self):
        self.applied = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = [(p.detach().clone(), p.grad.detach().clone()) for p in model.parameters() if p.grad is not None]
        self.params = [p for p in model.parameters() if p.grad is not None]

    def on_step_end(self, args, state, control, **kwargs):
        num = sum(((p.detach() - w) * g).sum() for p, (w, g) in zip(self.params, self.before))
        den = sum((g * g).sum() for _, g in self.before)
        self.applied.append(-(num / den).item())


def logged_lrs(trainer):
    return [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]


def test_meta_training_learns_a_schedule(tmp_path, dataset):
    """Seeded: the meta loss falls and the learned lr moves away from where the net started."""
    trainer = MLRSTrainer(
        model=tiny_bert(),
        args=tiny_args(tmp_path, max_steps=60, mlrs_meta_interval=2, mlrs_meta_lr=1e-2, learning_rate=3e-3,
                       mlrs_num_stages=3),
        train_dataset=dataset,
    )
    initial = [p.detach().clone() for p in trainer.schedule.stages[-1].parameters()]
    trainer.train()
    meta = [e["mlrs/meta_loss"] for e in trainer.state.log_history if "mlrs/meta_loss" in e]
    lrs = logged_lrs(trainer)
    assert len(meta) == 30
    assert sum(meta[-5:]) / 5 < 0.8 * sum(meta[:5]) / 5
    start = 3e-3 * torch.sigmoid(torch.tensor(1.0)).item()  # gamma * sigmoid(output bias)
    assert abs(lrs[0] - start) < 0.05 * start
    assert abs(lrs[-1] - start) > 0.1 * start
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.schedule.stages[-1].parameters()))
    # Stage 0 is the snapshot taken right after the first meta-update, unlike the final (live) net.
    assert not torch.equal(trainer.schedule.stages[0].head.bias, trainer.schedule.stages[-1].head.bias)
    assert not math.isnan(trainer.schedule.stage_switch_losses[1].item())
    assert isinstance(trainer.schedule, MLRSNet) and isinstance(trainer.lr_scheduler, MLRSScheduler)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("meta_training", [True, False])
def test_logged_lr_is_the_lr_applied(tmp_path, dataset, accumulation, meta_training):
    probe = AppliedLrProbe()
    schedule = None if meta_training else MLRSNet.from_pretrained(_learned_schedule(tmp_path / "learned", dataset))
    trainer = MLRSTrainer(
        model=tiny_bert(),
        args=tiny_args(tmp_path / "run", max_steps=12, optim="sgd", learning_rate=0.5, mlrs_meta_lr=5e-2,
                       gradient_accumulation_steps=accumulation, mlrs_meta_interval=1),
        train_dataset=dataset,
        callbacks=[probe],
        schedule=schedule,
    )
    trainer.train()
    lrs = logged_lrs(trainer)
    assert len(lrs) == len(probe.applied) == 12
    torch.testing.assert_close(torch.tensor(probe.applied), torch.tensor(lrs), rtol=2e-3, atol=0)
    assert max(lrs) - min(lrs) > 1e-3  # the lr really varied: the check compares something


def _learned_schedule(folder, dataset):
    if not (folder / "config.json").exists():
        trainer = MLRSTrainer(model=tiny_bert(), train_dataset=dataset, args=tiny_args(
            folder.parent / "meta", max_steps=20, mlrs_meta_interval=1, mlrs_meta_lr=5e-2, learning_rate=3e-3))
        trainer.train()
        trainer.schedule.save_pretrained(folder, write_card=False)
    return folder


def test_transfer_mode_keeps_the_schedule_frozen(tmp_path, dataset):
    schedule = MLRSNet.from_pretrained(_learned_schedule(tmp_path / "learned", dataset))
    before = {k: v.clone() for k, v in schedule.state_dict().items()}
    trainer = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "run", max_steps=6), train_dataset=dataset,
                          schedule=schedule)
    assert len(trainer.train_dataset) == len(dataset)  # nothing held out in transfer mode
    trainer.train()
    for key, value in trainer.schedule.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert all("mlrs/meta_loss" not in e for e in trainer.state.log_history)


def test_gradient_accumulation_loss_is_not_scaled(tmp_path, dataset):
    """BERT takes **kwargs but returns a batch mean: plain Trainer reports ~2x the loss with 2 accumulation steps."""
    args = dict(max_steps=1, gradient_accumulation_steps=2, learning_rate=1e-9)
    plain = Trainer(model=tiny_bert(), args=TrainingArguments(str(tmp_path / "plain"), report_to="none",
                    use_cpu=True, logging_steps=1, per_device_train_batch_size=16, **args), train_dataset=dataset)
    plain.train()
    ours = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path / "ours", **args), train_dataset=dataset)
    ours.train()
    chance = math.log(3)
    assert plain.state.log_history[0]["loss"] > 1.8 * chance  # the upstream trap, still there
    assert abs(ours.state.log_history[0]["loss"] - chance) < 0.1 * chance
    assert not ours.model_accepts_loss_kwargs


def test_model_scales_loss_itself():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not model_scales_loss_itself(tiny_bert())
    assert model_scales_loss_itself(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))


def test_checkpoint_holds_the_schedule_and_resume_is_exact(tmp_path, dataset):
    def run(output_dir, resume=None, max_steps=10):
        trainer = MLRSTrainer(model=tiny_bert(), train_dataset=dataset, args=tiny_args(
            output_dir, max_steps=max_steps, save_strategy="steps", save_steps=5, mlrs_meta_interval=2,
            mlrs_meta_lr=1e-2))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-5"
    assert (checkpoint / "scheduler.pt").exists()
    saved = MLRSNet.from_pretrained(checkpoint / "mlrs_schedule")
    state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert {"hidden", "cell", "schedule", "meta_learner"} <= set(state)
    assert state["meta_learner"]["num_updates"] == 2
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, state["schedule"][key], equal_nan=True)

    resumed = run(tmp_path / "full", resume=str(checkpoint))
    assert logged_lrs(resumed)[-5:] == logged_lrs(full)[-5:]
    for a, b in zip(resumed.schedule.parameters(), full.schedule.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)


def test_save_model_writes_a_loadable_schedule_with_card(tmp_path, dataset):
    trainer = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, max_steps=4, run_name="tiny-task"),
                          train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    folder = tmp_path / "final" / "mlrs_schedule"
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "lr_curve.png", "model.safetensors"]
    loaded = MLRSNet.from_pretrained(folder)
    assert loaded.provenance["task"] == "tiny-task" and loaded.provenance["steps"] == 4
    assert loaded.provenance["model_class"] == "BertForSequenceClassification"
    card = (folder / "README.md").read_text()
    assert "library_name: hf_mlrs" in card and "tiny-task" in card and "arxiv:2007.14546" in card


def test_meta_set_is_held_out_and_class_balanced(tmp_path, dataset):
    trainer = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, mlrs_meta_fraction=0.25), train_dataset=dataset)
    meta = trainer.meta_dataset
    assert len(meta) + len(trainer.train_dataset) == len(dataset)
    counts = {y: meta["label"].count(y) for y in set(meta["label"])}
    assert len(counts) == 3 and len(set(counts.values())) == 1
    train_rows = {tuple(r) for r in trainer.train_dataset["input_ids"]}
    assert not any(tuple(r) in train_rows for r in meta["input_ids"])


# ---- refusals: clear errors at construction --------------------------------------------------------------------


def test_refuses_optimizers_not_linear_in_lr(tmp_path, dataset):
    import prodigyopt
    import schedulefree

    model = tiny_bert()
    with pytest.raises(ValueError, match="Schedule-Free"):
        MLRSTrainer(model=model, args=tiny_args(tmp_path), train_dataset=dataset,
                    optimizers=(schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3), None))
    with pytest.raises(ValueError, match="Prodigy"):
        MLRSTrainer(model=model, args=tiny_args(tmp_path), train_dataset=dataset,
                    optimizer_cls_and_kwargs=(prodigyopt.Prodigy, {"lr": 1.0}))
    with pytest.raises(ValueError, match="optim.*schedule_free_adamw"):
        tiny_args(tmp_path, optim="schedule_free_adamw")
    with pytest.raises(ValueError, match="owns the learning-rate schedule"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        MLRSTrainer(model=model, args=tiny_args(tmp_path), train_dataset=dataset,
                    optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)))


def test_refuses_meta_training_without_meta_data(tmp_path, dataset):
    with pytest.raises(ValueError, match="mlrs_meta_fraction is 0 and no meta_dataset"):
        MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, mlrs_meta_fraction=0.0), train_dataset=dataset)
    with pytest.raises(ValueError, match="fewer than one meta batch"):
        MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, mlrs_meta_batch_size=64), train_dataset=dataset,
                    meta_dataset=tiny_dataset(n=10))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mlrs_meta_fraction": 1.0}, "mlrs_meta_fraction"),
        ({"mlrs_gamma": "0"}, "mlrs_gamma"),
        ({"mlrs_gamma": "-1e-3"}, "mlrs_gamma"),
        ({"mlrs_gamma": "fast"}, "mlrs_gamma"),
        ({"mlrs_min_lr": 1e-2, "mlrs_max_lr": 1e-3}, "mlrs_min_lr"),
        ({"mlrs_meta_interval": 0}, "mlrs_meta_interval"),
        ({"mlrs_input_normalization": "zscore"}, "mlrs_input_normalization"),
        ({"mlrs_stage_by": "epoch"}, "mlrs_stage_by"),
        ({"mlrs_scale_backoff": -0.5}, "mlrs_scale_backoff"),
        ({"mlrs_scale_backoff": float("nan")}, "mlrs_scale_backoff"),
        ({"mlrs_scale_stop_votes": -1}, "mlrs_scale_stop_votes"),
        ({"mlrs_scale_growth_stop": 1.0}, "mlrs_scale_growth_stop"),
        ({"mlrs_scale_stop_votes": 2.5}, "mlrs_scale_stop_votes"),
        ({"mlrs_scale_min_growth": 0}, "mlrs_scale_min_growth"),
        ({"mlrs_scale_growth_linear": -1.0}, "mlrs_scale_growth_linear"),
        ({"mlrs_scale_margin": 0.0}, "mlrs_scale_margin"),
        ({"mlrs_scale_margin": 1.2}, "mlrs_scale_margin"),
        ({"mlrs_scale_growth_linear": float("inf")}, "mlrs_scale_growth_linear"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"MLRSTrainingArguments.{field}"):
        tiny_args(tmp_path, **overrides)


def test_plain_training_arguments_are_accepted(tmp_path, dataset):
    trainer = MLRSTrainer(model=tiny_bert(), train_dataset=dataset, args=TrainingArguments(
        str(tmp_path), max_steps=2, report_to="none", use_cpu=True, learning_rate=2e-3))
    assert isinstance(trainer.args, MLRSTrainingArguments) and trainer.args.mlrs_gamma_value == 2e-3
    trainer.train()
