"""The next training batch as the meta batch (`mlrs_meta_source="next_batch"`, and MLRSCallback(gamma="learned")
without a meta_dataset): the hypergradient <g_{t+1}, w_{t+1} - w_t> of the step's own training gradient, no held-out
data, no extra forward or backward; exact against finite differences, exact resume, the same in both entry points."""

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_mlrs import MLRSCallback, MLRSTrainer, MLRSTrainingArguments
from tests.test_scale import LeastSquares, gammas, near_solution_data
from tests.test_trainer import logged_lrs
from tests.testing_utils import constant_stages


class Recorder(TrainerCallback):
    """Weights after every optimizer step (W[k] after k steps) and each scale update's (step, hypergradient)."""

    def __init__(self):
        self.weights, self.updates = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append([p.detach().clone() for p in model.parameters()])

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        scale = lr_scheduler.scale  # runs before MLRSTrainer's own hook, which reads the gradient
        if not hasattr(scale, "recorded"):
            update, scale.recorded = scale.update, True

            def spied(dot):
                self.updates.append((self.current_step, dot))
                return update(dot)

            scale.update = spied
        self.current_step = state.global_step  # W[current_step] is where this step's gradient was taken

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append([p.detach().clone() for p in model.parameters()])


def plain_args(output_dir, **overrides):
    values = dict(max_steps=40, per_device_train_batch_size=64, learning_rate=1e-3, optim="sgd", max_grad_norm=0.0,
                  logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return {**values, **overrides}


def trainer_run(output_dir, resume=None, callbacks=(), **overrides):
    args = MLRSTrainingArguments(str(output_dir), mlrs_gamma="learned",
                                 **plain_args(output_dir, **{"mlrs_meta_source": "next_batch", **overrides}))
    trainer = MLRSTrainer(model=LeastSquares(), args=args, train_dataset=near_solution_data(),
                          schedule=constant_stages(8.0), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def callback_run(output_dir, resume=None, callbacks=(), **overrides):
    callback = MLRSCallback(constant_stages(8.0), gamma="learned")  # no meta_dataset: the next training batch
    args = TrainingArguments(str(output_dir), **plain_args(output_dir, **overrides))
    trainer = Trainer(model=LeastSquares(), args=args, train_dataset=near_solution_data(),
                      callbacks=[callback, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_next_batch_hypergradient_is_the_directional_derivative_of_the_next_steps_loss(tmp_path, max_grad_norm):
    """Each scale update at step s uses <g(W[s]), W[s] - W[s-1]>: checked against float64 central differences of the
    next batch's loss (full batch here: the whole training set) along the step just taken, L(W[s-1] + c delta) at
    c = 1. Reading the gradient one step early or late, or the wrong delta, fails by orders of magnitude; with
    clipping on, so does taking the clipped gradient (the derivative is of the loss, whatever the optimizer does
    with the gradient next)."""
    recorder = Recorder()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model and its batches in float64: rounding does not blur the check
    try:
        trainer = trainer_run(tmp_path, callbacks=[recorder], mlrs_scale_rewind=False, max_grad_norm=max_grad_norm)
    finally:
        torch.set_default_dtype(default)
    if max_grad_norm:  # the check means something only where the Trainer really clipped g(W[s])
        norms = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
        assert sum(norms[step + 1] > 2 * max_grad_norm for step, _ in recorder.updates) >= 5
    assert next(trainer.model.parameters()).dtype == torch.float64
    data = trainer.train_dataset  # made in float64 too
    x, y = torch.tensor(data["x"], dtype=torch.float64), torch.tensor(data["labels"], dtype=torch.float64)
    reference = copy.deepcopy(trainer.model).double()

    def loss_at(weights):
        with torch.no_grad():
            for p, w in zip(reference.parameters(), weights):
                p.copy_(w)
            return float(reference(x, y)["loss"])

    assert len(recorder.updates) >= 10  # the growth: one update per step, each read one step later
    eps = 1e-5
    for step, dot in recorder.updates:
        before, after = recorder.weights[step - 1], recorder.weights[step]
        delta = [(a.double() - b.double()) for a, b in zip(after, before)]
        plus = loss_at([b.double() + (1 + eps) * d for b, d in zip(before, delta)])
        minus = loss_at([b.double() + (1 - eps) * d for b, d in zip(before, delta)])
        finite_difference = (plus - minus) / (2 * eps)
        assert abs(dot - finite_difference) <= 1e-5 * abs(finite_difference), step


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_next_batch_is_the_same_run_in_mlrs_trainer_and_mlrs_callback(tmp_path, max_grad_norm):
    """The same defaults (relative start, growth, hold, rewind, cooldown), no held-out split in either: the same lrs,
    scales and weights, with the Trainer's clipping too. Neither draws a meta batch."""
    trainer = trainer_run(tmp_path / "trainer", max_steps=80, max_grad_norm=max_grad_norm)
    plain, callback = callback_run(tmp_path / "callback", max_steps=80, max_grad_norm=max_grad_norm)
    scale = callback.scheduler.scale
    assert scale.holds and scale.num_updates >= 10 and not hasattr(callback.meta_step, "meta_sampler")
    assert len(trainer.train_dataset) == 64  # nothing held out
    assert gammas(plain) == gammas(trainer) and len(set(gammas(plain))) > 5
    assert logged_lrs(plain) == logged_lrs(trainer)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), trainer.model.parameters()))
    hypergradients = [[h["mlrs/hypergrad"] for h in run.state.log_history if "mlrs/hypergrad" in h]
                      for run in (plain, trainer)]  # the same signs may give the same run: the values must agree too
    assert hypergradients[0] == hypergradients[1] and len(hypergradients[0]) >= 10


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_resumed_with_a_pending_next_batch_update_is_bitwise_exact(tmp_path, entry):
    """A checkpoint saved during the growth holds a meta-update that waits for the next step's gradient: its step
    (delta) is saved with it, and the resumed run ends bitwise as the uninterrupted one."""
    run = trainer_run if entry == "trainer" else (lambda *a, **k: callback_run(*a, **k)[0])
    full = run(tmp_path / "run", save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-6"
    resumed = run(tmp_path / "run", save_strategy="steps", save_steps=3, resume=str(checkpoint))
    assert gammas(resumed)[-34:] == gammas(full)[-34:] and len(set(gammas(full)[6:])) > 3  # still growing at 6
    assert logged_lrs(resumed)[-34:] == logged_lrs(full)[-34:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), full.model.parameters()))
    if entry == "callback":
        torch.save([torch.zeros(3)], checkpoint / "hf_mlrs_pending_delta.pt")  # another model's step
        with pytest.raises(ValueError, match="another model"):
            run(tmp_path / "run", save_strategy="steps", save_steps=3, resume=str(checkpoint))
        (checkpoint / "hf_mlrs_pending_delta.pt").unlink()
        with pytest.raises(FileNotFoundError, match="pending_delta"):
            run(tmp_path / "run", save_strategy="steps", save_steps=3, resume=str(checkpoint))


