"""MLRSTrainer: a `transformers.Trainer` whose learning rate comes from MLR-SNet.

Without `schedule=` it meta-trains a new MLRSNet while it trains the model (the paper's bilevel loop with the exact
first-order lookahead of `hypergrad.py`); with `schedule=` it applies a learned schedule frozen (transfer).

Per optimizer step t, once gradients are complete (accumulated, synced, clipped):
  on_pre_optimizer_step   l_t = global mean loss of the step; alpha_t = gamma * A(l_t; h_{t-1}, theta)
  optimizer.step()        the real step, with alpha_t; it doubles as the lookahead step w'
  on_optimizer_step       every mlrs_meta_interval steps: meta loss at w', dL/dalpha = <g_meta, delta> / alpha_t,
                          Adam step on theta, alpha'_t from the updated net, w = w_old + (alpha'_t / alpha_t) delta
The logged `learning_rate` is alpha'_t: the lr the step really applied.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from transformers import Trainer, TrainerCallback

from . import __version__
from .checkpoints import checkpoint_problem, checkpoint_to_resume, nothing_left_to_train, save_checkpoint_safely
from .config import MLRSTrainingArguments, learned_scale, resolve_cooldown
from .data import MetaShareSampler, split_meta_indices, subset
from .hypergrad import MetaLearner, lr_linearity_problem
from .integration import (
    StepLossMeter,
    broadcast_from_main,
    check_all_processes_joined,
    fix_loss_scaling,
    num_labels_of,
)
from .metastep import MetaStep
from .modeling import MLRSNet
from .rewind import Rewind, rewind_when_due
from .scheduler import MLRSScheduler


SCHEDULE_DIR = "mlrs_schedule"  # where save_model() and every checkpoint put the schedule
META_TRAIN_UNSUPPORTED = {
    # FSDP2 (fsdp_version: 2) is supported: the lookahead runs on each rank's shards (see meta_training_problem).
    DistributedType.FSDP: "FSDP1 flattens the parameters into FlatParameters the lookahead cannot be taken over; set "
                          "fsdp_version: 2 in the accelerate config (FSDP2, recipes/accelerate_configs/fsdp.yaml), "
                          "which is supported",
    DistributedType.DEEPSPEED: "DeepSpeed owns the optimizer step and shards its state",
    DistributedType.XLA: "XLA is untested",
    DistributedType.MEGATRON_LM: "Megatron-LM owns the optimizer step",
}


class MLRSTrainer(Trainer):
    """[`~transformers.Trainer`] whose lr comes from an MLR-SNet schedule (Shu et al., TPAMI 2022).

    Takes every argument of `Trainer`, with `args` an [`MLRSTrainingArguments`], plus:

    Args:
        meta_dataset (`Dataset`, *optional*):
            Held-out data for the meta loss (meta-training, or a learned gamma from held-out batches). If unset,
            `args.mlrs_meta_fraction` of `train_dataset` is held out (class-balanced) while meta steps remain, except
            with a frozen `schedule` and a learned gamma, whose scale learns from the next training batch and holds
            nothing out (`args.mlrs_meta_source`); given there, the scale learns from it instead. Ignored with a
            frozen schedule at a fixed gamma.
        schedule (`MLRSNet`, *optional*):
            A learned schedule to apply frozen (transfer mode). If unset, a new net is meta-trained.
        continue_meta_training (`bool`, *optional*, defaults to `False`):
            With `schedule=`: meta-train that net further instead of freezing it (its last stage learns, in place).
            Its earlier stages (snapshots) are left as they are, since a net meta-trained over several runs gets
            its stages from all the runs of its last round (`MLRSMultiTaskTrainer`, which turns this run's own
            snapshots back on when its whole plan is this one run); the stage switch losses of this run are
            recorded.
        meta_optimizer_state (`dict`, *optional*):
            With `continue_meta_training`: the meta-optimizer (Adam) state to continue from, as returned by
            `trainer.meta_optimizer_state()` of the previous run, so Adam's moments carry over between runs. A
            checkpoint being resumed overrides it with its own.

    After `train()`, `trainer.schedule` is the learned [`MLRSNet`]; `save_model()` and every checkpoint also write
    it to `<dir>/mlrs_schedule/`, and its full state (net, meta-optimizer, recurrent state) is in `scheduler.pt`,
    so `resume_from_checkpoint` continues exactly. Checkpoints are crash-safe: `resume_from_checkpoint=True` takes the
    newest complete one, skipping (with a warning, deleting nothing) a save cut short by a kill, and a run resumed
    from its final checkpoint trains no extra step.

    Example:

    ```python
    >>> trainer = MLRSTrainer(model=model, args=MLRSTrainingArguments("out", learning_rate=5e-5),
    ...                       train_dataset=train, eval_dataset=test)
    >>> trainer.train()
    >>> trainer.schedule.save_pretrained("my-schedule")
    ```
    """

    _tag_names = ["hf_mlrs", "mlr-snet"]
    meta_step_class = MetaStep  # the two halves of an MLR-SNet step (reference.py swaps in the paper-style one)

    def __init__(self, *positional, meta_dataset=None, schedule: MLRSNet | None = None,
                 continue_meta_training: bool = False, meta_optimizer_state: dict | None = None, **kwargs):
        positional, kwargs, args = _as_mlrs_args(positional, kwargs)
        if continue_meta_training and schedule is None:
            raise ValueError("MLRSTrainer: continue_meta_training=True needs the net to continue: pass "
                             "schedule=MLRSNet.from_pretrained(...) (without schedule= a new net is meta-trained).")
        if meta_optimizer_state is not None and not continue_meta_training:
            raise ValueError("MLRSTrainer: meta_optimizer_state is only used with continue_meta_training=True.")
        self.meta_training = schedule is None or continue_meta_training
        # Snapshots are the caller's when continuing (see continue_meta_training); MLRSMultiTaskTrainer turns them
        # back on for a plan of one run, the paper's regime.
        self._take_snapshots = not continue_meta_training
        self._meta_optimizer_state = meta_optimizer_state
        # Held-out data and the lookahead are needed to train the net or to learn the lr scale (or both).
        self.meta_learning = self.meta_training or args.mlrs_gamma == "learned"
        optimizer, scheduler = kwargs.get("optimizers", (None, None))
        if scheduler is not None:
            raise ValueError(
                "MLRSTrainer owns the learning-rate schedule; pass optimizers=(optimizer, None) "
                "(the schedule net replaces the scheduler)."
            )
        if optimizer is not None:  # refuse before anything is built (args.optim is checked by the arguments)
            _require_lr_linear(type(optimizer), optimizer.defaults, args)
        elif kwargs.get("optimizer_cls_and_kwargs") is not None:
            _require_lr_linear(*kwargs["optimizer_cls_and_kwargs"], args)
        if self.meta_learning and args.mlrs_meta_source == "next_batch":  # asked for: refused here before anything
            if self.meta_training:                                          # is built
                raise ValueError("MLRSTrainer: mlrs_meta_source='next_batch' learns only the scale of a frozen "
                                 "schedule; meta-training a net needs held-out data. Pass "
                                 "schedule=MLRSNet.from_pretrained(...) (without continue_meta_training), or use "
                                 "mlrs_meta_source='held_out'.")
            if meta_dataset is not None:
                raise ValueError("MLRSTrainer: mlrs_meta_source='next_batch' uses no meta_dataset (the next "
                                 "training batch is the meta batch); drop meta_dataset=..., or use "
                                 "mlrs_meta_source='held_out'.")
        self.meta_source = None  # "held_out" or "next_batch" where anything is meta-learned (_resolve_meta_source)
        super().__init__(*positional, **kwargs)
        # Why: the schedule must read the real mean loss, not one multiplied by accumulation steps x processes.
        fix_loss_scaling(self)
        self._meta_share = None  # a MetaShareSampler when the held-out share can rejoin training (_setup_meta_set)
        self._share_loader = None  # the training loader drawn by it (get_train_dataloader), for num_examples
        if self.meta_learning:
            problem = meta_training_problem(self.accelerator)
            if problem:
                raise ValueError(
                    f"MLRSTrainer cannot meta-train under {self.accelerator.distributed_type.value} (nor learn gamma "
                    f"there): {problem}. Meta-train with DDP (recipes/accelerate_configs/multi_gpu.yaml), FSDP2 or "
                    "one process, then apply the learned schedule frozen at a fixed gamma (schedule=... or "
                    "MLRSCallback), which works under any mode."
                )
            self.meta_source = self._resolve_meta_source(meta_dataset)
            self._check_horizon_is_used()
            if args.mlrs_scale_rewind is True and self.accelerator.distributed_type == DistributedType.FSDP:
                raise ValueError("MLRSTrainer: mlrs_scale_rewind keeps the whole model's starting state, which FSDP2 "
                                 "shards; it is not supported there yet. Drop mlrs_scale_rewind under FSDP2.")
            if not self._next_batch:  # the next training batch needs no held-out set
                self._setup_meta_set(meta_dataset)
        if schedule is None:
            schedule = MLRSNet(
                hidden_size=self.args.mlrs_hidden_size,
                output_bias_init=self.args.mlrs_output_bias_init,
                input_normalization=self.args.mlrs_input_normalization,
                stage_starts=[k / self.args.mlrs_num_stages for k in range(self.args.mlrs_num_stages)],
            )
        self.schedule = schedule.cpu()  # tiny: evaluated on the CPU, next to the optimizer's Python floats
        self.schedule.requires_grad_(self.meta_training)
        self._loss_meter = StepLossMeter()
        self._meta_step: MetaStep | None = None  # made with the scheduler
        self._nothing_to_train = False  # resumed from a checkpoint at max_steps
        self.add_callback(_MLRSHooks(self))

    def _check_horizon_is_used(self) -> None:
        """A learned gamma takes a meta step every `mlrs_settle_interval` steps while it grows (windows no longer
        than that) and, where it holds, none after: there `mlrs_horizon` would change nothing, silently (the same
        runs to the last digit, RESULTS.md 3b, session 30)."""
        args = self.args
        hold, confident_hold = self._scale_hold()
        holds = hold and not confident_hold  # a confident hold may not come: then the scale tracks, over windows
        settle = args.mlrs_settle_interval
        if args.mlrs_gamma == "learned" and holds and settle is not None and settle < args.mlrs_horizon:
            raise ValueError(
                f"MLRSTrainer: mlrs_horizon={args.mlrs_horizon} would never be used: a learned gamma takes its meta "
                f"steps every mlrs_settle_interval={settle} step(s) while it grows, so its windows are that long, and "
                f"none once it holds (mlrs_scale_hold). Set mlrs_settle_interval={args.mlrs_horizon} for windows of "
                f"{args.mlrs_horizon} steps throughout, mlrs_scale_hold=False to use them after the growth, or "
                "mlrs_horizon=1.")

    def _scale_hold(self) -> tuple[bool, bool]:
        """(hold, confident_hold) of a learned gamma (`LearnedScale`). Unset: hold where the net is meta-trained; with
        a frozen schedule only after a confident growth."""
        hold = self.args.mlrs_scale_hold
        return (True if hold is None else hold), (hold is None and not self.meta_training)

    def _resolve_meta_source(self, meta_dataset) -> str:
        """The meta source asked for, else the default: the next training batch where it applies (only gamma is
        learned, over one-step windows, outside FSDP2, and no meta_dataset was given), held-out batches elsewhere.
        Where it applies the two scored level on 10 seeds of four tasks, and the next batch costs 1.01x a plain run
        against 1.35x, holding no data out (RESULTS.md 3b, sessions 25-27)."""
        args = self.args
        source = args.mlrs_meta_source
        if source is None:
            applies = (not self.meta_training and meta_dataset is None and args.mlrs_horizon == 1
                       and self.accelerator.distributed_type != DistributedType.FSDP)
            source = "next_batch" if applies else "held_out"
            ignored = args.held_out_only_settings() if applies else []
            if ignored:
                raise ValueError(
                    f"MLRSTrainer: with a frozen schedule and a learned gamma the meta source defaults to the next "
                    f"training batch, which has no meta batch: {', '.join(ignored)} would have no effect. Set "
                    "mlrs_meta_source='held_out' to use held-out meta batches, or drop them.")
        if source == "held_out" and meta_dataset is None and args.mlrs_meta_fraction == 0:
            raise ValueError(
                "MLRSTrainingArguments.mlrs_meta_fraction is 0 and no meta_dataset was given, so meta-training (or a "
                "learned gamma) has no held-out data. Pass meta_dataset=... or set mlrs_meta_fraction (e.g. 0.1); to "
                "apply a learned schedule at a fixed gamma, pass schedule=MLRSNet.from_pretrained(...) and a number "
                "as mlrs_gamma."
            )
        return source

    @property
    def _next_batch(self) -> bool:
        return self.meta_source == "next_batch"

    # ---- overrides (each minimal) -------------------------------------------------------------------------------

    # Why: the Trainer's True takes the newest folder even when a kill cut its save short (and then crashes).
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._checkpoint_to_resume()
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem:
                warnings.warn(f"MLRSTrainer: resuming from {resume_from_checkpoint}, which is incomplete: {problem}. "
                              "hf_mlrs.last_complete_checkpoint(output_dir) finds the newest complete checkpoint.",
                              UserWarning, stacklevel=2)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    # Why: a save cut short must be recognisable as such (a marker written last), and rotation must wait for it.
    def _save_checkpoint(self, model, trial):
        save_checkpoint_safely(self, super()._save_checkpoint, model, trial)

    # Why: resumed at max_steps, the Trainer's loop would still take one step; no batch, no step.
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._nothing_to_train:
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    @property
    def cooldown_fraction(self) -> float:
        """The run's final cooldown share: `mlrs_cooldown_fraction` if given; else 0.2 with a learned gamma; else,
        applying a schedule frozen, the one it records (what its transfer was measured with); else 0."""
        recorded = 0.0 if self.meta_training else self.schedule.cooldown_fraction
        return resolve_cooldown(self.args.mlrs_cooldown_fraction, self.args.mlrs_gamma == "learned", recorded)

    # Why: the schedule replaces the Trainer's scheduler, and get_last_lr() of ours reports the lr really applied.
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            base = getattr(optimizer, "optimizer", optimizer)  # under AcceleratedOptimizer
            _require_lr_linear(type(base), base.defaults, self.args)  # whichever way the optimizer was made
            gamma = self.args.mlrs_gamma_value
            if self.args.mlrs_gamma is None and not self.meta_training:  # frozen: learning_rate is where it starts
                gamma = self.schedule.gamma_for(gamma)
            hold, confident_hold = self._scale_hold()
            if gamma == "learned":
                gamma = learned_scale(self.args.learning_rate, self.args, hold=hold, confident_hold=confident_hold)
            self.lr_scheduler = MLRSScheduler(
                optimizer,
                self.schedule,
                gamma=gamma,
                num_training_steps=num_training_steps,
                stage_by="fixed" if self.meta_training else self.args.mlrs_stage_by,
                min_lr=self.args.mlrs_min_lr,
                max_lr=self.args.mlrs_max_lr,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                cooldown_steps=math.floor(self.cooldown_fraction * num_training_steps),
                num_labels=num_labels_of(self.accelerator.unwrap_model(self.model)),
            )
            if self.meta_learning:
                self.lr_scheduler.meta_learner = MetaLearner(
                    self.schedule,
                    [p for group in optimizer.param_groups for p in group["params"]],
                    interval=self.args.mlrs_meta_interval,
                    meta_lr=self.args.mlrs_meta_lr,
                    weight_decay=self.args.mlrs_meta_weight_decay,
                    max_steps=num_training_steps,
                    horizon=self.args.mlrs_horizon,
                    train_net=self.meta_training,
                    scale=self.lr_scheduler.scale,
                    settle_interval=self.args.mlrs_settle_interval,
                    stop_step=num_training_steps - self.lr_scheduler.cooldown_steps,
                    take_snapshots=self._take_snapshots,
                    hold=hold,
                    track_batch_share=self.args.mlrs_scale_track_batch_share,
                )
                if self._meta_optimizer_state is not None:  # Adam's moments from the previous run (a resumed
                    self.lr_scheduler.meta_learner.load_meta_optimizer_state(self._meta_optimizer_state)  # checkpoint
                    # overrides them later with its own, as it should)
            self._meta_step = self.meta_step_class(self, self.lr_scheduler, self.args.mlrs_on_nonfinite,
                                                   eval_mode=self.args.mlrs_meta_eval_mode,
                                                   next_batch=self._next_batch)
            if self.meta_learning:
                if not self._next_batch:
                    self._meta_step.set_meta_data(self.meta_dataset, self._meta_batch_size, self.args.seed)
                self.lr_scheduler.meta_share = self._meta_share  # its release is part of the checkpointed state
                if self._meta_share is not None:
                    self._meta_share.released_from = None  # a new run holds it out (a checkpoint loads its own)
                if self._rewinds(hold):
                    self.lr_scheduler.rewind = Rewind(  # the starting weights are kept at on_train_begin
                        latest_step=math.floor(self.args.mlrs_scale_rewind_max_share * num_training_steps),
                        required=self.args.mlrs_scale_rewind is True)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _rewinds(self, hold: bool) -> bool:
        """Whether this run keeps its starting weights to rewind to once the learned scale's growth stops."""
        rewind = self.args.mlrs_scale_rewind
        scale = self.lr_scheduler.scale
        if rewind is None:  # on where it applies: a learned gamma that holds, outside FSDP2 (which shards the state);
            # not where a confident hold can never come (no growth phase)
            return (scale is not None and hold and not (scale.confident_hold and not scale.growing)
                    and self.accelerator.distributed_type != DistributedType.FSDP)
        if rewind and not hold:
            raise ValueError("MLRSTrainer: mlrs_scale_rewind needs a learned gamma that holds once it has stopped "
                             "growing; this run tracks it (mlrs_scale_hold=False). Set "
                             "mlrs_scale_hold=True or drop mlrs_scale_rewind.")
        return rewind

    # Why: once no meta step is left, the held-out share rejoins training; the loader must see the whole dataset.
    def get_train_dataloader(self):
        if self._meta_share is None:
            return super().get_train_dataloader()
        self._share_loader = self._get_dataloader(
            dataset=self._whole_train_dataset, description="Training", batch_size=self._train_batch_size,
            sampler_fn=lambda _: self._meta_share, is_training=True)
        return self._share_loader

    # Why: that loader's dataset is the whole split, but an epoch draws only the training part's length; the Trainer's
    # "Num examples", epoch count and samples per second come from this number.
    def num_examples(self, dataloader) -> int:
        if self._share_loader is not None and dataloader is self._share_loader:
            return len(self._meta_share)
        return super().num_examples(dataloader)

    # Why: the schedule reads the loss of each step, which only training_step sees.
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_meter.add(loss)
        return loss

    # Why: the next-batch hypergradient is taken on the gradient before clipping (MetaStep.note_clipping).
    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if self._meta_step is not None:
            self._meta_step.note_clipping(norm, self.args.max_grad_norm)
        return norm

    # Why: log what the schedule did next to the lr it set.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._meta_step is not None:
            logs.update(self._meta_step.pop_logs())
        super().log(logs, start_time)

    # Why: a saved model (and every checkpoint) should carry the schedule that trained it, loadable on its own.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.schedule.provenance = self.provenance()
            folder = os.path.join(output_dir or self.args.output_dir, SCHEDULE_DIR)
            self.schedule.save_pretrained(folder, write_card=not _internal_call)

    def meta_optimizer_state(self) -> dict | None:
        """The meta-optimizer's state after training (None when the net was not meta-trained): what
        `meta_optimizer_state=` of the next run continues from."""
        learner = getattr(self.lr_scheduler, "meta_learner", None)
        if learner is None or learner.meta_optimizer is None:
            return None
        return copy.deepcopy(learner.meta_optimizer.state_dict())  # state_dict() holds live tensors: copy them

    # ---- the two halves of one MLR-SNet step --------------------------------------------------------------------

    def _checkpoint_to_resume(self) -> str:
        """The newest complete checkpoint, chosen by the main process so that every rank resumes from the same one."""
        choice = [None]
        if self.accelerator.is_main_process:
            try:
                choice = [checkpoint_to_resume(self.args.output_dir)]
            except ValueError as error:
                choice = [error]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(choice)
        if isinstance(choice[0], Exception):
            raise choice[0]
        return choice[0]

    # ---- meta data ----------------------------------------------------------------------------------------------

    def _setup_meta_set(self, meta_dataset) -> None:
        if meta_dataset is None:
            if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
                raise ValueError(
                    "MLRSTrainer: holding out a meta set needs a train_dataset with a length; pass meta_dataset=..."
                )
            whole = self.train_dataset
            train, meta = split_meta_indices(whole, self.args.mlrs_meta_fraction, self.args.seed)
            self.train_dataset, meta_dataset = subset(whole, train), subset(whole, meta)
            args = self.args
            if args.mlrs_release_meta_share and args.train_sampling_strategy == "random" and (
                    args.mlrs_gamma == "learned" or self.cooldown_fraction > 0):  # a run whose meta steps end
                seed = args.data_seed if args.data_seed is not None else args.seed
                self._meta_share, self._whole_train_dataset = MetaShareSampler(train, len(whole), seed), whole
        batch_size = self.args.mlrs_meta_batch_size or self.args.per_device_train_batch_size
        if len(meta_dataset) < batch_size:
            raise ValueError(
                f"MLRSTrainer: the meta set has {len(meta_dataset)} examples, fewer than one meta batch "
                f"(mlrs_meta_batch_size={batch_size}). Raise mlrs_meta_fraction, pass a larger meta_dataset, or "
                "lower mlrs_meta_batch_size."
            )
        self.meta_dataset = meta_dataset
        self._meta_batch_size = batch_size

    # ---- provenance ---------------------------------------------------------------------------------------------

    def provenance(self) -> dict:
        """How this schedule was learned (or applied): goes into its config and model card."""
        model = self.accelerator.unwrap_model(self.model)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        history = [e for e in self.state.log_history if "learning_rate" in e and "step" in e]
        scheduler = self.lr_scheduler if isinstance(self.lr_scheduler, MLRSScheduler) else None
        provenance = dict(self.schedule.provenance) if not self.meta_training else {}
        provenance.update({
            "mode": "meta-training" if self.meta_training else "transfer",
            "task": self.args.run_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            "model": _model_name(model),
            "model_class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "optimizer": type(optimizer).__name__ if optimizer is not None else str(self.args.optim),
            "steps": self.state.global_step,
            "max_steps": self.state.max_steps,
            "gamma_rule": self.args.mlrs_gamma if self.args.mlrs_gamma in ("auto", "learned") else "explicit",
            "gamma": scheduler.gamma if scheduler else None,
            "gamma_trajectory": _relative_gamma_trajectory(self.state),
            "input_normalization": self.schedule.input_normalization,
            "meta_interval": self.args.mlrs_meta_interval,
            "meta_source": self.meta_source,
            "meta_updates": scheduler.meta_learner.num_updates if scheduler and scheduler.meta_learner else 0,
            "rewound_at_step": scheduler.rewind.step if scheduler and scheduler.rewind else None,
            "lr_history": [[e["step"], e["learning_rate"]] for e in history][-500:],
            "final_metrics": {k: v for e in self.state.log_history for k, v in e.items()
                              if k.startswith(("eval_", "train_loss", "mlrs/meta_loss")) and isinstance(v, float)},
            "hf_mlrs_version": __version__,
            "environment": run_environment(),
        })
        if not self.meta_training:
            provenance["transfer_of"] = dict(self.schedule.provenance).get("task")
        return provenance


