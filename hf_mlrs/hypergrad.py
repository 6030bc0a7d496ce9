"""The exact first-order meta-update of MLR-SNet, done in place on the real optimizer step.

For an optimizer whose step is linear in the lr given its state (SGD with momentum/Nesterov/weight decay, Adam,
AdamW, RMSprop, Adagrad, Lion, ...), the step taken with lr alpha is w_new = w_old - alpha * d with d independent of
alpha and of the schedule net's parameters theta. The paper's one-step lookahead meta loss L_meta(w'(alpha)) then
has the exact gradient (no second-order term, no copy of the model):

    dL_meta/dalpha = <grad_w L_meta(w_new), dw/dalpha> = <g_meta, delta> / alpha        delta = w_new - w_old
    dL_meta/dtheta = dL_meta/dalpha * dalpha/dtheta                                     (backward through the net)

After one Adam step on theta the net gives alpha' for the same input, and the step already taken is rescaled,

    w = w_old + (alpha' / alpha) * delta,

which is exactly the step the updated net would have taken: the paper's order (update the net, then step with it).
Under data parallelism each rank forms its local <g_meta, delta> (delta is identical on every rank) and only that
scalar and the meta loss are averaged: no second all-reduce of full gradients.

Under FSDP2 (`fully_shard`, DTensor parameters) nothing needs a whole parameter: the dot product is a sum over
parameter entries, and each rank holds the shard of w, of delta and (after the reduce-scatter of the meta backward)
of g_meta for the same entries. Every buffer and vector operation here runs on the local shards (`to_local()`, a
view: in-place updates reach the parameter), and the per-shard partial sums are summed across ranks: exact, with
one shard-sized buffer per rank and only scalars communicated.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist

from .modeling import MLRSNet
from .scale import LearnedScale


class MetaLearner:
    """Meta-trains the live (last) stage of an MLRSNet, and/or a learned lr scale, from hypergradients.

    Meta-updates come at the end of *windows* of `horizon` optimizer steps: the window's first step keeps w_start
    (the one buffer), its last step (the due step) measures the held-out loss at w_end and the dot product
    <g_meta(w_end), w_end - w_start>. With `horizon=1` that is the paper's exact one-step lookahead.

    Args:
        schedule (`MLRSNet`): the net; its last stage is trained, earlier stages receive snapshots.
        params (`list[torch.Tensor]`): the parameters the task optimizer steps (the lookahead is taken over them).
        interval (`int`): a meta-update every `interval` optimizer steps (paper: t_val = 300).
        meta_lr, weight_decay (`float`): Adam on theta (paper: 1e-3, 1e-4).
        max_steps (`int`): length of the run, used to place the stage snapshots.
        horizon (`int`, defaults to `1`): steps per window (<= every interval in use).
        train_net (`bool`, defaults to `True`): False keeps the net frozen (transfer with a learned scale).
        scale (`LearnedScale`, *optional*): the learned lr scale, updated from the same dot product.
        settle_interval (`int`, *optional*): with a learned scale, the interval used until the scale has settled
            (see `LearnedScale.settled`); `interval` after that. A window is never longer than its interval.
        stop_step (`int`, *optional*): no meta-update from this (0-based) step on, e.g. during a final cooldown.
        hold (`bool`, defaults to `False`): with a learned scale, no meta-update once it holds (see
            `LearnedScale.holds`: it has settled, i.e. its growth has stopped or, without a growth phase, its signal
            no longer agrees in sign; with `confident_hold`, only after a confident growth): gamma and the net keep
            their values, and only `stop_step`'s cooldown changes the lr after.
        take_snapshots (`bool`, defaults to `True`): copy the live net into the earlier stages at fractions of this
            run (the paper's epoch-1/100/200 nets). False leaves the earlier stages alone (the stage switch losses
            are still recorded): a net meta-trained over several runs gets its snapshots from the caller.
    """

    def __init__(
        self,
        schedule: MLRSNet,
        params: list[torch.Tensor],
        *,
        interval: int,
        meta_lr: float,
        weight_decay: float,
        max_steps: int,
        horizon: int = 1,
        train_net: bool = True,
        scale: LearnedScale | None = None,
        settle_interval: int | None = None,
        stop_step: int | None = None,
        take_snapshots: bool = True,
        hold: bool = False,
        track_batch_share: float = 1.0,
    ):
        if not 1 <= horizon <= interval:
            raise ValueError(f"MetaLearner: horizon={horizon} must be between 1 and the meta interval ({interval}).")
        self.schedule = schedule
        self.params = list(params)
        # Under FSDP2 the process group the parameters are sharded over, whose partial sums must be added up.
        self.shard_group = sharding_group(self.params)
        self.interval = interval
        self.settle_interval = settle_interval
        self.hold = hold
        self.track_batch_share = track_batch_share
        self.horizon = horizon
        self.max_steps = max_steps
        self.train_net = train_net
        self.scale = scale
        self.take_snapshots = take_snapshots
        self.meta_optimizer = (torch.optim.Adam(schedule.stages[-1].parameters(), lr=meta_lr,
                                                weight_decay=weight_decay) if train_net else None)
        self.delta: list[torch.Tensor] | None = None  # the one extra parameter-sized buffer: w_start, then delta
        self.window_open = False  # whether delta holds w_start of the current window (not after a resume)
        self.meta_source = None  # "held_out" or "next_batch", set by MetaStep; checked against a resumed checkpoint
        self.window_lrs: list[torch.Tensor] = []  # alpha_j of the window's earlier steps, with graphs to theta
        # With the next training batch as the meta batch (MetaStep(next_batch=True)): alpha_t of the step whose delta
        # waits in the buffer for the next step's gradient; None when no such update is pending.
        self.pending_alpha: float | None = None
        self.stop_step = stop_step if stop_step is not None else max_steps
        self.next_due = self.current_interval() - 1  # 0-based step of the next meta-update
        self.window_length = min(horizon, self.current_interval())  # steps of the window ending at next_due
        self.first_due = self.next_due + 1  # 1-based step of the first meta-update: the first snapshot
        self.num_meta_steps = 0  # due steps so far (meta batch index), skipped ones included
        self.num_updates = 0
        self.num_skipped = 0

    def current_interval(self) -> int:
        if self.scale is not None and self.settle_interval and not self.scale.settled:
            return self.settle_interval
        if self.scale is not None and self.hold and self.scale.holds:
            # Hold (RESULTS.md 3b, session 7): after the one-step signal has found the largest lr that still helps,
            # it keeps pulling the lr down, earlier than a whole run wants (the short-horizon bias of Wu et al. 2018)
            return self.max_steps + 1  # never due again in this run
        return self.interval

    def meta_batch_share(self) -> float:
        """The share of the meta batch this meta step uses: `track_batch_share` while a frozen net's learned scale
        tracks (its growth over and not held), the whole batch otherwise."""
        tracking = not self.train_net and self.scale is not None and self.scale.settled
        return self.track_batch_share if tracking else 1.0

    def finished(self, step: int) -> bool:
        """Whether no meta-update is left in the run from 0-based step `step` on (a scale that holds, a cooldown)."""
        return step >= self.stop_step or self.next_due >= self.stop_step

    def is_due(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) ends a window and carries a meta-update."""
        return step == self.next_due < self.stop_step

    def window_starts(self, step: int) -> bool:
        return step == self.next_due - self.window_length + 1 and self.next_due < self.stop_step

    def in_window(self, step: int) -> bool:
        return self.next_due - self.window_length < step <= self.next_due < self.stop_step

    def advance(self) -> int:
        """After a due step (updated or skipped): the index of its meta batch; schedules the next window."""
        index = self.num_meta_steps
        self.num_meta_steps += 1
        self.window_lrs = []
        interval = self.current_interval()
        self.next_due += interval
        self.window_length = min(self.horizon, interval)
        return index

    # ---- around the real optimizer step ------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards: dot products are partial sums, to be summed across ranks."""
        return self.shard_group is not None

    def local_params(self) -> list[torch.Tensor]:
        """This rank's part of each parameter: the parameter itself, or its local shard (a view) under FSDP2."""
        return [local_tensor(p) for p in self.params]

    @torch.no_grad()
    def remember_weights(self) -> None:
        """Before the step: keep w_old (of this rank's shards only, under FSDP2: never a gathered parameter)."""
        params = self.local_params()
        if self.delta is None:
            self.delta = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self.delta, params)
        self.window_open = True

    def close_window(self) -> None:
        """The buffer's content is spent: the next meta-update needs a new remember_weights()."""
        self.window_open = False
        self.pending_alpha = None

    @torch.no_grad()
    def weights_to_delta(self) -> None:
        """After the step: turn the buffer into delta = w_new - w_old, in place."""
        torch._foreach_sub_(self.delta, self.local_params())
        torch._foreach_neg_(self.delta)

    @torch.no_grad()
    def relative_update(self) -> float:
        """||delta|| / ||w_old||, in float64, with w_old = w - delta expanded in dot products (no extra buffer):
        how far the step(s) since remember_weights() moved the weights, relative to where they started.
        Under FSDP2 the three sums are per-shard partial sums: one all-reduce of three scalars completes them."""
        params = self.local_params()
        delta_sq = sum(float(torch.dot(d.reshape(-1), d.reshape(-1))) for d in self.delta)
        cross = sum(float(torch.dot(p.reshape(-1), d.reshape(-1))) for p, d in zip(params, self.delta))
        new_sq = sum(float(torch.dot(p.reshape(-1), p.reshape(-1))) for p in params)
        if self.sharded:
            delta_sq, cross, new_sq = self.sum_over_shards(torch.tensor([delta_sq, cross, new_sq])).tolist()
        old_sq = new_sq - 2 * cross + delta_sq
        return math.sqrt(delta_sq / old_sq) if old_sq > 0 else math.inf

    @torch.no_grad()
    def local_dot(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """<g_meta, delta> over this rank's parameters (its shards under FSDP2, where `grads` may be DTensors):
        per tensor in at least float32, summed in float64."""
        total = torch.zeros((), dtype=torch.float64, device=self.delta[0].device)
        for g, d in zip(grads, self.delta):
            if g is not None:
                g = local_tensor(g)
                if g.dtype in (torch.float16, torch.bfloat16):
                    g, d = g.float(), d.float()
                total += torch.dot(g.reshape(-1), d.reshape(-1)).to(torch.float64)
        return total

    def update_schedule(self, lr: torch.Tensor, dot: float) -> None:
        """One Adam step on theta from the window's dot product <g_meta, Delta>.

        horizon 1: dL/dtheta = dL/dalpha * dalpha/dtheta with dL/dalpha = dot / alpha (exact, paper).
        horizon k: the window is treated as taken with a shared scale c, dL/dlog(c) = dot, shared equally among
        its steps: dL/dtheta = sum_j (dot / k) * dlog(alpha_j)/dtheta (first-order in the steps' directions).
        """
        lrs = [x for x in self.window_lrs + [lr] if x.requires_grad]  # a clamped lr has no gradient
        self.meta_optimizer.zero_grad(set_to_none=True)
        share = len(self.window_lrs) + 1
        for x in lrs:
            x.backward(torch.tensor(dot / share / float(x.detach()), dtype=x.dtype))
        self.meta_optimizer.step()
        self.num_updates += 1

    @torch.no_grad()
    def rescale(self, ratio: float) -> None:
        """w = w_old + ratio * delta, from w = w_old + delta: the step taken becomes a step with lr alpha'."""
        if ratio != 1.0:
            torch._foreach_add_(self.local_params(), self.delta, alpha=ratio - 1.0)

    @torch.no_grad()
    def sum_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        """Partial sums (float64, one entry per quantity) of this rank's shards, summed over the shard group.

        Sent from the device the shards live on (NCCL needs CUDA tensors, gloo takes CPU ones); returned on the CPU.
        """
        device = self.delta[0].device if self.delta else local_tensor(self.params[0]).device
        values = values.to(device=device, dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.shard_group)
        return values.cpu()

    # ---- stage snapshots (the paper's epoch-1/100/200 nets) ----------------------------------------------------

    def snapshot_steps(self) -> list[int]:
        """Global step (1-based) after which stage k < n-1 receives a copy of the live net.

        As the paper's released nets: the first right after the first meta-update (epoch 1 of 200), the others at
        k / (n - 1) of training; the last stage is the live net itself, i.e. the net at the end.
        """
        n = self.schedule.num_stages
        steps = [min(self.first_due, self.max_steps)]
        steps += [max(1, round(k / (n - 1) * self.max_steps)) for k in range(1, n - 1)]
        return steps[: n - 1]

    @torch.no_grad()
    def record_stages(self, global_step: int, loss_ema: float | None) -> None:
        """At the end of step `global_step` (1-based): take due snapshots and record stage switch losses."""
        live = self.schedule.stages[-1].state_dict()
        for k, at in enumerate(self.snapshot_steps() if self.take_snapshots else []):
            if global_step == at:
                self.schedule.stages[k].load_state_dict(live)
        # Stage k's switch loss: the smoothed loss when meta-training reached stage k's share of training.
        before, now = (global_step - 1) / self.max_steps, global_step / self.max_steps
        for k, start in enumerate(self.schedule.stage_starts):
            if k > 0 and before < start <= now and loss_ema is not None:
                self.schedule.stage_switch_losses[k] = loss_ema

    # ---- checkpointing ------------------------------------------------------------------------------------------

    def state_dict(self, include_delta: bool = True) -> dict:
        """Counters and the meta-optimizer's state; while a next-batch update is pending, its alpha and (unless
        `include_delta=False`, for a caller that saves the tensors itself) a CPU copy of its delta."""
        state = {"next_due": self.next_due, "window_length": self.window_length,
                 "num_meta_steps": self.num_meta_steps, "num_updates": self.num_updates,
                 "num_skipped": self.num_skipped, "meta_source": self.meta_source}
        if self.meta_optimizer is not None:
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        if self.pending_alpha is not None:  # a next-batch update waits for the next step's gradient: its delta too
            state["pending_alpha"] = self.pending_alpha
            if include_delta:
                state["pending_delta"] = [d.detach().to("cpu", copy=True) for d in self.delta]
        return state  # the scale's state rides in the scheduler's run state

    def load_meta_optimizer_state(self, state: dict) -> None:
        """Continue from another run's meta-optimizer state (Adam's moments and step count), keeping this run's
        meta lr and weight decay."""
        if self.meta_optimizer is None:
            raise ValueError("MetaLearner: the net is frozen here (train_net=False): no meta-optimizer to load.")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.meta_optimizer.param_groups]
        self.meta_optimizer.load_state_dict(copy.deepcopy(state))
        for group, kept in zip(self.meta_optimizer.param_groups, settings):
            group.update(kept)

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint written before the source was recorded (session 27) says so by a pending next-batch update.
        saved = state.get("meta_source") or ("next_batch" if state.get("pending_alpha") is not None else None)
        if saved and self.meta_source and saved != self.meta_source:
            names = {"held_out": "held-out meta batches", "next_batch": "the next training batch"}
            raise ValueError(
                f"hf_mlrs: the checkpoint being resumed learned from {names[saved]}, and this run would learn from "
                f"{names[self.meta_source]}: its data, order and pending state would not continue. Resume as the "
                f"run started: set mlrs_meta_source='{saved}' in MLRSTrainer (unset, a frozen schedule with a "
                "learned gamma and no meta_dataset now learns from the next batch; it used held-out batches "
                "before), or pass MLRSCallback the same meta_dataset (or none).")
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.next_due, self.num_meta_steps = state["next_due"], state["num_meta_steps"]
        self.window_length = state["window_length"]
        self.num_updates = state["num_updates"]
        self.num_skipped = state["num_skipped"]
        self.pending_alpha = state.get("pending_alpha")
        if self.pending_alpha is not None:
            if state.get("pending_delta") is None:
                raise ValueError("hf_mlrs: this checkpoint has a next-batch meta-update pending but not its step "
                                 "(delta); resume from the whole checkpoint folder hf_mlrs wrote.")
            saved, params = state["pending_delta"], self.local_params()
            if [tuple(d.shape) for d in saved] != [tuple(p.shape) for p in params]:
                raise ValueError(f"hf_mlrs: the pending next-batch step in this checkpoint has {len(saved)} tensors "
                                 f"whose shapes do not match the {len(params)} trained parameters: it was written "
                                 "for another model or another set of trainable parameters. Resume with the model "
                                 "and optimizer the run started with.")
            self.delta = [d.to(p.device, p.dtype) for d, p in zip(saved, params)]
            self.window_open = True


