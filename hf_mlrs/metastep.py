"""The two halves of one MLR-SNet step inside a `transformers.Trainer`, shared by MLRSTrainer and MLRSCallback.

Per optimizer step t, once gradients are complete (accumulated, synced, clipped):
  before_step   l_t = global mean loss of the step; alpha_t = gamma * A(l_t; h_{t-1}, theta); at the first step of a
                meta window keep w_start (the one buffer)
  (the real optimizer step, with alpha_t; it doubles as the lookahead)
  after_step    at the window's last step: meta loss at w, dot = <g_meta, w - w_start>; the net (dL/dtheta) and/or
                the learned scale (dL/dlog(gamma) = dot) take one step; with a one-step window the step just taken
                is rescaled to the updated lr, w = w_start + (alpha'_t / alpha_t) delta: the paper's order, exactly.
The first step of a learned scale that starts relative to the model is a calibration step instead (see
`LearnedScale.start_update`). With `next_batch=True` (a frozen net's learned scale) no meta batch is drawn: the
gradient at w_{t+1} is the one the Trainer computes for step t+1 anyway, so after_step only turns the buffer into
delta_t, and before_step of step t+1 takes dot = <g_{t+1}, delta_t> (g_{t+1} before the Trainer clipped it) and
updates gamma before alpha_{t+1} is set; the step t stands as taken (its gradient is spent); under DDP that gradient
is already averaged: nothing to communicate.
With held-out meta batches, under DDP only two scalars per meta step cross processes. Under FSDP2 the meta
backward runs through the sharded model (its all-gathers and reduce-scatter, as any backward), the dot product is
taken over each rank's shards, and the same two scalars are all-reduced.
"""

from __future__ import annotations

import math
import warnings

import torch

from .data import MetaBatchSampler
from .hypergrad import MetaLearner
from .scheduler import MLRSScheduler


