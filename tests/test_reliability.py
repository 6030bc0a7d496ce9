"""Reliability: exact resume after SIGKILL, non-finite values, bad configuration (issue: exact resume, faults)."""

import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_mlrs import MLRSCallback, MLRSNet, MLRSTrainer
from tests.testing_utils import tiny_args, tiny_bert, tiny_dataset


ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, KILL_AT = 12, 4, 6


def build(mode: str, output_dir: str):
    """The run under test; `mode` is meta, meta_ga2 (gradient accumulation 2), learned (a learned gamma: the training
    order is drawn by the held-out share's sampler) or transfer (Trainer + callback)."""
    torch.set_num_threads(1)
    common = dict(max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1,
                  gradient_accumulation_steps=2 if mode == "meta_ga2" else 1, per_device_train_batch_size=8)
    model, data = tiny_bert(dropout=0.1), tiny_dataset(n=120)  # dropout: the RNG state must be restored too
    if mode == "transfer":
        torch.manual_seed(5)
        schedule = MLRSNet(stage_starts=[0.0, 0.5])
        args = TrainingArguments(output_dir, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                                 learning_rate=1e-3, **common)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[MLRSCallback(schedule)])
    learned = dict(mlrs_gamma="learned") if mode == "learned" else {}  # the held-out share's own sampler too
    args = tiny_args(output_dir, mlrs_meta_interval=2, mlrs_meta_lr=1e-2, **common, **learned)
    return MLRSTrainer(model=model, args=args, train_dataset=data)


def outcome(trainer):
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    schedule = getattr(trainer, "schedule", None) or next(
        cb.schedule for cb in trainer.callback_handler.callbacks if isinstance(cb, MLRSCallback))
    return lrs, [p.detach().clone() for p in schedule.parameters()], [p.detach().clone() for p in
                                                                       trainer.model.parameters()]


@pytest.mark.parametrize("mode", ["meta", "meta_ga2", "transfer"])
def test_sigkill_then_resume_is_exact(tmp_path, mode):
    full = build(mode, str(tmp_path / "full"))
    full.train()
    expected = outcome(full)

    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "resume_worker.py"), mode, str(run_dir),
                             str(KILL_AT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4"]

    resumed = build(mode, str(run_dir))
    resumed.train(resume_from_checkpoint=True)
    lrs, net, model = outcome(resumed)
    assert lrs == expected[0] and len(lrs) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(net, expected[1]))
    assert all(torch.equal(a, b) for a, b in zip(model, expected[2]))
    assert len(set(lrs)) > 3  # the lr moved, so equal sequences say something


class NaNLossAt(MLRSTrainer):
    """Reports a NaN training loss at some steps; the gradients stay finite (the NaN is a detached constant)."""

    bad_steps = {3, 4}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step in self.bad_steps:  # the meta loss of that step too
            loss = loss + torch.tensor(float("nan"))
        return loss


def test_nonfinite_training_loss_keeps_lr_and_net(tmp_path, dataset):
    trainer = NaNLossAt(model=tiny_bert(), train_dataset=dataset, args=tiny_args(
        tmp_path, max_steps=8, mlrs_meta_interval=1, mlrs_min_lr=1e-4, mlrs_max_lr=2e-3))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.train()
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert len(lrs) == 8 and all(math.isfinite(lr) and 1e-4 <= lr <= 2e-3 for lr in lrs)
    assert lrs[3] == lrs[2] and lrs[4] == lrs[2]  # the lr of a bad step is the last good one
    assert trainer.lr_scheduler.nonfinite_skips == 2
    assert trainer.state.log_history[-2]["mlrs/nonfinite_skips"] == 2


def test_nonfinite_meta_loss_skips_the_meta_update(tmp_path, dataset):
    poisoned = tiny_dataset(n=32).map(lambda row: {"label": -100})  # every label ignored: the mean loss is 0/0
    trainer = MLRSTrainer(model=tiny_bert(), train_dataset=dataset, meta_dataset=poisoned,
                          args=tiny_args(tmp_path, max_steps=6, mlrs_meta_interval=2, mlrs_meta_lr=1e-2))
    before = {k: v.clone() for k, v in trainer.schedule.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("non-finite meta loss" in str(w.message) for w in caught)
    learner = trainer.lr_scheduler.meta_learner
    assert learner.num_skipped == 3 and learner.num_updates == 0
    for key, value in trainer.schedule.named_parameters():  # every stage's weights (snapshots included)
        assert torch.equal(value, before[key]), key
    assert trainer.state.global_step == 6  # training went on


def test_nonfinite_can_stop_training(tmp_path, dataset):
    trainer = NaNLossAt(model=tiny_bert(), train_dataset=dataset,
                        args=tiny_args(tmp_path, max_steps=8, mlrs_on_nonfinite="stop"))
    with pytest.warns(RuntimeWarning):
        trainer.train()
    assert trainer.state.global_step == 4  # stopped after the first bad step (step index 3)


def test_meta_training_refused_under_fsdp(tmp_path, dataset, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="cannot meta-train under FSDP.*DDP"):
        MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path), train_dataset=dataset)
    MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path), train_dataset=dataset, schedule=MLRSNet())  # transfer


def test_independent_processes_are_refused(tmp_path, dataset, monkeypatch):
    trainer = MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path, max_steps=1), train_dataset=dataset)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as if launched twice while this Trainer runs as one process
    with pytest.raises(RuntimeError, match="would train independently"):
        trainer.train()