# ---- FSDP2 shards ---------------------------------------------------------------------------------------------------

def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def sharding_group(params: list[torch.Tensor]):
    """The process group FSDP2 shards these parameters over, or None when none is a DTensor (one process, DDP).

    A dot product summed over the shards of one group is exact only if every parameter is sharded over that same
    1-D mesh (plain FSDP2). Replicated or 2-D placements (HSDP, tensor parallel) would count entries several times.
    """
    sharded = [p for p in params if hasattr(p, "device_mesh") and hasattr(p, "placements")]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError("hf_mlrs: some of the optimizer's parameters are FSDP2 shards (DTensor) and some are not; "
                         "meta-training needs all of them sharded by fully_shard (or none).")
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(placement.is_shard() for placement in p.placements):
            raise ValueError(
                f"hf_mlrs: meta-training supports parameters sharded by FSDP2 over one 1-D device mesh; got "
                f"placements {p.placements} over a {p.device_mesh.ndim}-D mesh. HSDP and tensor parallelism would "
                "count replicated entries of the hypergradient more than once: use plain FSDP2 or DDP."
            )
    return mesh.get_group()


# ---- which optimizers the lookahead is exact for ---------------------------------------------------------------

_LINEAR_TORCH = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.SparseAdam,
)
# Third-party families whose update is lr * (a direction computed without the lr).
_LINEAR_MODULES = ("bitsandbytes", "lion_pytorch", "torchao", "galore_torch", "apollo_torch", "grokadamw", "optimi")
_NONLINEAR = {
    "schedulefree": "Schedule-Free interpolates and averages iterates with lr-dependent weights",
    "prodigyopt": "Prodigy estimates its own step size, so the lr is not a linear scale of the step",
    "dadaptation": "D-Adaptation estimates its own step size, so the lr is not a linear scale of the step",
    "lomo_optim": "LOMO steps inside backward, before the schedule sets the lr",
}
_NONLINEAR_TORCH = {
    torch.optim.ASGD: "ASGD's averaging weights depend on the lr",
    torch.optim.Rprop: "Rprop adapts its own step sizes and uses the lr only at the start",
    torch.optim.LBFGS: "LBFGS runs a line search",
}


def lr_linearity_problem(optimizer_cls: type, defaults: dict | None = None) -> str | None:
    """Why MLR-SNet's exact lookahead does not hold for this optimizer, or None if its step is linear in lr."""
    defaults = defaults or {}
    module = optimizer_cls.__module__.split(".")[0]
    if module in _NONLINEAR:
        return _NONLINEAR[module]
    for cls, why in _NONLINEAR_TORCH.items():
        if issubclass(optimizer_cls, cls):
            return why
    if optimizer_cls.__name__ == "Adafactor":
        if defaults.get("relative_step", True) or defaults.get("warmup_init", False):
            return "Adafactor with relative_step=True computes its own lr (pass relative_step=False and an lr)"
        return None
    if optimizer_cls.__name__ == "LayerWiseDummyOptimizer":
        return "layer-wise optimizers step inside backward, before the schedule sets the lr"
    if issubclass(optimizer_cls, _LINEAR_TORCH) or module in _LINEAR_MODULES:
        return None
    return (
        f"{optimizer_cls.__module__}.{optimizer_cls.__name__} is not known to hf_mlrs. If its step is "
        "w - lr * d with d independent of the lr, set mlrs_assume_lr_linear=True"
    )
