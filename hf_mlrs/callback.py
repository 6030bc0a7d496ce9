"""MLRSCallback: apply a learned MLR-SNet schedule, frozen, inside any `transformers.Trainer`.

Transfer as in the paper's meta-test (Shu et al., TPAMI 2022, Sec. 5): the net is frozen, reads the training loss
of each step, and sets that step's lr, alpha_t = gamma * A(x_t; h_{t-1}); its recurrent state carries on; a
schedule with stages switches nets by training progress (or, horizon-free, by the loss).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import nothing_left_to_train, save_checkpoint_safely
from .config import MLRSTrainingArguments, learned_scale, resolve_cooldown
from .hypergrad import MetaLearner
from .integration import (
    StepLossMeter,
    check_all_processes_joined,
    fix_loss_scaling,
    num_labels_of,
    tap_method,
    untap_method,
)
from .metastep import MetaStep
from .modeling import MLRSNet
from .rewind import Rewind, rewind_when_due
from .scheduler import MLRSScheduler


STATE_KEY = "hf_mlrs.MLRSCallback"  # our entry in TrainerState.stateful_callbacks (saved in trainer_state.json)
REWIND_WEIGHTS = "hf_mlrs_rewind_weights.pt"  # a checkpoint's copy of the starting weights while a rewind may come
PENDING_DELTA = "hf_mlrs_pending_delta.pt"  # a checkpoint's last step while its next-batch meta-update is pending


class MLRSCallback(TrainerCallback):
    """Drives the lr of an unmodified [`~transformers.Trainer`] (or any subclass) from a learned MLR-SNet schedule.

    The lr it sets in `on_pre_optimizer_step` (gradients final) is the lr that step uses and the lr the Trainer logs.
    It reads the loss of each step from `Trainer.training_step`, so Trainer subclasses with their own
    `compute_loss` work; the loss is averaged over processes, so every rank sets the same lr. Its state (the net's
    recurrent state, stage, gamma) is saved in every checkpoint's `trainer_state.json` and restored on resume.
    The Trainer's own `lr_scheduler_type` is overridden.

    It also makes the Trainer's checkpoints crash-safe: each save ends with a completion marker (written after every
    process has finished writing), so `hf_mlrs.last_complete_checkpoint(output_dir)` skips a save cut short by a kill;
    and a run resumed from its final checkpoint trains no extra step.

    Args:
        schedule (`MLRSNet`): the learned schedule, e.g. `MLRSNet.from_pretrained("minilm-bbc")`.
        gamma (`float`, `"learned"` or `"auto"`, *optional*): the lr scale gamma (lr = gamma * A_t, A_t in (0, 1));
            defaults to the Trainer's `learning_rate / schedule.start_output`, so `learning_rate` is the lr the
            schedule starts at (the lr a built-in schedule peaks at; `start_output` is 1 unless the schedule records
            one). `"learned"` learns it while the net stays frozen (a schedule carries a shape, not a scale for a
            new model), from `meta_dataset` if given, else from the next step's training gradient (no held-out data,
            no extra forward or backward: see `meta_dataset`): it starts relative to the model, grows
            until the hypergradient says stop, then, as MLRSTrainer with a frozen `schedule` does, holds it
            (below the stop by a margin, no meta step left) after a confident growth (from scratch: the signal said
            "larger" from the first step on), and tracks it after a stop on noise (a pretrained model near its
            start). After a held stop within the first 20% of the run it rewinds (see `rewind`). Unlike MLRSTrainer
            it cannot return a held-out `meta_dataset` to training. A meta step every step while it settles, every
            `meta_interval` steps while it tracks; with a `meta_dataset` each is one forward/backward of a meta
            batch. `"auto"` uses the paper's heuristic (SGD on classification only).
        meta_dataset (`Dataset`, *optional*): held-out data for `gamma="learned"`, never trained on: the paper's
            meta loss, one forward and backward of a meta batch per meta step. Without it (the default) the
            hypergradient of step t is <g_{t+1}, w_{t+1} - w_t> with g_{t+1} the gradient the Trainer computes for
            step t+1 anyway (MLRSTrainer's `mlrs_meta_source="next_batch"`): all the training data trains, a meta
            step costs one dot product, and its update to the scale applies from step t+1.
        meta_interval (`int`, *optional*, defaults to `4`): with `gamma="learned"`, a meta step every this many
            optimizer steps once the scale has settled.
        meta_batch_size (`int`, *optional*): defaults to the Trainer's `per_device_train_batch_size`.
        stage_by (`str`, *optional*, defaults to `"progress"`): `"progress"` switches stages by the fraction of
            `max_steps` done; `"loss"` (horizon-free) by the smoothed training loss.
        min_lr, max_lr (`float`, *optional*): bounds on the lr.
        warmup_steps (`int`, *optional*): linear warmup on top of the schedule; defaults to the Trainer's.
        cooldown_fraction (`float`, *optional*): share of training, at the end, over which the lr decays linearly
            towards 0 on top of the schedule (as `MLRSTrainingArguments.mlrs_cooldown_fraction`); no meta step in it
            with `gamma="learned"`. Defaults to 0.2 with `gamma="learned"` (as MLRSTrainer), else to the one the
            schedule records (`schedule.cooldown_fraction`, the one its transfer was measured with; 0 if none): a
            shape learned by a one-step lookahead does not anneal where a short run wants it (benchmarks/RESULTS.md,
            section 8, sessions 16-18).
        on_nonfinite (`str`, *optional*, defaults to `"skip"`): on a NaN/inf loss keep the previous lr (`"skip"`),
            and with `"stop"` also stop training.
        rewind (`bool`, *optional*, defaults to `True`): with `gamma="learned"`, as MLRSTrainer's
            `mlrs_scale_rewind`: the scale's growth is a probe; once it stops and holds within the first 20% of the
            run, the model's starting weights are put back, the optimizer's state cleared, and the run trains again
            from its start at the found scale (a model trained from scratch: a GPT-2 ended 5% lower in loss with it,
            benchmarks/RESULTS.md 3b, session 24). Until then a copy of the starting weights is kept in CPU memory
            and in each checkpoint. Not under FSDP (sharded weights).

    Example:

    ```python
    >>> trainer = Trainer(model=model, args=args, train_dataset=train,
    ...                   callbacks=[MLRSCallback(MLRSNet.from_pretrained("minilm-bbc"))])
    ```
    """

    def __init__(
        self,
        schedule: MLRSNet,
        *,
        gamma: float | str | None = None,
        stage_by: str = "progress",
        min_lr: float | None = None,
        max_lr: float | None = None,
        warmup_steps: int | None = None,
        cooldown_fraction: float | None = None,
        on_nonfinite: str = "skip",
        meta_dataset=None,
        meta_interval: int = 4,
        meta_batch_size: int | None = None,
        rewind: bool = True,
    ):
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"MLRSCallback: on_nonfinite={on_nonfinite!r} is not 'skip' or 'stop'.")
        if not isinstance(schedule, MLRSNet):
            raise TypeError(f"MLRSCallback needs an MLRSNet, got {type(schedule).__name__}; load one with "
                            "MLRSNet.from_pretrained(...).")
        if meta_interval < 1:
            raise ValueError(f"MLRSCallback: meta_interval={meta_interval} < 1.")
        cooldown_fraction = resolve_cooldown(cooldown_fraction, gamma == "learned", schedule.cooldown_fraction)
        if not 0.0 <= cooldown_fraction < 1.0:
            raise ValueError(f"MLRSCallback: cooldown_fraction={cooldown_fraction} is outside [0, 1); use e.g. 0.2 "
                             "(the last 20% of the run) or 0 (none).")
        # user-provided hyperparameters
        self.schedule = schedule.cpu().eval().requires_grad_(False)
        self.gamma = gamma
        self.stage_by = stage_by
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.warmup_steps = warmup_steps
        self.cooldown_fraction = cooldown_fraction
        self.on_nonfinite = on_nonfinite
        self.meta_dataset = meta_dataset
        self.meta_interval = meta_interval
        self.meta_batch_size = meta_batch_size
        self.rewind = rewind
        # internal state, (re)built at every train()
        self.trainer: Trainer | None = None
        self.scheduler: MLRSScheduler | None = None
        self.meta_step: MetaStep | None = None  # with gamma="learned"
        self.loss_meter = StepLossMeter()
        self.applied_lrs: list[float] = []
        self.fingerprint: str | None = None  # of the schedule, saved with the state: resume with the same one
        self.finished = False  # resumed from a checkpoint at max_steps: nothing to train

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer = _calling_trainer()
        if hasattr(trainer, "schedule") and hasattr(trainer, "meta_training"):
            raise ValueError("MLRSTrainer already drives the lr: use MLRSTrainer(schedule=...), not MLRSCallback.")
        self.trainer = trainer
        check_all_processes_joined(trainer)
        fix_loss_scaling(trainer)
        self.loss_meter = StepLossMeter()  # nothing left over from an interrupted train()
        _tap_training_step(trainer, self.loss_meter)
        tap_method(trainer, "_save_checkpoint", lambda save: _safe_save(trainer, save, self.save_tensors))
        self.finished = nothing_left_to_train(state)
        if self.finished:  # resumed from the final checkpoint: the Trainer would train one step more
            tap_method(trainer, "get_batch_samples", lambda _: _no_batches)
            control.should_training_stop = True
        gamma = self.gamma if self.gamma is not None else self.schedule.gamma_for(args.learning_rate)
        if gamma == "learned":
            # MLRSTrainer's defaults with a frozen schedule: hold after a confident growth, else track
            gamma = learned_scale(args.learning_rate, hold=True, confident_hold=True)
        self.scheduler = MLRSScheduler(
            kwargs["optimizer"],
            self.schedule,
            gamma=gamma,
            num_training_steps=state.max_steps,
            stage_by=self.stage_by,
            min_lr=self.min_lr,
            max_lr=self.max_lr,
            warmup_steps=args.get_warmup_steps(state.max_steps) if self.warmup_steps is None else self.warmup_steps,
            cooldown_steps=math.floor(self.cooldown_fraction * state.max_steps),
            num_labels=num_labels_of(trainer.accelerator.unwrap_model(trainer.model)),
        )
        self.meta_step = None
        if self.scheduler.scale is not None:
            optimizer = kwargs["optimizer"]
            self.scheduler.meta_learner = MetaLearner(
                self.schedule, [p for group in optimizer.param_groups for p in group["params"]],
                interval=self.meta_interval, meta_lr=0.0, weight_decay=0.0, max_steps=state.max_steps,
                train_net=False, scale=self.scheduler.scale, settle_interval=1,
                stop_step=state.max_steps - self.scheduler.cooldown_steps, hold=True,
                track_batch_share=MLRSTrainingArguments.mlrs_scale_track_batch_share)
            self.meta_step = MetaStep(trainer, self.scheduler, self.on_nonfinite,
                                      next_batch=self.meta_dataset is None)
            if self.meta_dataset is not None:
                self.meta_step.set_meta_data(self.meta_dataset,
                                             self.meta_batch_size or args.per_device_train_batch_size, args.seed)
            meta_step = self.meta_step

            def with_scale_logs(log):  # the Trainer's log() is the only way into its log_history
                def tapped(logs, *rest, **kw):
                    if "loss" in logs:
                        logs.update(meta_step.pop_logs())
                    return log(logs, *rest, **kw)

                return tapped

            tap_method(trainer, "log", with_scale_logs)
            if self.meta_step.next_batch:  # the hypergradient is taken on the gradient before clipping
                def noting_clipping(clip):
                    def tapped(model):
                        norm = clip(model)
                        meta_step.note_clipping(norm, trainer.args.max_grad_norm)
                        return norm

                    return tapped

                tap_method(trainer, "_clip_grad_norm", noting_clipping)
            if self.rewind and self.scheduler.scale.growing and \
                    trainer.accelerator.distributed_type != DistributedType.FSDP:  # a growth whose stop can hold
                share = MLRSTrainingArguments.mlrs_scale_rewind_max_share  # MLRSTrainer's default
                self.scheduler.rewind = Rewind(latest_step=math.floor(share * state.max_steps))
        self.fingerprint = _fingerprint(self.schedule)
        saved = state.stateful_callbacks.get(STATE_KEY)
        if state.global_step > 0 and saved:  # resuming: continue the recurrent state where it was saved
            if saved.get("schedule_fingerprint") != self.fingerprint:
                raise ValueError(
                    "MLRSCallback: the checkpoint being resumed was trained with another schedule than the one "
                    "passed now. Resume with the same MLRSNet, or start a new run."
                )
            self.scheduler.load_run_state(saved)
            if self.meta_step is not None:
                self._restore_meta_learner(trainer, state, saved["meta_learner"])
        self._restore_rewind(trainer, state, saved)

    def _restore_meta_learner(self, trainer: Trainer, state: TrainerState, saved: dict) -> None:
        """The learner's counters from trainer_state.json; a pending next-batch update's step from its own file."""
        if saved.get("pending_alpha") is not None:
            path = os.path.join(_resumed_checkpoint(trainer, state), PENDING_DELTA)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"MLRSCallback: {path} is missing: the checkpoint being resumed was saved with a meta-update "
                    "waiting for the next step's gradient, and it holds no copy of the step it measures. Resume from "
                    "the whole checkpoint folder MLRSCallback wrote.")
            saved = {**saved, "pending_delta": torch.load(path, map_location="cpu", weights_only=True)}
        self.scheduler.meta_learner.load_state_dict(saved)

    def _restore_rewind(self, trainer: Trainer, state: TrainerState, saved: dict | None) -> None:
        """A fresh run keeps its starting weights; a resumed one takes the rewind's state from its checkpoint."""
        rewind = self.scheduler.rewind
        if rewind is None:
            return
        if state.global_step == 0:
            rewind.keep(trainer.accelerator.unwrap_model(trainer.model))
            return
        if not saved or "rewind" not in saved:
            rewind.skip()  # a checkpoint written without the rewind: the run goes on without it
            return
        rewind.load_state_dict({**saved["rewind"], "weights": None})
        if rewind.done:
            return
        path = os.path.join(_resumed_checkpoint(trainer, state), REWIND_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"MLRSCallback: {path} is missing: the checkpoint being resumed was saved before this run's rewind, "
                "and it holds no copy of the starting weights to rewind to. Resume from the whole checkpoint folder "
                "MLRSCallback wrote, or pass rewind=False to go on without the rewind.")
        rewind.weights = torch.load(path, map_location="cpu", weights_only=True)

    def save_tensors(self, folder: str) -> None:
        """Into a checkpoint being written, what trainer_state.json cannot hold: the starting weights while a rewind
        may still come, and the last step while its next-batch meta-update waits for the next gradient."""
        rewind = self.scheduler.rewind if self.scheduler is not None else None
        if rewind is not None and not rewind.done and rewind.weights is not None:
            torch.save(rewind.weights, os.path.join(folder, REWIND_WEIGHTS))
        learner = self.scheduler.meta_learner if self.scheduler is not None else None
        if learner is not None and learner.pending_alpha is not None:
            torch.save(learner.state_dict()["pending_delta"], os.path.join(folder, PENDING_DELTA))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Gradients are final here and the step comes next: the paper's order, lr_t from loss_t.
        loss = self.loss_meter.pop(self.trainer.accelerator)
        if self.meta_step is not None:
            self.meta_step.before_step(loss)
        else:
            skips = self.scheduler.nonfinite_skips
            self.scheduler.observe(loss)
            if self.scheduler.nonfinite_skips > skips and self.on_nonfinite == "stop":
                control.should_training_stop = True
        _report_lr(kwargs.get("lr_scheduler"), self.scheduler.get_last_lr())

    def on_optimizer_step(self, args, state, control, **kwargs):
        # With a learned scale: the meta step, which may rescale the step just taken; the Trainer reads the lr next.
        if self.meta_step is not None:
            self.meta_step.after_step()
            _report_lr(kwargs.get("lr_scheduler"), self.scheduler.get_last_lr())
        self.applied_lrs = self.scheduler.get_last_lr()

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer's own scheduler.step() has just rewritten the param groups: put the applied lr back, and
        # leave our state where the next checkpoint's trainer_state.json will pick it up.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.applied_lrs):
            group["lr"] = lr
        rewind = self.scheduler.rewind
        rewind_when_due(rewind, self.scheduler, self.trainer.accelerator.unwrap_model(self.trainer.model),
                        self.scheduler.optimizer, state.global_step)
        saved = {**self.scheduler.run_state(), "schedule_fingerprint": self.fingerprint}
        if self.meta_step is not None:  # JSON: a pending update's delta goes into its own file (save_tensors)
            saved["meta_learner"] = self.scheduler.meta_learner.state_dict(include_delta=False)
        if rewind is not None:  # JSON: the kept weights go into the checkpoint's own file (save_tensors)
            saved["rewind"] = {k: v for k, v in rewind.state_dict().items() if k != "weights"}
        state.stateful_callbacks[STATE_KEY] = saved

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.finished:  # the epoch that was not trained must not save, evaluate or log either
            control.should_save = control.should_evaluate = control.should_log = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None and state.is_world_process_zero:
            self.scheduler.warn_if_at_ceiling()
        for name in ("training_step", "_save_checkpoint", "get_batch_samples", "log", "_clip_grad_norm"):
            untap_method(self.trainer, name)


def _calling_trainer() -> Trainer:
    """The Trainer whose train() is calling us: callbacks get no reference to it, but it is on the call stack."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError("MLRSCallback must be used inside transformers.Trainer.train(): pass it as "
                       "Trainer(..., callbacks=[MLRSCallback(schedule)]).")


def _tap_training_step(trainer: Trainer, meter: StepLossMeter) -> None:
    """Wrap this trainer's training_step (instance only) so each step's loss reaches the meter."""

    def wrap(original):
        def training_step(*args, **kwargs):
            loss = original(*args, **kwargs)
            meter.add(loss)
            return loss

        return training_step

    tap_method(trainer, "training_step", wrap)


def _safe_save(trainer: Trainer, save, save_extra):
    def save_with_extra(model, trial):  # inside the safe save: its marker covers the extra files too
        save(model, trial)
        if trainer.args.should_save:
            folder = os.path.join(trainer._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
            save_extra(folder)

    def _save_checkpoint(model, trial):
        save_checkpoint_safely(trainer, save_with_extra, model, trial)

    return _save_checkpoint


def _resumed_checkpoint(trainer: Trainer, state: TrainerState) -> str:
    """The checkpoint folder this train() resumed from: the Trainer's training loop has it as an argument (after
    resolving `True` to the last one); failing that, the output folder's checkpoint of the resumed step."""
    frame = inspect.currentframe()
    while frame is not None:
        folder = frame.f_locals.get("resume_from_checkpoint")
        if frame.f_locals.get("self") is trainer and isinstance(folder, (str, os.PathLike)):
            return os.fspath(folder)
        frame = frame.f_back
    return os.path.join(trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _no_batches(epoch_iterator, num_batches, device):
    return [], None


def _report_lr(lr_scheduler, lrs: list[float]) -> None:
    """Make the Trainer's scheduler report the lr we applied: Trainer logs `lr_scheduler.get_last_lr()[0]`."""
    if lr_scheduler is not None:
        target = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler
        target._last_lr = list(lrs)


def _fingerprint(schedule: MLRSNet) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(schedule.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