def test_next_batch_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="mlrs_meta_source"):
        MLRSTrainingArguments(str(tmp_path), mlrs_meta_source="next_batch")  # a fixed gamma: nothing to learn
    with pytest.raises(ValueError, match="mlrs_meta_source"):
        MLRSTrainingArguments(str(tmp_path), mlrs_gamma="learned", mlrs_meta_source="train")
    args = MLRSTrainingArguments(str(tmp_path), mlrs_gamma="learned", mlrs_meta_source="next_batch", use_cpu=True,
                                 report_to="none")
    with pytest.raises(ValueError, match="frozen schedule"):  # meta-training a net needs held-out data
        MLRSTrainer(model=LeastSquares(), args=args, train_dataset=near_solution_data())
    with pytest.raises(ValueError, match="meta_dataset"):
        MLRSTrainer(model=LeastSquares(), args=args, train_dataset=near_solution_data(),
                    meta_dataset=near_solution_data(), schedule=constant_stages(8.0))


def test_the_meta_source_defaults_to_the_next_batch_only_where_it_applies(tmp_path):
    """Unset, mlrs_meta_source is the next batch with a frozen schedule and a learned gamma (the same run as asking
    for it, nothing held out), and held-out batches wherever the next batch cannot serve or data was given for them."""
    def trainer(meta_source=None, schedule=True, meta_dataset=None, **overrides):
        values = {**plain_args(tmp_path, max_steps=12), "mlrs_gamma": "learned", **overrides}
        args = MLRSTrainingArguments(str(tmp_path), mlrs_meta_source=meta_source, **values)
        return MLRSTrainer(model=LeastSquares(), args=args, train_dataset=near_solution_data(),
                           schedule=constant_stages(8.0) if schedule else None, meta_dataset=meta_dataset)

    default, asked = trainer(), trainer("next_batch")
    assert default.meta_source == "next_batch" and len(default.train_dataset) == 64  # nothing held out
    default.train()
    asked.train()
    assert gammas(default) == gammas(asked) and len(set(gammas(default))) > 3
    assert all(torch.equal(a, b) for a, b in zip(default.model.parameters(), asked.model.parameters()))
    small = dict(mlrs_meta_batch_size=4)  # a meta batch the 10% held out of 64 examples can fill
    held_out = trainer("held_out", **small)
    assert held_out.meta_source == "held_out" and len(held_out.train_dataset) < 64
    assert trainer(meta_dataset=near_solution_data()).meta_source == "held_out"  # data given for held-out batches
    assert trainer(schedule=False, **small).meta_source == "held_out"  # the net is meta-trained
    assert trainer(mlrs_horizon=2, **small).meta_source == "held_out"
    assert trainer(mlrs_gamma=1e-3).meta_source is None  # nothing is learned
    with pytest.raises(ValueError, match="mlrs_meta_batch_size would have no effect"):
        trainer(**small)  # a held-out setting under the default: a choice to make, not to ignore
    with pytest.raises(ValueError, match="mlrs_meta_eval_mode would have no effect"):
        MLRSTrainingArguments(str(tmp_path), mlrs_gamma="learned", mlrs_meta_source="next_batch",
                              mlrs_meta_eval_mode=True)


