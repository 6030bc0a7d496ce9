"""Rewind: the learned scale's growth as a probe, and the run trained again from its first weights at the found scale.

A learned gamma that holds (`mlrs_scale_hold`) grows from a conservative start until the held-out hypergradient says
"large enough", then holds. The growth costs the run twice: its ramp trains slowly at lrs far below the one it finds,
and its last steps overshoot it before the stop is read (RESULTS.md 3b, session 11: 0.4% of the LM's loss each; and
a model trained from scratch decides in those steps whether it stalls on a plateau). Replayed at the found gamma from
the first step, the same LM runs end 2% lower (session 12). So when the growth stops, the
model's starting weights are put back and the optimizer's state is cleared: the steps of the growth become a probe
(they count in `max_steps`), and the run trains from its start at the found gamma, as a warmup-stable-decay with a
learned peak and no warmup. That pays where the ramp was wasted (the LM: -1.7% on 10 seeds) and costs the probe's
steps where they were a large part of the run and had trained the model (bbc and Fashion-MNIST probes of 24-38% of
the run: -1.6 to -9 points), so it happens only after a probe of at most `latest_step` steps (a share of the run,
`mlrs_scale_rewind_max_share`); a later stop goes on from where it is (RESULTS.md 3b, sessions 12-13).

The kept weights are one copy of the model's state (parameters and buffers) in CPU memory, until the rewind; they
ride in the scheduler's checkpointed state until then, so a run resumed before its rewind still rewinds to its own
start, on every process.
"""

from __future__ import annotations

import torch


class Rewind:
    """The model's starting state, and whether (and at which step) the run has been rewound to it."""

    def __init__(self, latest_step: int, required: bool = False):
        self.latest_step = latest_step  # the last optimizer step after which a stopped growth still rewinds
        self.required = required  # asked for explicitly: a checkpoint without its state cannot resume the run
        self.weights: dict[str, torch.Tensor] | None = None
        self.step: int | None = None  # the optimizer step (1-based, as the Trainer counts) after which it rewound
        self.skipped = False  # the growth never stopped before the cooldown: nothing to rewind, the copy is dropped

    @property
    def done(self) -> bool:
        return self.step is not None or self.skipped

    def due(self, step: int) -> bool:
        """Whether a growth that stopped after optimizer step `step` still rewinds (else the run goes on)."""
        return step <= self.latest_step

    def skip(self) -> None:
        self.weights, self.skipped = None, True

    def keep(self, model: torch.nn.Module) -> None:
        """Copy the model's state (parameters and buffers) to CPU memory: where the run will start again."""
        self.weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Put the kept state back (in place: the optimizer keeps its parameters) and forget the optimizer's state
        (Adam's moments of the probe's weights; a cleared state is initialised again at the next step)."""
        if self.weights is None:
            raise RuntimeError("hf_mlrs: rewind without kept weights (keep() was not called at the start of the run).")
        model.load_state_dict(self.weights)
        getattr(optimizer, "optimizer", optimizer).state.clear()  # under Accelerate's AcceleratedOptimizer too
        self.weights, self.step = None, step

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.weights = state["step"], state["skipped"], state["weights"]


def rewind_when_due(rewind: Rewind | None, scheduler, model: torch.nn.Module, optimizer, global_step: int) -> None:
    """After optimizer step `global_step` (MLRSTrainer and MLRSCallback alike): once the learned scale's growth has
    stopped and holds, within `rewind.latest_step`, put the starting weights back and let the net read the loss curve
    from its start; drop the kept copy as soon as no rewind can come any more."""
    if rewind is None or rewind.done:
        return
    learner = scheduler.meta_learner
    if learner.scale.settled and not learner.scale.holds:
        rewind.skip()  # a stop on noise, which the scale goes on tracking (confident_hold): nothing to rerun
    elif not rewind.due(global_step):
        rewind.skip()  # a long probe (or one still going): its steps trained the model, and going on is cheaper
        # than their rerun; the kept copy is dropped now, not when the growth stops
    elif learner.scale.settled:  # the scale was found, and holds: train again from the start with it
        learner.close_window()  # no meta-update may read a step of the probe after this
        rewind.apply(model, optimizer, global_step)
        scheduler.read_from_start()  # the net reads the loss curve from its start
    elif learner.finished(global_step):
        rewind.skip()  # growth reached the cooldown: nothing to rewind to any more