class MetaStep:
    """Drives `scheduler` (and its `meta_learner`) from inside the Trainer's loop.

    Args:
        trainer (`transformers.Trainer`): the running trainer (its model, accelerator, compute_loss, collator).
        scheduler (`MLRSScheduler`): with a `meta_learner` to meta-train the net and/or learn the scale, or none.
        on_nonfinite (`str`): "skip" (warn, keep lr and net) or "stop" (also stop training).
    """

    def __init__(self, trainer, scheduler: MLRSScheduler, on_nonfinite: str = "skip", eval_mode: bool = False,
                 next_batch: bool = False):
        learner = scheduler.meta_learner
        if next_batch and learner is not None and (learner.train_net or learner.horizon != 1 or learner.sharded):
            raise ValueError("hf_mlrs: the next training batch as the meta batch learns only the scale of a frozen "
                             "schedule, with one-step windows and without FSDP2; use held-out meta batches here.")
        self.trainer = trainer
        self.eval_mode = eval_mode
        self.next_batch = next_batch
        if learner is not None:  # recorded in checkpoints, so that a resume cannot switch sources unnoticed
            learner.meta_source = "next_batch" if next_batch else "held_out"
        self.scheduler = scheduler
        self.on_nonfinite = on_nonfinite
        self.log_window: dict[str, list[float]] = {"meta_loss": [], "hypergrad": []}
        self.reset()

    def reset(self) -> None:
        """Nothing pending from a train() that raised, or from before a resume."""
        self.pending_meta = None
        self.pending_calibration = None
        self.clip_factor = 1.0  # what the Trainer's clipping multiplied this step's gradients by (note_clipping)
        if self.scheduler.meta_learner is not None:
            self.scheduler.meta_learner.window_lrs = []

    # ---- meta data ----------------------------------------------------------------------------------------------

    def set_meta_data(self, meta_dataset, batch_size: int, seed: int) -> None:
        """Meta batches: batch m on rank r is a pure function of (m, r), so a resumed run draws the same ones."""
        trainer = self.trainer
        if hasattr(meta_dataset, "column_names"):
            source = trainer._remove_unused_columns(meta_dataset, description="meta")

            def rows(indices):  # one Arrow read for the batch, then rows for the collator
                columns = source[indices]
                return [dict(zip(columns, values)) for values in zip(*columns.values())]

            self.meta_collator = trainer.data_collator
        else:

            def rows(indices):
                return [meta_dataset[i] for i in indices]

            self.meta_collator = trainer._get_collator_with_removed_columns(trainer.data_collator, description="meta")
        self.meta_rows = rows
        self.meta_sampler = MetaBatchSampler(len(meta_dataset), batch_size, seed)

    def meta_batch(self, m: int, share: float = 1.0) -> dict:
        """Meta batch `m` of this rank, or its first `share` of it (at least one example)."""
        accelerator = self.trainer.accelerator
        indices = self.meta_sampler.indices(m, accelerator.process_index, accelerator.num_processes)
        features = self.meta_rows(indices[:max(1, math.ceil(share * len(indices)))])
        return self.trainer._prepare_inputs(self.meta_collator(features))

    # ---- before the optimizer step ------------------------------------------------------------------------------

    def note_clipping(self, grad_norm, max_norm: float) -> None:
        """The Trainer has just clipped this step's gradients (`_clip_grad_norm`, which returns the norm before
        clipping): torch's clip_grad_norm_ multiplied them by min(1, max_norm / (norm + 1e-6)). Kept so that the
        next-batch hypergradient is taken on the gradient itself, as the held-out one is: clipping rescales it by a
        factor that differs from step to step, which would reweight the scale's Adam average. Held-out meta
        gradients are never clipped: nothing to keep (and no device sync for the norm on every step)."""
        if not self.next_batch:
            return
        norm = float(grad_norm)
        self.clip_factor = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else math.nan

    def before_step(self, loss: float) -> None:
        """Set alpha_t from the loss of step t; keep w_start at a window's first step; prepare a due meta-update."""
        scheduler, learner = self.scheduler, self.scheduler.meta_learner
        step = self.trainer.state.global_step
        clip_factor, self.clip_factor = self.clip_factor, 1.0  # this step's, used once
        if scheduler.scale is not None and not scheduler.scale.calibrated:
            return self._calibration_before_step(loss)
        if learner is not None and learner.pending_alpha is not None:
            self._next_batch_update(clip_factor)
        if learner is not None and learner.window_starts(step):
            learner.remember_weights()
        due = learner is not None and learner.is_due(step)
        track = learner is not None and learner.train_net and learner.in_window(step)  # alpha_t needs a graph
        if not (due or track):
            skips = scheduler.nonfinite_skips
            scheduler.observe(loss)
            if scheduler.nonfinite_skips > skips:
                self._on_nonfinite("training loss")
            return
        x = scheduler.prepare_input(loss)
        if x is None:
            scheduler.hold_lr()
            self._on_nonfinite("training loss")
            if due:
                learner.advance()
            return
        with torch.set_grad_enabled(track):
            lr, state = scheduler.compute_lr(x)
        alpha = float(lr.detach())
        if not (math.isfinite(alpha) and alpha > 0):
            scheduler.apply_lr(lr.detach(), state)
            if due:
                learner.advance()
            return
        if not due:  # an earlier step of a longer window: its alpha_j shares the window's hypergradient
            learner.window_lrs.append(lr)
            scheduler.apply_lr(lr.detach(), state)
            return
        scheduler.set_lr(alpha)
        self.pending_meta = (x, lr, state)

    def _calibration_before_step(self, loss: float) -> None:
        """The first step of a learned scale started relative to the model: taken, measured, then rescaled."""
        scheduler, learner = self.scheduler, self.scheduler.meta_learner
        if learner.is_due(self.trainer.state.global_step):
            learner.advance()  # this step calibrates instead of meta-updating
        x = scheduler.prepare_input(loss)
        if x is None:  # no trustworthy step: calibrate on the next one
            scheduler.hold_lr()
            self._on_nonfinite("training loss")
            return
        with torch.no_grad():
            lr, state = scheduler.compute_lr(x)
        alpha = float(lr)
        if not (math.isfinite(alpha) and alpha > 0):
            scheduler.apply_lr(lr, state)
            return
        scheduler.set_lr(alpha)
        learner.remember_weights()
        self.pending_calibration = (x, state, alpha)

    # ---- after the optimizer step -------------------------------------------------------------------------------

    def after_step(self) -> None:
        if self.pending_calibration is not None:
            return self._calibration_after_step()
        if self.pending_meta is None:
            return
        x, lr, state = self.pending_meta
        self.pending_meta = None
        scheduler, learner = self.scheduler, self.scheduler.meta_learner
        accelerator = self.trainer.accelerator
        if accelerator.optimizer_step_was_skipped or not learner.window_open:
            # fp16 overflow: no step to learn from; or a run resumed inside a window (w_start was not saved)
            if not learner.window_open:
                warnings.warn("hf_mlrs: resumed inside a meta window (mlrs_horizon > 1): its meta-update is skipped. "
                              "Resume is exact with mlrs_horizon=1, or with checkpoints at window ends.",
                              RuntimeWarning, stacklevel=2)
            scheduler.apply_lr(lr.detach(), state)
            learner.advance()
            return
        alpha = float(lr.detach())
        learner.weights_to_delta()
        if self.next_batch:  # the step stands as taken; its hypergradient comes with the next step's gradient
            scheduler.apply_lr(alpha, state)
            learner.pending_alpha = alpha
            return
        meta_loss, dot = self._meta_loss_and_dot(learner, learner.num_meta_steps)
        meta_loss, dot = self._across_ranks(learner, meta_loss, dot)
        if math.isfinite(meta_loss) and math.isfinite(dot):
            if learner.scale is not None:
                learner.scale.update(dot)  # dL/dlog(gamma) = <g_meta, Delta>
            if learner.train_net:
                learner.update_schedule(lr, dot)
            with torch.no_grad():
                lr, state = scheduler.compute_lr(x)  # alpha'_t: same input and h_{t-1}, updated theta and gamma
            self.log_window["meta_loss"].append(meta_loss)
            self.log_window["hypergrad"].append(dot / alpha)
        else:
            learner.num_skipped += 1
            self._on_nonfinite(f"meta loss ({meta_loss}) or hypergradient ({dot / alpha})")
            lr = lr.detach()
        if learner.window_length == 1:
            learner.rescale(scheduler.apply_lr(lr, state) / alpha)
        else:  # delta spans the window: the last step stands as taken; the updated lr applies from the next step
            scheduler.apply_lr(alpha, state)
        learner.close_window()
        learner.advance()

    def _next_batch_update(self, clip_factor: float = 1.0) -> None:
        """Step t+1's gradients are final: dL_{t+1}(w_{t+1})/dlog(gamma) = <g_{t+1}, delta_t> updates the scale
        before alpha_{t+1} is computed. g_{t+1} is the gradient before the Trainer clipped it (the dot product of the
        clipped one divided by the clipping factor), as exact as the held-out hypergradient."""
        learner = self.scheduler.meta_learner
        alpha = learner.pending_alpha
        grads = [p.grad for p in learner.params]
        dot = float(learner.local_dot(grads)) / clip_factor if any(g is not None for g in grads) else math.nan
        if math.isfinite(dot):
            learner.scale.update(dot)
            self.log_window["hypergrad"].append(dot / alpha)
        elif self.trainer.accelerator.scaler is not None:
            pass  # fp16 overflow: the loss scaler skips this step; no signal, as on the held-out path
        else:
            learner.num_skipped += 1
            self._on_nonfinite(f"hypergradient ({dot / alpha})")
        learner.close_window()
        learner.advance()

    def _calibration_after_step(self) -> None:
        x, state, alpha = self.pending_calibration
        self.pending_calibration = None
        scheduler, learner = self.scheduler, self.scheduler.meta_learner
        if self.trainer.accelerator.optimizer_step_was_skipped:
            scheduler.apply_lr(alpha, state)
            return
        learner.weights_to_delta()
        scheduler.scale.calibrate(learner.relative_update())  # identical on every rank: so are weights and delta
        with torch.no_grad():
            lr, _ = scheduler.compute_lr(x)  # same input and h_{t-1}, calibrated gamma
        learner.rescale(scheduler.apply_lr(lr, state) / alpha)  # exact: the step is linear in the lr
        learner.close_window()

    def _across_ranks(self, learner: MetaLearner, meta_loss: torch.Tensor, dot: torch.Tensor) -> tuple[float, float]:
        """The global meta loss (mean over the ranks' meta batches) and <g_meta, delta>: one all-reduce of 2 scalars.

        DDP: each rank's dot uses its own meta gradient and the whole delta, so the global dot is the mean.
        FSDP2: the reduce-scatter already averaged g_meta over ranks, and each rank holds a disjoint shard of it and of
        delta, so the global dot is the sum of the shards' dots (averaging would divide it by the world size).
        """
        accelerator = self.trainer.accelerator
        n = accelerator.num_processes
        if n == 1:
            return float(meta_loss), float(dot)
        if learner.sharded:
            stats = accelerator.reduce(torch.stack([meta_loss / n, dot]).to(accelerator.device), reduction="sum")
        else:
            stats = accelerator.reduce(torch.stack([meta_loss, dot]).to(accelerator.device), reduction="mean")
        return float(stats[0]), float(stats[1])

    def _meta_loss_and_dot(self, learner: MetaLearner, meta_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta loss at w' on this rank's meta batch, and this rank's part of <g_meta, delta>.

        The spent training gradients are freed first, so the meta gradient costs no extra parameter-sized memory.
        Buffers (e.g. BatchNorm running statistics) are restored: the meta batch must not leak into the model.
        """
        trainer = self.trainer
        # FSDP2 gathers parameters in its forward hooks: the meta loss must go through the sharded module itself.
        model = trainer.model if learner.sharded else trainer.accelerator.unwrap_model(trainer.model)
        for p in learner.params:
            p.grad = None
        inputs = self.meta_batch(meta_step, learner.meta_batch_share())
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        was_training = model.training
        if self.eval_mode:  # the held-out loss as evaluation sees it: running statistics, no dropout
            model.eval()
        try:
            with trainer.compute_loss_context_manager():
                meta_loss = trainer.compute_loss(model, inputs)
            dot = (_sharded_meta_dot if learner.sharded else _local_meta_dot)(learner, meta_loss)
        finally:
            model.train(was_training)
            for p in learner.params:
                p.grad = None  # the meta gradient must never reach the next training step
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        return meta_loss.detach().to(torch.float64), dot

    def _on_nonfinite(self, what: str) -> None:
        warnings.warn(f"hf_mlrs: non-finite {what} at step {self.trainer.state.global_step}; the lr and the "
                      "schedule were left unchanged.", RuntimeWarning, stacklevel=2)
        if self.on_nonfinite == "stop":
            self.trainer.control.should_training_stop = True

    def pop_logs(self) -> dict[str, float]:
        """Means of the meta loss and hypergradient since the last log, and the scale's and learner's counters."""
        logs = {}
        for name, values in self.log_window.items():
            if values:
                logs[f"mlrs/{name}"] = sum(values) / len(values)
            values.clear()
        scheduler = self.scheduler
        logs["mlrs/net_output"] = scheduler.last_output
        logs["mlrs/gamma"] = scheduler.gamma
        logs["mlrs/stage"] = scheduler.stage
        logs["mlrs/nonfinite_skips"] = scheduler.nonfinite_skips
        if scheduler.meta_learner is not None:
            logs["mlrs/meta_updates"] = scheduler.meta_learner.num_updates
            logs["mlrs/meta_skips"] = scheduler.meta_learner.num_skipped
        if scheduler.scale is not None:
            logs["mlrs/scale_updates"] = scheduler.scale.num_updates
        return logs


def _local_meta_dot(learner: MetaLearner, meta_loss: torch.Tensor) -> torch.Tensor:
    """One process or DDP: autograd.grad on the unwrapped model, so no DDP hook fires (no gradient all-reduce)."""
    grads = torch.autograd.grad(meta_loss, learner.params, allow_unused=True)
    return learner.local_dot(grads)


def _sharded_meta_dot(learner: MetaLearner, meta_loss: torch.Tensor) -> torch.Tensor:
    """FSDP2: a plain backward through the sharded model. Its reduce-scatter leaves in each parameter's .grad this
    rank's shard of the meta gradient averaged over ranks, next to this rank's shard of delta: their dot is this
    rank's exact part of <g_meta, delta>. autograd.grad cannot be used: FSDP2 computes with gathered copies and
    writes the sharded gradients in its post-backward hooks, so the sharded parameters are not in the graph."""
    meta_loss.backward()
    grads = [p.grad for p in learner.params]
    if all(g is None for g in grads):
        raise RuntimeError(
            "hf_mlrs: the meta backward under FSDP2 left no sharded gradient: gradient synchronisation was off "
            "(model.set_requires_gradient_sync(False), e.g. inside accelerator.no_sync) or the optimizer's parameters "
            "are not the model's. Meta steps must run after the synchronised optimizer step."
        )
    return learner.local_dot(grads)
