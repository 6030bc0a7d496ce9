"""MLRSScheduler: drives an optimizer's learning rate from the training loss through an MLRSNet.

Works in any PyTorch loop; imports only torch. The paper's order is: the loss of step t goes in, and the lr that
comes out is the lr step t uses (MLR-SNet, eq. 3):

    alpha_t = gamma * A(x_t; h_{t-1}, theta)        x_t = normalised training loss of step t

    loss = compute_loss(batch); loss.backward()
    scheduler.observe(loss)      # sets the lr of this step from this loss
    optimizer.step(); scheduler.step(); optimizer.zero_grad()

`get_last_lr()` reports the lrs live in the optimizer, so whatever logs it logs the lr really applied.
The loss must be the same on every process (average it across ranks first), or ranks set different lrs.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import torch
from torch.optim.lr_scheduler import LRScheduler

from .modeling import MLRSNet, State
from .scale import LearnedScale


STAGE_MODES = ("progress", "loss", "fixed")
LOSS_EMA_BETA = 0.9  # smoothing of the loss used for loss-triggered stages
RECENT_LOSSES = 20  # losses averaged when gamma="auto" is recomputed at a stage switch
CEILING = 0.95  # A_t above this: the net asks for all the lr gamma allows


def paper_gamma(loss: float, num_labels: int) -> float:
    """The official gamma heuristic: sqrt(L) * |ln(L * C)| / C**0.25 / 4 (about 0.67 for CIFAR-10 at init).

    It is zero at L * C = 1 and negative below; the official meta-test takes abs(), and so do we. Returns nan when
    the value is not a usable lr scale (non-finite, or below 1e-8), so the caller can keep its previous gamma.
    """
    if not (math.isfinite(loss) and loss > 0 and num_labels >= 2):
        return float("nan")
    gamma = math.sqrt(loss) * abs(math.log(loss * num_labels)) / num_labels**0.25 / 4
    return gamma if math.isfinite(gamma) and gamma > 1e-8 else float("nan")


def cooldown_factor(remaining: int, cooldown_steps: int) -> float:
    """The cooldown's multiplier of the lr with `remaining` steps left, this one included: 1 before the last
    `cooldown_steps` steps, then linear down to 1 / (cooldown_steps + 1) at the final step (a WSD-style decay on top of
    the net's output; never 0, so the last step still trains)."""
    return remaining / (cooldown_steps + 1) if 0 < remaining <= cooldown_steps else 1.0


class MLRSScheduler(LRScheduler):
    """Learning-rate scheduler whose lr comes from an MLRSNet reading the training loss.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer whose param-group lrs are set.
        schedule (`MLRSNet`): the schedule network (frozen here; meta-training updates it from outside).
        gamma (`float`, `"auto"`, `"learned"` or `LearnedScale`): the lr scale gamma (paper symbol): lr = gamma * A_t.
            `"auto"` uses the paper's heuristic from the first loss and `num_labels`, recomputed at each stage switch
            (SGD only). `"learned"` (or a `LearnedScale`) lets MLRSTrainer / MLRSCallback adapt log(gamma) from the
            held-out hypergradient; `"learned"` starts from the optimizer's lr.
        num_training_steps (`int`, *optional*): the run's length; needed for `stage_by="progress"` with >1 stage.
        stage_by (`str`, defaults to `"progress"`): `"progress"` applies stage k over the fraction of training given
            by `schedule.stage_starts`; `"loss"` (horizon-free) moves to stage k once the smoothed normalised loss
            falls to the value meta-training had there; `"fixed"` always uses `stage`.
        stage (`int`, defaults to `-1`): the stage used when `stage_by="fixed"`.
        min_lr, max_lr (`float`, *optional*): bounds on the lr.
        warmup_steps (`int`, defaults to `0`): linear warmup multiplying the net's lr over the first steps.
        cooldown_steps (`int`, defaults to `0`): linear decay multiplying the net's lr over the last steps, to
            1 / (cooldown_steps + 1) at the final step (needs `num_training_steps`).
        num_labels (`int`, *optional*): number of classes (or vocabulary size); needed by `"log_num_labels"`
            normalisation and by `gamma="auto"`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: MLRSNet,
        gamma: float | str | LearnedScale,
        *,
        num_training_steps: int | None = None,
        stage_by: str = "progress",
        stage: int = -1,
        min_lr: float | None = None,
        max_lr: float | None = None,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        num_labels: int | None = None,
    ):
        if stage_by not in STAGE_MODES:
            raise ValueError(f"MLRSScheduler: stage_by={stage_by!r} is not one of {STAGE_MODES}.")
        if stage_by == "progress" and schedule.num_stages > 1 and not num_training_steps:
            raise ValueError(
                "MLRSScheduler: this schedule has several stages applied by training progress, which needs "
                "num_training_steps. Pass it, or use stage_by='loss' (horizon-free) or stage_by='fixed'."
            )
        if stage_by == "loss" and schedule.num_stages > 1 and torch.isnan(schedule.stage_switch_losses[1:]).any():
            raise ValueError(
                "MLRSScheduler: stage_by='loss' needs the switch losses recorded at meta-training, and this schedule "
                "has none (e.g. an official checkpoint). Use stage_by='progress' with num_training_steps."
            )
        if gamma == "auto" and not num_labels:
            raise ValueError("MLRSScheduler: gamma='auto' needs num_labels (the paper's C).")
        if schedule.input_normalization == "log_num_labels" and not (num_labels and num_labels >= 2):
            raise ValueError("MLRSScheduler: input_normalization='log_num_labels' needs num_labels >= 2.")
        if gamma == "learned":
            gamma = LearnedScale(max(group["lr"] for group in optimizer.param_groups))
        self.scale = gamma if isinstance(gamma, LearnedScale) else None
        if self.scale is not None:
            gamma = "learned"
        elif gamma != "auto" and not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"MLRSScheduler: gamma must be a positive number, 'auto' or 'learned', got {gamma!r}.")
        self.schedule = schedule
        self.gamma_rule = gamma
        self.num_training_steps = num_training_steps
        self.stage_by = stage_by
        self.fixed_stage = stage % schedule.num_stages
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.warmup_steps = warmup_steps
        if cooldown_steps and not num_training_steps:
            raise ValueError("MLRSScheduler: cooldown_steps needs num_training_steps (the cooldown ends the run).")
        self.cooldown_steps = cooldown_steps
        self.num_labels = num_labels
        self.meta_learner = None  # set by MLRSTrainer while meta-training: its state rides in our state_dict
        self.meta_share = None  # set by MLRSTrainer when the held-out share can rejoin training: its state too
        self.rewind = None  # set by MLRSTrainer with mlrs_scale_rewind: the starting weights until the rewind, too
        # Per-run state: everything below is in state_dict() for exact resume.
        self.hidden: State = schedule.init_state("cpu")
        self.num_observed = 0
        self.stage = self.fixed_stage if stage_by == "fixed" else 0
        if gamma == "auto":
            self.gamma = float("nan")  # set from the first loss
        else:
            self.gamma = self.scale.gamma if self.scale is not None else float(gamma)
        self.initial_loss: float | None = None
        self.loss_ema: float | None = None
        self.recent_losses: deque[float] = deque(maxlen=RECENT_LOSSES)
        self.last_output: float | None = None  # A_t of the last applied step, for logging
        self._computed_output: float | None = None
        self.nonfinite_skips = 0
        self.steps_at_ceiling = 0  # steps with A_t > CEILING: gamma too small for what the net wants
        super().__init__(optimizer)
        # Groups keep their initial ratios (e.g. LoRA+ or layer-wise scales); the largest group gets the full lr.
        top = max(self.base_lrs)
        self.group_ratios = [b / top if top > 0 else 1.0 for b in self.base_lrs]

    # ---- LRScheduler interface ----------------------------------------------------------------------------------

    def get_lr(self) -> list[float]:
        # The lr was set by observe() before the optimizer step; step() must leave it as it is.
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        # The lrs live in the optimizer: what the Trainer logs is what the optimizer applied.
        return [group["lr"] for group in self.optimizer.param_groups]

    # ---- one training step --------------------------------------------------------------------------------------

    def observe(self, loss: float | torch.Tensor) -> float:
        """Set the lr of the current step from its training loss and return it."""
        x = self.prepare_input(loss)
        if x is None:
            return self.hold_lr()
        with torch.no_grad():
            lr, state = self.compute_lr(x)
        return self.apply_lr(lr, state)

    def prepare_input(self, loss: float | torch.Tensor) -> torch.Tensor | None:
        """Book-keep the loss of this step (stage, gamma, statistics) and return the net's input x_t.

        Returns None for a non-finite loss: the step then keeps the previous lr and the net's state is unchanged.
        Call exactly once per optimizer step.
        """
        loss = float(loss)
        self.num_observed += 1
        if not math.isfinite(loss):
            self.nonfinite_skips += 1
            warnings.warn(f"MLRSScheduler: non-finite training loss ({loss}) at step {self.num_observed}; "
                          "keeping the previous learning rate.", RuntimeWarning, stacklevel=2)
            return None
        if self.initial_loss is None:
            self.initial_loss = loss
            if self.gamma_rule == "auto":
                self._set_auto_gamma(loss)
        self.recent_losses.append(loss)
        x = self.normalize(loss)
        self.loss_ema = x if self.loss_ema is None else LOSS_EMA_BETA * self.loss_ema + (1 - LOSS_EMA_BETA) * x
        self._update_stage()
        return torch.tensor([[x]], dtype=torch.float32)

    def compute_lr(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """alpha_t = clamp(warmup * cooldown * gamma * A(x_t; h_{t-1}, theta)) for the current stage, differentiable
        in theta."""
        if self.scale is not None:
            self.gamma = self.scale.gamma
        output, state = self.schedule(x, self.hidden, stage=self.stage)
        self._computed_output = float(output.detach())
        warmup = min(1.0, self.num_observed / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        cooldown = cooldown_factor((self.num_training_steps or 0) - self.num_observed + 1, self.cooldown_steps)
        lr = (warmup * cooldown * self.gamma) * output.reshape(())
        if self.min_lr is not None or self.max_lr is not None:
            lr = lr.clamp(min=self.min_lr, max=self.max_lr)
        return lr, state

    def apply_lr(self, lr: torch.Tensor | float, state: State | None) -> float:
        """Write lr into the optimizer and carry the recurrent state forward (detached: one-step truncated BPTT)."""
        value = float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr)
        if not math.isfinite(value) or value < 0:
            self.nonfinite_skips += 1
            return self.hold_lr()
        value = self._bounded(value)  # again in float64: the float32 clamp can land a hair outside the bounds
        if state is not None:
            self.hidden = (state[0].detach(), state[1].detach())
        self.last_output = self._computed_output
        if self.last_output is not None and self.last_output > CEILING:
            self.steps_at_ceiling += 1
        self.set_lr(value)
        return value

    def read_from_start(self) -> None:
        """After a rewind (the model back at its starting weights): the net reads the loss curve from its start again:
        a fresh recurrent state and, with stage_by="loss", the first stage and no smoothed loss (the probe may have
        crossed a switch loss, and stages only move forward). The loss scale (the first loss) is kept."""
        self.hidden = self.schedule.init_state("cpu")
        if self.stage_by == "loss":
            self.stage, self.loss_ema = 0, None
            self.recent_losses.clear()

    def hold_lr(self) -> float:
        """Keep the lr already in the optimizer (clamped to the bounds); used when a step cannot be trusted."""
        lr = self.optimizer.param_groups[0]["lr"] / (self.group_ratios[0] or 1.0)
        lr = self._bounded(lr if math.isfinite(lr) and lr >= 0 else 0.0)
        self.set_lr(lr)
        return lr

    def _bounded(self, lr: float) -> float:
        return min(max(lr, self.min_lr or 0.0), self.max_lr if self.max_lr is not None else math.inf)

    def set_lr(self, lr: float) -> None:
        for group, ratio in zip(self.optimizer.param_groups, self.group_ratios):
            group["lr"] = lr * ratio
        self._last_lr = self.get_last_lr()

    def warn_if_at_ceiling(self) -> bool:
        """With a fixed gamma: warn (and return True) when A_t sat above CEILING for most of the steps."""
        if self.scale is not None or self.num_observed == 0 or self.steps_at_ceiling * 2 <= self.num_observed:
            return False
        warnings.warn(
            f"hf_mlrs: the schedule sat at its ceiling (A_t > {CEILING}) for {self.steps_at_ceiling} of "
            f"{self.num_observed} steps: gamma={self.gamma:.3g} is too small for this run, the net wanted a larger "
            "lr than gamma allows, and a schedule learned this way says little. Let hf_mlrs learn the scale "
            "(mlrs_gamma='learned', or MLRSCallback(gamma='learned', meta_dataset=...)), or raise gamma "
            "(learning_rate / mlrs_gamma).", UserWarning, stacklevel=2)
        return True

    # ---- helpers ------------------------------------------------------------------------------------------------

    def normalize(self, loss: float) -> float:
        """The net's input x_t (see MLRSNet's `input_normalization`)."""
        rule = self.schedule.input_normalization
        if rule == "log_num_labels":
            return loss / math.log(self.num_labels)
        if rule == "initial_loss":
            return loss / self.initial_loss if self.initial_loss > 0 else loss
        return loss

    def progress(self) -> float:
        """Fraction of training done before the current step."""
        return (self.num_observed - 1) / self.num_training_steps if self.num_training_steps else 0.0

    def _update_stage(self) -> None:
        if self.stage_by == "fixed":
            return
        if self.stage_by == "progress":
            new = max(k for k, start in enumerate(self.schedule.stage_starts) if start <= self.progress())
        else:  # "loss": the smoothed loss has fallen to where meta-training was when stage k began
            thresholds = self.schedule.stage_switch_losses.tolist()
            new = max([0] + [k for k in range(1, len(thresholds)) if self.loss_ema <= thresholds[k]])
        if new > self.stage:  # stages only move forward, as in the paper
            self.stage = new
            if self.gamma_rule == "auto":
                self._set_auto_gamma(sum(self.recent_losses) / len(self.recent_losses))

    def _set_auto_gamma(self, loss: float) -> None:
        gamma = paper_gamma(loss, self.num_labels)
        if math.isnan(gamma):
            if math.isnan(self.gamma):
                raise ValueError(
                    f"gamma='auto': the paper's heuristic gives no usable lr scale for loss {loss:.4g} and "
                    f"{self.num_labels} labels (it vanishes at loss * num_labels = 1). Set gamma explicitly."
                )
            warnings.warn(f"gamma='auto' is unusable at loss {loss:.4g}; keeping gamma={self.gamma:.4g}.",
                          RuntimeWarning, stacklevel=3)
            return
        self.gamma = gamma

    # ---- checkpointing: plain values and tensors only, so Trainer's torch.load(weights_only=True) works ---------

    def run_state(self) -> dict:
        """The per-run state as plain Python values (JSON-able; float32 values round-trip exactly)."""
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "hidden": self.hidden[0].tolist(),
            "cell": self.hidden[1].tolist(),
            "num_observed": self.num_observed,
            "stage": self.stage,
            "gamma": self.gamma,
            "initial_loss": self.initial_loss,
            "loss_ema": self.loss_ema,
            "recent_losses": list(self.recent_losses),
            "lrs": self.get_last_lr(),
            "nonfinite_skips": self.nonfinite_skips,
            "steps_at_ceiling": self.steps_at_ceiling,
            "scale": self.scale.state_dict() if self.scale is not None else None,
        }

    def load_run_state(self, state: dict) -> None:
        dtype = self.schedule.stages[0].head.weight.dtype
        self.last_epoch = state["last_epoch"]
        self.base_lrs = list(state["base_lrs"])
        self.hidden = (torch.tensor(state["hidden"], dtype=dtype), torch.tensor(state["cell"], dtype=dtype))
        self.num_observed = state["num_observed"]
        self.stage = state["stage"]
        self.gamma = state["gamma"]
        self.initial_loss = state["initial_loss"]
        self.loss_ema = state["loss_ema"]
        self.recent_losses = deque(state["recent_losses"], maxlen=RECENT_LOSSES)
        self.nonfinite_skips = state["nonfinite_skips"]
        self.steps_at_ceiling = state.get("steps_at_ceiling", 0)
        if self.scale is not None:
            if state.get("scale") is None:
                raise ValueError("MLRSScheduler: this checkpoint was written with a fixed gamma, and the run being "
                                 "resumed learns it (gamma='learned'). Resume with the gamma it was started with.")
            self.scale.load_state_dict(state["scale"])
        for group, lr in zip(self.optimizer.param_groups, state["lrs"]):
            group["lr"] = lr
        self._last_lr = self.get_last_lr()

    def state_dict(self) -> dict:
        """Run state, the net's weights and (while meta-training) the meta-learner's state: everything to resume."""
        state = {**self.run_state(), "schedule": {k: v.clone() for k, v in self.schedule.state_dict().items()}}
        if self.meta_learner is not None:
            state["meta_learner"] = self.meta_learner.state_dict()
        if self.meta_share is not None:
            state["meta_share"] = self.meta_share.state_dict()
        if self.rewind is not None:
            state["rewind"] = self.rewind.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "schedule" not in state or "hidden" not in state:
            raise ValueError(
                "MLRSScheduler: this scheduler state was not written by hf_mlrs (no 'schedule'/'hidden' entries); "
                "resume from a checkpoint of an MLRSTrainer run."
            )
        self.schedule.load_state_dict(state["schedule"])
        self.load_run_state(state)
        if self.meta_learner is not None and "meta_learner" in state:
            learner = state["meta_learner"]
            if "meta_source" not in learner and "meta_share" in state:  # written before the source was recorded:
                learner = {**learner, "meta_source": "held_out"}  # only held-out batches have a share to release
            self.meta_learner.load_state_dict(learner)
        if self.meta_share is not None and "meta_share" in state:
            self.meta_share.load_state_dict(state["meta_share"])
        if self.rewind is not None:
            if "rewind" not in state and not self.rewind.required:
                self.rewind.skip()  # a run started without the rewind (or before it existed) goes on without it
            elif "rewind" not in state:
                raise ValueError("MLRSScheduler: this checkpoint was written without mlrs_scale_rewind, so it holds "
                                 "no starting weights to rewind to. Resume with the settings the run was started "
                                 "with.")
            else:
                self.rewind.load_state_dict(state["rewind"])