def test_under_fsdp2_the_default_meta_source_is_held_out(tmp_path):
    """The next batch is not built for FSDP2's shards: unset, the source falls back to held-out batches there (the
    rule itself; a real FSDP2 Trainer needs GPUs)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    args = MLRSTrainingArguments(str(tmp_path), mlrs_gamma="learned", use_cpu=True, report_to="none")
    for mode, expected in ((DistributedType.FSDP, "held_out"), (DistributedType.MULTI_GPU, "next_batch"),
                           (DistributedType.NO, "next_batch")):
        trainer = SimpleNamespace(args=args, meta_training=False, accelerator=SimpleNamespace(distributed_type=mode))
        assert MLRSTrainer._resolve_meta_source(trainer, None) == expected, mode


def test_a_meta_fraction_is_refused_with_the_next_batch_unless_nothing_is_held_out(tmp_path):
    def trainer(**overrides):
        args = MLRSTrainingArguments(str(tmp_path), mlrs_gamma="learned", **plain_args(tmp_path), **overrides)
        return MLRSTrainer(model=LeastSquares(), args=args, train_dataset=near_solution_data(),
                           schedule=constant_stages(8.0))

    assert trainer(mlrs_meta_fraction=0.0).meta_source == "next_batch"  # nothing held out: what it does anyway
    for setting in (dict(mlrs_meta_fraction=0.2), dict(mlrs_release_meta_share=False)):
        with pytest.raises(ValueError, match=f"{next(iter(setting))} would have no effect"):
            trainer(**setting)


@pytest.mark.filterwarnings("ignore:MLRSTrainer. resuming from")  # the edited scheduler.pt differs from its record
@pytest.mark.parametrize("written_before_the_source_was_recorded", [False, True])
def test_a_checkpoint_of_held_out_batches_is_not_resumed_with_the_next_batch(tmp_path,
                                                                              written_before_the_source_was_recorded):
    """A run started with held-out batches (the default with a frozen schedule until session 27) and resumed with
    the next batch would train on other data in another order: refused, naming the setting that resumes it."""
    def run(meta_source, resume=None):
        overrides = dict(mlrs_meta_batch_size=4) if meta_source == "held_out" else {}
        return trainer_run(tmp_path / "run", resume=resume, max_steps=12, save_strategy="steps", save_steps=6,
                           mlrs_meta_source=meta_source, **overrides)

    run("held_out")
    checkpoint = tmp_path / "run" / "checkpoint-6"
    if written_before_the_source_was_recorded:  # as hf_mlrs wrote it before: no "meta_source" in the learner's state
        state = torch.load(checkpoint / "scheduler.pt", weights_only=False)
        del state["meta_learner"]["meta_source"]
        torch.save(state, checkpoint / "scheduler.pt")
    with pytest.raises(ValueError, match="learned from held-out meta batches.*mlrs_meta_source='held_out'"):
        run(None, resume=str(checkpoint))
    resumed = run("held_out", resume=str(checkpoint))  # as it started: goes on
    assert resumed.state.global_step == 12
