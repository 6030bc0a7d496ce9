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
"""

from __future__ import annotations

import torch

from .modeling import MLRSNet


class MetaLearner:
    """Meta-trains the live (last) stage of an MLRSNet from hypergradients of a held-out loss.

    Args:
        schedule (`MLRSNet`): the net; its last stage is trained, earlier stages receive snapshots.
        params (`list[torch.Tensor]`): the parameters the task optimizer steps (the lookahead is taken over them).
        interval (`int`): a meta-update every `interval` optimizer steps (paper: t_val = 300).
        meta_lr, weight_decay (`float`): Adam on theta (paper: 1e-3, 1e-4).
        max_steps (`int`): length of the run, used to place the stage snapshots.
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
    ):
        self.schedule = schedule
        self.params = list(params)
        self.interval = interval
        self.max_steps = max_steps
        self.meta_optimizer = torch.optim.Adam(schedule.stages[-1].parameters(), lr=meta_lr, weight_decay=weight_decay)
        self.delta: list[torch.Tensor] | None = None  # the one extra parameter-sized buffer: w_old, then delta
        self.num_updates = 0
        self.num_skipped = 0

    def is_due(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) carries a meta-update: every `interval`-th step, as the paper."""
        return (step + 1) % self.interval == 0

    # ---- around the real optimizer step ------------------------------------------------------------------------

    @torch.no_grad()
    def remember_weights(self) -> None:
        """Before the step: keep w_old."""
        if self.delta is None:
            self.delta = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(self.delta, self.params)

    @torch.no_grad()
    def weights_to_delta(self) -> None:
        """After the step: turn the buffer into delta = w_new - w_old, in place."""
        torch._foreach_sub_(self.delta, self.params)
        torch._foreach_neg_(self.delta)

    @torch.no_grad()
    def local_dot(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """<g_meta, delta> over this rank's parameters: per tensor in at least float32, summed in float64."""
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for g, d in zip(grads, self.delta):
            if g is not None:
                if g.dtype in (torch.float16, torch.bfloat16):
                    g, d = g.float(), d.float()
                total += torch.dot(g.reshape(-1), d.reshape(-1)).to(torch.float64)
        return total

    def update_schedule(self, lr: torch.Tensor, hypergrad: float) -> None:
        """One Adam step on theta along dL_meta/dtheta = hypergrad * dalpha/dtheta."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        if lr.requires_grad:  # a clamped lr has no gradient: the meta step then only applies weight decay
            lr.backward(torch.tensor(hypergrad, dtype=lr.dtype))
        self.meta_optimizer.step()
        self.num_updates += 1

    @torch.no_grad()
    def rescale(self, ratio: float) -> None:
        """w = w_old + ratio * delta, from w = w_old + delta: the step taken becomes a step with lr alpha'."""
        if ratio != 1.0:
            torch._foreach_add_(self.params, self.delta, alpha=ratio - 1.0)

    # ---- stage snapshots (the paper's epoch-1/100/200 nets) ----------------------------------------------------

    def snapshot_steps(self) -> list[int]:
        """Global step (1-based) after which stage k < n-1 receives a copy of the live net.

        As the paper's released nets: the first right after the first meta-update (epoch 1 of 200), the others at
        k / (n - 1) of training; the last stage is the live net itself, i.e. the net at the end.
        """
        n = self.schedule.num_stages
        steps = [min(self.interval, self.max_steps)]
        steps += [max(1, round(k / (n - 1) * self.max_steps)) for k in range(1, n - 1)]
        return steps[: n - 1]

    @torch.no_grad()
    def record_stages(self, global_step: int, loss_ema: float | None) -> None:
        """At the end of step `global_step` (1-based): take due snapshots and record stage switch losses."""
        live = self.schedule.stages[-1].state_dict()
        for k, at in enumerate(self.snapshot_steps()):
            if global_step == at:
                self.schedule.stages[k].load_state_dict(live)
        # Stage k's switch loss: the smoothed loss when meta-training reached stage k's share of training.
        before, now = (global_step - 1) / self.max_steps, global_step / self.max_steps
        for k, start in enumerate(self.schedule.stage_starts):
            if k > 0 and before < start <= now and loss_ema is not None:
                self.schedule.stage_switch_losses[k] = loss_ema

    # ---- checkpointing ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.num_updates = state["num_updates"]
        self.num_skipped = state["num_skipped"]


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