class _MLRSHooks(TrainerCallback):
    """Connects MLRSTrainer to the points of the Trainer loop where gradients are final and the step is taken."""

    def __init__(self, trainer: MLRSTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._loss_meter = StepLossMeter()  # nothing left over from a train() that raised
        self.trainer._meta_step.reset()
        check_all_processes_joined(self.trainer)
        # Every rank must start from the same net: identical nets + identical inputs = identical lrs.
        broadcast_from_main(self.trainer.schedule, self.trainer.accelerator)
        self.trainer._nothing_to_train = nothing_left_to_train(state)
        if self.trainer._nothing_to_train:
            control.should_training_stop = True
        scheduler = self.trainer.lr_scheduler
        if scheduler.rewind is not None and not scheduler.rewind.done and scheduler.rewind.weights is None:
            if scheduler.num_observed:  # resumed: the weights now are the checkpoint's, not the run's start
                raise ValueError("MLRSTrainer: this run was resumed without the starting weights mlrs_scale_rewind "
                                 "rewinds to. Resume from a checkpoint of a run started with mlrs_scale_rewind.")
            scheduler.rewind.keep(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # Why: the Trainer's set_epoch does not reach the sampler through a resumed (skip_first_batches) loader of
        # several processes (a BatchSamplerShard has no .sampler); the epoch is the Trainer's own formula for it.
        share = self.trainer._meta_share
        if share is not None and train_dataloader is not None:
            steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
            share.set_epoch(state.global_step // steps_per_epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer._nothing_to_train:  # the epoch that was not trained must not save, evaluate or log either
            control.should_save = control.should_evaluate = control.should_log = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._meta_step.before_step(trainer._loss_meter.pop(trainer.accelerator))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.trainer.lr_scheduler.warn_if_at_ceiling()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._meta_step.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        scheduler = self.trainer.lr_scheduler
        learner = scheduler.meta_learner
        if learner is not None and learner.train_net:
            learner.record_stages(state.global_step, scheduler.loss_ema)
        trainer = self.trainer
        rewind_when_due(scheduler.rewind, scheduler, trainer.accelerator.unwrap_model(trainer.model),
                        trainer.optimizer, state.global_step)
        if scheduler.meta_share is not None and learner.finished(state.global_step):
            scheduler.meta_share.release()  # no meta batch is drawn again: the share trains from the next epoch


def meta_training_problem(accelerator) -> str | None:
    """Why MLRSTrainer cannot meta-train (or learn gamma) under this accelerator's mode, or None if it can.

    FSDP2 can: each parameter is a DTensor whose local shard holds whole entries of w, delta and g_meta, so the
    hypergradient is a sum of per-shard dot products (hypergrad.py). FSDP1's FlatParameters and DeepSpeed's own
    optimizer step cannot be driven that way.
    """
    mode = accelerator.distributed_type
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if mode == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2:
        return None
    return META_TRAIN_UNSUPPORTED.get(mode)


def _as_mlrs_args(positional: tuple, kwargs: dict) -> tuple[tuple, dict, MLRSTrainingArguments]:
    """Accept `TrainingArguments` too: copy it into MLRSTrainingArguments with the mlrs_ defaults."""
    args = list(positional)
    training_args = args[1] if len(args) > 1 else kwargs.get("args")
    if training_args is None:
        training_args = MLRSTrainingArguments(output_dir="trainer_output")
    elif not isinstance(training_args, MLRSTrainingArguments):
        values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
        training_args = MLRSTrainingArguments(**values)
    if len(args) > 1:
        args[1] = training_args
    else:
        kwargs["args"] = training_args
    return tuple(args), kwargs, training_args


def run_environment() -> dict:
    """What a run's floating-point results depend on besides its code, data and seeds: the library versions, the CPU
    kernels torch dispatches to, its thread count and the GPU. Meta-training is chaotic over thousands of steps, so a
    schedule rebuilt by the same command comes out bit for bit the same only where these match (RESULTS.md section 8,
    session 20: two builds of one zoo entry on different hosts differed in the 7th digit after a few steps)."""
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _relative_gamma_trajectory(state, points: int = 50) -> list[list[float]]:
    """[training progress, gamma / first gamma] from the logs: a scale learned on one model is not a scale for
    another, but its course (how far it moved, when it settled) is worth keeping with the schedule."""
    logged = [(e["step"], e["mlrs/gamma"]) for e in state.log_history if "mlrs/gamma" in e]
    if not logged or not state.max_steps:
        return []
    every = max(1, len(logged) // points)
    picked = logged[::every] + ([logged[-1]] if (len(logged) - 1) % every else [])
    return [[round(step / state.max_steps, 4), gamma / logged[0][1]] for step, gamma in picked]


def _model_name(model) -> str:
    """The model's Hub id for provenance; a local folder is named by its last parts, not this machine's full path."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return os.path.join(*Path(name).parts[-2:]) if os.path.isabs(name) else name


def _require_lr_linear(optimizer_cls: type, defaults: dict, args: MLRSTrainingArguments) -> None:
    """Refuse an optimizer whose step is not linear in lr: the exact lookahead (and the learned lr) need it."""
    problem = None if args.mlrs_assume_lr_linear else lr_linearity_problem(optimizer_cls, defaults)
    if problem:
        raise ValueError(f"MLRSTrainer: the optimizer cannot be driven by MLR-SNet: {problem}.")
