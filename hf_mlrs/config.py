"""MLRSTrainingArguments: `transformers.TrainingArguments` plus the `mlrs_` fields of MLR-SNet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .modeling import INPUT_NORMALIZATIONS
from .scale import LearnedScale


# args.optim values whose optimizer is not linear in lr (see hypergrad.lr_linearity_problem for classes).
NONLINEAR_OPTIM_NAMES = {
    "schedule_free_adamw": "Schedule-Free interpolates and averages iterates with lr-dependent weights",
    "schedule_free_radam": "Schedule-Free interpolates and averages iterates with lr-dependent weights",
    "schedule_free_sgd": "Schedule-Free interpolates and averages iterates with lr-dependent weights",
    "lomo": "LOMO steps inside backward, before the schedule sets the lr",
    "adalomo": "AdaLomo steps inside backward, before the schedule sets the lr",
}

# The final cooldown share with a learned gamma unless one is given (MLRSTrainer and MLRSCallback alike): the learned
# scale holds its lr, and a one-step lookahead does not anneal by itself in runs of a few hundred steps (RESULTS 3b).
LEARNED_GAMMA_COOLDOWN = 0.2

# The learned scale's linear growth per meta-update, in multiples of its start (`mlrs_scale_growth_linear`). A frozen
# schedule that holds its scale after a confident growth grows twice as fast: its output is fixed, where a net
# meta-trained from its initial output (0.72) rises to ~1 in the first steps and speeds the lr's growth by ~1.4x; and
# from scratch the stop must come before the loss plateau, where the one-step signal is small and noisy and a late
# stop held a byte-level LM at 3-4e-3, which stalled 7 seeds in 10 (RESULTS.md section 8, session 22).
GROWTH_LINEAR = 1.35
CONFIDENT_GROWTH_LINEAR = 2.7
# ... and holds 40% below its stop (`mlrs_scale_margin`; 20% where the net is meta-trained): the stop is read in the
# first fall of the loss, and a model trained from scratch wants less for the rest of the run the larger it is (a 5x
# larger GPT-2 held at 0.8 x its stop, 2.0-2.4e-3 where its tuned peak is 1e-3, stalled on 2 seeds of 3).
CONFIDENT_MARGIN = 0.6


def resolve_cooldown(given: float | None, learned_gamma: bool, recorded: float) -> float:
    """The run's final cooldown share, one rule for MLRSTrainer and MLRSCallback: the one given; else
    LEARNED_GAMMA_COOLDOWN with a learned gamma; else `recorded`, the one the applied schedule records (what its
    transfer was measured with; 0 when none, or when meta-training)."""
    if given is not None:
        return given
    return LEARNED_GAMMA_COOLDOWN if learned_gamma else recorded


@dataclass
class MLRSTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for [`MLRSTrainer`]: every field of `TrainingArguments`, plus:

    > The schedule (both modes)

    mlrs_gamma (`str` or `float`, *optional*):
        The lr scale gamma: lr = gamma * A_t with A_t in (0, 1). `"learned"` (log(gamma) adapted online from the
        held-out hypergradient, see the `mlrs_scale_*` fields), a number, `"auto"` (the paper's
        heuristic from the initial loss and the number of labels; SGD only), or unset to use `learning_rate`
        (applying a schedule frozen: `learning_rate / schedule.start_output`, so the schedule starts at
        `learning_rate`).
    mlrs_scale_lr (`float`, *optional*, defaults to `0.1`):
        With a learned gamma: the Adam step on log(gamma); one meta-update changes gamma by about exp(mlrs_scale_lr)
        at most (hard clip: a factor 1.65).
    mlrs_scale_start_update (`float`, *optional*, defaults to `1e-3`):
        With a learned gamma: where it starts, relative to the model rather than to `learning_rate`: the first step
        is rescaled (exactly) so that it moves the weights by this fraction of their norm, and gamma with it. Below
        the lr that wrecks a pretrained model whatever `learning_rate` says (2-layer MiniLM collapses near 5e-3 of
        its norm per step), yet where the held-out signal is measurable; `None` starts at `learning_rate`.
    mlrs_scale_growth (`float`, *optional*, defaults to `0.1`):
        With a learned gamma: its growth per meta-update (a factor exp(0.1) = 1.105) until the held-out
        hypergradient, averaged, says that a larger lr hurts; 0 disables the growth phase. Slow enough to let the
        first, fast fall of the loss pass: there a one-step lookahead favours a large lr that a model trained from
        scratch does not recover from (x1.22 overshot 5-10x on a byte-level LM, RESULTS.md 3b).
    mlrs_scale_growth_linear (`float`, *optional*):
        With a learned gamma: once 5 held-out hypergradients in a row say "larger" (the first time, only if they
        have said so from the first meta-update on: on a pretrained model a later streak is its head learning, and
        a linear step there overshot; RESULTS.md 3b session 23), each growth update adds this multiple of the start
        to gamma instead of multiplying it by exp(`mlrs_scale_growth`): a linear warmup while the signal agrees,
        exponential growth when it does not. An exponential ramp spends most of the growth
        phase at a tiny lr (1.7 accuracy points on Fashion-MNIST against a linear ramp to the same peak, RESULTS.md
        3b session 8); 0 keeps the exponential growth (the default before session 9). Defaults to 1.35, and to 2.7
        for a frozen schedule whose scale holds after a confident growth (`mlrs_scale_hold`'s default there).
    mlrs_scale_min, mlrs_scale_max (`float`, *optional*, defaults to `1e-8`, `10.0`):
        With a learned gamma: hard bounds on it.
    mlrs_horizon (`int`, *optional*, defaults to `1`):
        Optimizer steps per meta-update window: the meta loss is measured after the window and its gradient taken
        along the window's whole displacement (1: the paper's exact one-step lookahead; longer windows are
        first-order in the steps' directions; on the benchmarks they did not help, RESULTS.md 3b). At most the meta
        interval. With a learned gamma a window is at most `mlrs_settle_interval` steps while the scale grows, and a
        scale that holds takes no meta step after: such a run refuses a horizon it would never use.
    mlrs_scale_growth_stop (`float`, *optional*, defaults to `0.3`):
        With a learned gamma: growth stops once Adam's normalised first moment of dL/dlog(gamma), m / sqrt(v) in
        [-1, 1], exceeds this (0: as soon as the averaged hypergradient says a larger lr hurts; on a pretrained
        model its first few values are noise, and 0 stopped one bbc run at a third of the lr it needed).
    mlrs_scale_stop_votes (`int`, *optional*, defaults to `3`):
        With a learned gamma: growth also stops once this many of the last `mlrs_scale_stop_votes + 1` raw
        hypergradients say a larger lr hurts (0: only the averaged one counts; the hypergradient shrinks 10-100x
        while the loss first falls, and its large early values hold the average negative for dozens of updates
        after the raw signal has turned: an LM's gamma grew 13x past that point, RESULTS.md 3b).
    mlrs_scale_min_growth (`int`, *optional*, defaults to `10`):
        With a learned gamma: the update from which a stop can end the growth phase (10: after 9 growth updates, at
        least x2.5 the start; the backoff may still return to the last gamma the raw signal called too small). The
        start is deliberately conservative (5x below the lr that wrecks a pretrained MiniLM),
        and on a pretrained model the first raw hypergradients are noise: with 3, stop votes read from them ended
        the growth at its third update on 2 of 10 bbc seeds, which then trained at the start's lr (0.73 and 0.79
        against 0.92 tuned; RESULTS.md 3b, session 10). From scratch the signal turns after 30-50 updates.
    mlrs_scale_backoff (`float`, *optional*, defaults to `0.9`):
        With a learned gamma: when its growth stops, gamma returns to the last value whose raw hypergradient still
        said "larger" (down by at most this much in log, never below its start), and the Adam moments of its
        tracking restart there (0: no return, no restart).
    mlrs_scale_margin (`float`, *optional*):
        With a learned gamma: when its growth stops, gamma (after the backoff) is multiplied by this factor in
        (0, 1]. The one-step signal stops growth near the largest lr that helps right now, the edge of stability of
        a model trained from scratch: a byte-level LM held there spiked on 1 seed in 3-5, held 15-20% lower on none
        (RESULTS.md 3b, session 9). Defaults to 0.8 when the scale then holds (`mlrs_scale_hold`), 0.6 for a frozen
        schedule's hold after a confident growth (the larger a model trained from scratch, the further below the
        stop its best lr; RESULTS.md section 8, session 22), 1 (none) when it tracks the signal: tracking moves it
        anyway, and a frozen shape that decays the lr under-trains a pretrained model with a smaller scale.
    mlrs_scale_hold (`bool`, *optional*):
        With a learned gamma: once it has settled (its growth has stopped; with `mlrs_scale_growth=0`, once its
        signal no longer agrees in sign), no more meta steps: gamma and the net hold until the cooldown anneals the
        lr (a warmup-stable-decay whose peak is learned). The one-step signal finds the largest lr that still helps,
        then the net it meta-trains pulls the lr down earlier than a whole run wants (short-horizon bias). False:
        meta steps every `mlrs_meta_interval` steps to the cooldown, the scale tracking the signal and the net
        learning its shape (what a schedule meant for reuse needs: `recipes/meta_train.py` and
        `MLRSMultiTaskTrainer` set it). Defaults to True when the net is meta-trained. When a frozen `schedule` is
        applied it defaults to holding (and rewinding, `mlrs_scale_rewind`) only after a *confident* growth, one
        whose signal said "larger" from its first meta-update on, 5 times or more (a model trained from scratch:
        the stop marks the largest lr that still helps, and tracking pushed a byte-level LM up on its loss plateau
        into stalls), and to tracking after a stop on noise (a pretrained model near its start, whose stop can come
        far too early, or whose head, learning fast after a noisy start, says "larger" for a while), with a
        faster linear growth (`mlrs_scale_growth_linear` 2.7; RESULTS.md section 8, session 22). True holds after
        any stop, False always tracks (the default with a frozen schedule before session 22; 3b, rows 27-29).
    mlrs_scale_rewind (`bool`, *optional*):
        With a learned gamma that holds: when its growth stops, put the model's starting weights back and clear the
        optimizer's state, so the run trains from its start at the found gamma and the growth was only a probe (its
        steps count in `max_steps`; 10-60 in the benchmarks). Only when the probe took at most
        `mlrs_scale_rewind_max_share` of the run: a short probe costs little, and the held lr from the first step
        beat the growth's ramp (a model trained from scratch decides in those steps whether it stalls on a
        plateau); a long probe's steps had trained the model (RESULTS.md 3b, sessions 12-13). Keeps one copy of the
        model's state in CPU memory (and in checkpoints) until the probe ends. Defaults to on where it applies (a
        learned gamma that holds, not under FSDP2); False skips the copy. With a frozen schedule and
        `mlrs_scale_hold` unset, the hold, and so the rewind, comes only after a confident growth: a stop on noise
        goes on tracking without a rewind, even with `mlrs_scale_rewind=True`.
    mlrs_scale_rewind_max_share (`float`, *optional*, defaults to 0.2):
        The longest probe, as a share of the run's optimizer steps, after which the run still rewinds; a growth that
        stops later goes on from where it is. 1.0 rewinds after any probe.
    mlrs_scale_track_batch_share (`float`, *optional*, defaults to 1.0):
        With a frozen schedule and a learned gamma that tracks (after a stop on noise), from held-out batches: the
        share of each meta batch its meta steps use (its first examples; the growth and its stop always read the
        whole batch). 0.5
        halves the tracking meta steps' cost: the no-lr path's whole run went from 1.34x to 1.26x a plain Trainer
        run in `benchmarks/overhead.py`. Its quality cost is unresolved: on bbc, 20 seeds paired, -0.17 +- 0.31
        points (level), but -2.9 points at the worst start of the 3-seed protocol (seeds 0-2 lose 0.8-2.4 each), so
        it is not the default (RESULTS.md 3b, session 24).
    mlrs_meta_source (`str`, *optional*):
        Where the hypergradient's gradient comes from. `"held_out"`: the paper's meta loss, one forward and backward
        of a held-out meta batch after the step (`mlrs_meta_fraction` of the training data is held out, or
        `meta_dataset`). `"next_batch"` (a frozen schedule with a learned gamma only): the next step's training
        gradient, which the Trainer computes anyway, <g_{t+1}, w_{t+1} - w_t> (the hypergradient of Baydin et al.
        2018): no meta batch, no held-out data, no extra forward or backward; the update to gamma applies from that
        next step on instead of rescaling the step just taken. Unset (the default): `"next_batch"` where it applies
        (a frozen `schedule`, `mlrs_gamma="learned"`, no `meta_dataset`, `mlrs_horizon=1`, not FSDP2), where it
        costs 1.01x a plain run against 1.35x and scored level with held-out batches on 10 seeds of four tasks
        (RESULTS.md 3b, sessions 25-27); `"held_out"` everywhere else.
    mlrs_meta_eval_mode (`bool`, *optional*, defaults to `False`):
        Measure the meta loss in eval mode (BatchNorm running statistics, no dropout) instead of train mode
        (held-out batches only).
    mlrs_cooldown_fraction (`float`, *optional*):
        Share of training, at the end, over which the lr decays linearly towards 0 (as warmup-stable-decay does);
        no meta-update happens in it. Defaults to 0.2 with a learned gamma (a one-step lookahead does not anneal by
        itself in runs of a few hundred steps); applying a schedule frozen, to the one it records
        (`MLRSNet.cooldown_fraction`); 0 otherwise.
    mlrs_settle_interval (`int`, *optional*, defaults to `1`):
        With a learned gamma: the meta interval used until gamma has settled (its growth has stopped);
        `mlrs_meta_interval` after. `None`: `mlrs_meta_interval` throughout.
    mlrs_min_lr, mlrs_max_lr (`float`, *optional*):
        Bounds on the lr.
    mlrs_stage_by (`str`, *optional*, defaults to `"progress"`):
        How a learned schedule with several stages is applied: `"progress"` (by fraction of training done) or
        `"loss"` (horizon-free: by the smoothed training loss).
    mlrs_on_nonfinite (`str`, *optional*, defaults to `"skip"`):
        On a NaN/inf training loss, meta loss or hypergradient: `"skip"` (keep the lr and the net, warn, count) or
        `"stop"` (also stop training).

    > Meta-training (when MLRSTrainer gets no `schedule`)

    mlrs_meta_interval (`int`, *optional*):
        A meta-update every this many optimizer steps (paper: 300 iterations of a 200-epoch run). Defaults to 4
        with a learned gamma (after it settles), 10 otherwise.
    mlrs_meta_lr, mlrs_meta_weight_decay (`float`, *optional*, defaults to `1e-3`, `1e-4`):
        Adam on the net's parameters (paper values, for runs of tens of thousands of steps). Runs of a few hundred
        steps learn little at these settings: the recipes use `mlrs_meta_interval=2` and `mlrs_meta_lr=1e-2`.
    mlrs_meta_batch_size (`int`, *optional*):
        Meta batch size per process (held-out batches); defaults to `per_device_train_batch_size`.
    mlrs_meta_fraction (`float`, *optional*, defaults to `0.1`):
        Share of `train_dataset` held out as the meta set when held-out batches are used and no `meta_dataset` is
        given (class-balanced when a `label`/`labels` column exists). The model does not train on it while meta
        steps remain in the run.
    mlrs_release_meta_share (`bool`, *optional*, defaults to `True`):
        Once no meta step is left in the run (a learned gamma that holds, or the final cooldown), the held-out
        share rejoins the training data from the next epoch on: with a learned gamma the meta set is only needed
        while the scale grows, and on a small dataset trained for several epochs 10% less data cost 0.7-1.2
        accuracy points (Fashion-MNIST, RESULTS.md 3b, session 10). Applies when MLRSTrainer held the share out
        itself (no `meta_dataset`), the lr is learned or anneals in a cooldown, and `train_sampling_strategy` is
        `"random"`; the training order is then drawn from a generator seeded by `data_seed` (or `seed`) and the
        epoch.
    mlrs_input_normalization (`str`, *optional*, defaults to `"initial_loss"`):
        What the net reads: `"raw"` loss (paper), `"log_num_labels"` (loss / ln C) or `"initial_loss"`.
    mlrs_hidden_size (`int`, *optional*, defaults to `50`), mlrs_output_bias_init (`float`, defaults to `1.0`):
        Architecture of a new net.
    mlrs_num_stages (`int`, *optional*, defaults to `3`):
        Stage snapshots saved with the learned schedule (paper: the epoch 1, 100 and 200 nets).
    mlrs_assume_lr_linear (`bool`, *optional*, defaults to `False`):
        Accept an optimizer hf_mlrs does not know, on your word that its step is linear in lr.

    NOTE: `lr_scheduler_type` is ignored: the schedule net owns the lr. `warmup_steps` is honoured as a linear ramp
    multiplying the net's lr.
    """

    mlrs_gamma: str | None = field(
        default=None,
        metadata={"help": "LR scale gamma (lr = gamma * net output in (0,1)): 'learned', a number, 'auto' (paper "
                  "heuristic, SGD only), or unset to use learning_rate."},
    )
    mlrs_scale_lr: float = field(default=0.1, metadata={"help": "Learned gamma: Adam step size on log(gamma)."})
    mlrs_scale_start_update: float | None = field(
        default=1e-3, metadata={"help": "Learned gamma: the first step moves the weights by this share of their norm "
                                "(None: start at learning_rate)."}
    )
    mlrs_scale_growth: float = field(
        default=0.1, metadata={"help": "Learned gamma: growth of log(gamma) per meta-update until the hypergradient "
                               "says stop (0: none)."}
    )
    mlrs_scale_growth_linear: float | None = field(
        default=None, metadata={"help": "Learned gamma: once 5 hypergradients in a row say 'larger' (the first time: "
                                "from the first meta-update on), growth adds this multiple of the start per "
                                "meta-update (0: exponential growth only). Default: 1.35; "
                                "2.7 for a frozen schedule that holds its scale after a confident growth."}
    )
    mlrs_scale_min: float = field(default=1e-8, metadata={"help": "Learned gamma: lower bound."})
    mlrs_scale_max: float = field(default=10.0, metadata={"help": "Learned gamma: upper bound."})
    mlrs_horizon: int = field(
        default=1, metadata={"help": "Steps per meta-update window (1: the paper's one-step lookahead)."}
    )
    mlrs_scale_growth_stop: float | None = field(
        default=0.3, metadata={"help": "Learned gamma: the averaged, normalised hypergradient (in [-1, 1]) above "
                               "which growth stops."}
    )
    mlrs_scale_hold: bool | None = field(
        default=None, metadata={"help": "Learned gamma: no meta step once growth has stopped (gamma and the net hold "
                                "until the cooldown). Default: True when the net is meta-trained; with a frozen "
                                "schedule, hold only after a confident growth (else track)."}
    )
    mlrs_scale_stop_votes: int = field(
        default=3, metadata={"help": "Learned gamma: growth also stops once this many of the last N+1 raw "
                             "hypergradients are positive (0: off)."}
    )
    mlrs_scale_min_growth: int = field(
        default=10, metadata={"help": "Learned gamma: the update from which a stop can end the growth phase (10: "
                              "after 9 growth updates)."}
    )
    mlrs_scale_backoff: float = field(
        default=0.9, metadata={"help": "Learned gamma: when growth stops, back to the last gamma the raw signal "
                               "called too small, by at most this much in log (0: off)."}
    )
    mlrs_scale_margin: float | None = field(
        default=None, metadata={"help": "Learned gamma: when growth stops, gamma (after the backoff) times this "
                                "factor in (0, 1]. Default: 0.8 when the scale then holds (0.6 for a frozen "
                                "schedule's confident hold), 1 (none) when it tracks."}
    )
    mlrs_scale_rewind: bool | None = field(
        default=None, metadata={"help": "Learned gamma that holds: when growth stops within the first "
                                "mlrs_scale_rewind_max_share of the run, rewind the model to its starting weights "
                                "(optimizer state cleared) and train from there at the found gamma. Default: on where "
                                "it applies (a learned gamma that holds, not FSDP2)."}
    )
    mlrs_scale_rewind_max_share: float = field(
        default=0.2, metadata={"help": "Rewind only after a probe of at most this share of the run's steps."}
    )
    mlrs_scale_track_batch_share: float = field(
        default=1.0, metadata={"help": "Frozen schedule, learned gamma that tracks: share of each meta batch used."}
    )
    mlrs_meta_source: str | None = field(
        default=None, metadata={"help": "'held_out' (a meta batch) or 'next_batch' (the next step's training "
                                "gradient; frozen schedule with a learned gamma only); unset: next_batch where it "
                                "applies, else held_out."}
    )
    mlrs_meta_eval_mode: bool = field(
        default=False, metadata={"help": "Measure the meta loss in eval mode (running statistics, no dropout)."}
    )
    mlrs_cooldown_fraction: float | None = field(
        default=None, metadata={"help": "Share of training, at the end, over which the lr decays linearly to 0 "
                                "(default: 0.2 with a learned gamma, else a frozen schedule's own, else 0)."}
    )
    mlrs_settle_interval: int | None = field(
        default=1, metadata={"help": "Learned gamma: meta interval until gamma settles (then mlrs_meta_interval)."}
    )
    mlrs_min_lr: float | None = field(default=None, metadata={"help": "Lower bound on the lr."})
    mlrs_max_lr: float | None = field(default=None, metadata={"help": "Upper bound on the lr."})
    mlrs_stage_by: str = field(
        default="progress",
        metadata={"help": "Apply a multi-stage schedule by training 'progress' or by training 'loss' (horizon-free)."},
    )
    mlrs_on_nonfinite: str = field(
        default="skip",
        metadata={"help": "On NaN/inf loss, meta loss or hypergradient: 'skip' (keep lr and net) or 'stop' training."},
    )
    mlrs_meta_interval: int | None = field(
        default=None, metadata={"help": "Meta-update every N optimizer steps (default: 4 with a learned gamma, else "
                                "10, the paper's)."}
    )
    mlrs_meta_lr: float = field(default=1e-3, metadata={"help": "Adam lr of the schedule net (paper: 1e-3)."})
    mlrs_meta_weight_decay: float = field(
        default=1e-4, metadata={"help": "Adam weight decay of the schedule net (paper: 1e-4)."}
    )
    mlrs_meta_batch_size: int | None = field(
        default=None, metadata={"help": "Meta batch size per process (default: per_device_train_batch_size)."}
    )
    mlrs_meta_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train_dataset held out as meta set when no meta_dataset is given "
                  "(class-balanced; not trained on while meta steps remain)."},
    )
    mlrs_release_meta_share: bool = field(
        default=True,
        metadata={"help": "Return the held-out meta share to training from the next epoch once no meta step is left "
                  "in the run (a learned gamma that holds, or the cooldown)."},
    )
    mlrs_input_normalization: str = field(
        default="initial_loss",
        metadata={"help": "Net input: 'raw' loss (paper), 'log_num_labels' (loss/ln C), 'initial_loss' "
                  "(loss/first loss)."},
    )
    mlrs_hidden_size: int = field(default=50, metadata={"help": "Hidden size of a new schedule net (paper: 50)."})
    mlrs_output_bias_init: float = field(
        default=1.0, metadata={"help": "Initial output bias of a new net: it starts at gamma*sigmoid(bias)."}
    )
    mlrs_num_stages: int = field(
        default=3, metadata={"help": "Stage snapshots saved with the learned schedule (paper: 3)."}
    )
    mlrs_assume_lr_linear: bool = field(
        default=False,
        metadata={"help": "Accept an optimizer hf_mlrs does not know, on your word that its step is linear in lr."},
    )

    def __post_init__(self):
        self._validate_mlrs()
        super().__post_init__()

    def held_out_only_settings(self) -> list[str]:
        """The settings given that act only on held-out meta batches (each has no effect with the next batch; a
        meta fraction of 0, nothing held out, agrees with it)."""
        unset = {"mlrs_meta_batch_size": None, "mlrs_meta_eval_mode": False, "mlrs_scale_track_batch_share": 1.0,
                 "mlrs_release_meta_share": True}
        given = [name for name, value in unset.items() if getattr(self, name) != value]
        default_fraction = type(self).__dataclass_fields__["mlrs_meta_fraction"].default
        if self.mlrs_meta_fraction not in (0, default_fraction):
            given.append("mlrs_meta_fraction")
        return given

    @property
    def mlrs_gamma_value(self) -> float | str:
        """gamma as the scheduler takes it: a float, "auto" or "learned"."""
        if self.mlrs_gamma is None:
            return float(self.learning_rate)
        return self.mlrs_gamma if self.mlrs_gamma in ("auto", "learned") else float(self.mlrs_gamma)

    def _validate_mlrs(self) -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"MLRSTrainingArguments.{name}: {problem}. {fix}")

        learned = self.mlrs_gamma == "learned"  # defaults measured for a learned scale (benchmarks/RESULTS.md)
        if self.mlrs_meta_interval is None:
            self.mlrs_meta_interval = 4 if learned else 10

        if self.mlrs_gamma is not None and self.mlrs_gamma not in ("auto", "learned"):
            try:
                gamma = float(self.mlrs_gamma)
            except (TypeError, ValueError):
                gamma = float("nan")
            if not (math.isfinite(gamma) and gamma > 0):
                fail("mlrs_gamma", f"{self.mlrs_gamma!r} is not a positive number, 'learned' or 'auto'",
                     "Use 'learned', the largest lr you want (e.g. your usual peak lr), 'auto', or leave it unset.")
        elif self.mlrs_gamma != "auto" and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            fail("learning_rate", f"{self.learning_rate} cannot serve as gamma (or its start)",
                 "Set a positive learning_rate.")
        if not 0 < self.mlrs_scale_rewind_max_share <= 1:
            fail("mlrs_scale_rewind_max_share", f"{self.mlrs_scale_rewind_max_share} is not a share in (0, 1]",
                 "Use e.g. 0.2 (rewind only after a probe of at most a fifth of the run) or 1.0 (after any probe).")
        if self.mlrs_scale_rewind and (not learned or self.mlrs_scale_hold is False):
            fail("mlrs_scale_rewind", "rewinds to the start once a learned gamma stops growing and holds, and this "
                 f"run has mlrs_gamma={self.mlrs_gamma!r}, mlrs_scale_hold={self.mlrs_scale_hold!r}",
                 "Set mlrs_gamma='learned' (and leave mlrs_scale_hold unset or True), or drop mlrs_scale_rewind.")
        if self.mlrs_meta_source not in (None, "held_out", "next_batch"):
            fail("mlrs_meta_source", f"{self.mlrs_meta_source!r} is not 'held_out' or 'next_batch'",
                 "Use 'held_out' (the paper's held-out meta batch), 'next_batch' (the next training gradient) or "
                 "leave it unset (the next batch where it applies).")
        if self.mlrs_meta_source == "next_batch" and (self.mlrs_gamma != "learned" or self.mlrs_horizon != 1):
            fail("mlrs_meta_source", f"'next_batch' with mlrs_gamma={self.mlrs_gamma!r} and "
                 f"mlrs_horizon={self.mlrs_horizon}", "'next_batch' learns only the scale of a frozen schedule "
                 "(MLRSTrainer(schedule=...), mlrs_gamma='learned', mlrs_horizon=1); use 'held_out' otherwise.")
        ignored = self.held_out_only_settings() if self.mlrs_meta_source == "next_batch" else []
        if ignored:
            fail("mlrs_meta_source", f"'next_batch' uses no meta batch, so {', '.join(ignored)} would have no effect",
                 "Use mlrs_meta_source='held_out' to keep them, or drop them.")
        if not 0 < self.mlrs_scale_track_batch_share <= 1:
            fail("mlrs_scale_track_batch_share", f"{self.mlrs_scale_track_batch_share} is not a share in (0, 1]",
                 "Use e.g. 0.5 (half of each meta batch while the scale tracks) or 1.0 (the whole batch).")
        if not (0 < self.mlrs_scale_min < self.mlrs_scale_max and math.isfinite(self.mlrs_scale_max)):
            fail("mlrs_scale_min",
                 f"bounds ({self.mlrs_scale_min}, {self.mlrs_scale_max}) are not 0 < min < max < inf",
                 "Use e.g. mlrs_scale_min=1e-8, mlrs_scale_max=10.")
        if not self.mlrs_scale_lr > 0:
            fail("mlrs_scale_lr", f"{self.mlrs_scale_lr} is not positive", "Default: 0.1.")
        if self.mlrs_scale_start_update is not None and not 0 < self.mlrs_scale_start_update < 1:
            fail("mlrs_scale_start_update", f"{self.mlrs_scale_start_update} is not in (0, 1)",
                 "Default: 1e-3 (the first step moves the weights by 0.1% of their norm); None starts at "
                 "learning_rate.")
        if not self.mlrs_scale_growth >= 0:
            fail("mlrs_scale_growth", f"{self.mlrs_scale_growth} < 0", "Default: 0.1; 0 disables growth.")
        if self.mlrs_scale_growth_linear is not None and not (math.isfinite(self.mlrs_scale_growth_linear)
                                                              and self.mlrs_scale_growth_linear >= 0):
            fail("mlrs_scale_growth_linear", f"{self.mlrs_scale_growth_linear} is not a number >= 0",
                 "Unset for the default; 0: exponential growth only; e.g. 1.35 adds 1.35 x the start per meta-update.")
        stop = self.mlrs_scale_growth_stop
        if stop is not None and not (isinstance(stop, (int, float)) and -1 <= stop < 1):
            fail("mlrs_scale_growth_stop", f"{stop!r} is not in [-1, 1): m / sqrt(v) never exceeds 1",
                 "Use e.g. 0.3, 0 (as soon as the average turns positive) or None (the first positive one).")
        if not (isinstance(self.mlrs_scale_stop_votes, int) and self.mlrs_scale_stop_votes >= 0):
            fail("mlrs_scale_stop_votes", f"{self.mlrs_scale_stop_votes!r} is not an integer >= 0",
                 "Use e.g. 3 (3 of the last 4 raw hypergradients) or 0 for none.")
        if not (isinstance(self.mlrs_scale_min_growth, int) and self.mlrs_scale_min_growth >= 1):
            fail("mlrs_scale_min_growth", f"{self.mlrs_scale_min_growth!r} is not an integer >= 1",
                 "Use e.g. 3 or 10.")
        if not (math.isfinite(self.mlrs_scale_backoff) and self.mlrs_scale_backoff >= 0):
            fail("mlrs_scale_backoff", f"{self.mlrs_scale_backoff} is not a number >= 0",
                 "Use e.g. 0.9 (at most 9 growth updates of 0.1 undone) or 0 for none.")
        if self.mlrs_scale_margin is not None and not (
                math.isfinite(self.mlrs_scale_margin) and 0 < self.mlrs_scale_margin <= 1):
            fail("mlrs_scale_margin", f"{self.mlrs_scale_margin} is not in (0, 1]", "Use e.g. 0.8, or 1 for none.")
        for name in ("mlrs_min_lr", "mlrs_max_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                fail(name, f"{value} is not a finite lr >= 0", "Use a non-negative number or leave it unset.")
        if self.mlrs_min_lr is not None and self.mlrs_max_lr is not None and self.mlrs_min_lr > self.mlrs_max_lr:
            fail("mlrs_min_lr", f"{self.mlrs_min_lr} is above mlrs_max_lr={self.mlrs_max_lr}",
                 "Swap them or widen the range.")
        if self.mlrs_stage_by not in ("progress", "loss"):
            fail("mlrs_stage_by", f"{self.mlrs_stage_by!r} is not 'progress' or 'loss'", "Pick one of the two.")
        if self.mlrs_on_nonfinite not in ("skip", "stop"):
            fail("mlrs_on_nonfinite", f"{self.mlrs_on_nonfinite!r} is not 'skip' or 'stop'", "Pick one of the two.")
        if self.mlrs_meta_interval < 1:
            fail("mlrs_meta_interval", f"{self.mlrs_meta_interval} < 1", "Use 1 (every step) or more.")
        if not (self.mlrs_meta_lr > 0 and math.isfinite(self.mlrs_meta_lr)):
            fail("mlrs_meta_lr", f"{self.mlrs_meta_lr} is not a positive number", "Paper value: 1e-3.")
        if not self.mlrs_meta_weight_decay >= 0:
            fail("mlrs_meta_weight_decay", f"{self.mlrs_meta_weight_decay} < 0", "Paper value: 1e-4.")
        if self.mlrs_meta_batch_size is not None and self.mlrs_meta_batch_size < 1:
            fail("mlrs_meta_batch_size", f"{self.mlrs_meta_batch_size} < 1", "Use a positive batch size or unset.")
        if not 0.0 <= self.mlrs_meta_fraction < 1.0:
            fail("mlrs_meta_fraction", f"{self.mlrs_meta_fraction} is outside [0, 1)",
                 "Hold out a share such as 0.1 of train_dataset, or pass meta_dataset= to MLRSTrainer.")
        if self.mlrs_input_normalization not in INPUT_NORMALIZATIONS:
            fail("mlrs_input_normalization", f"{self.mlrs_input_normalization!r} is unknown",
                 f"Use one of {INPUT_NORMALIZATIONS}.")
        if self.mlrs_hidden_size < 2:
            fail("mlrs_hidden_size", f"{self.mlrs_hidden_size} < 2", "Paper value: 50.")
        if self.mlrs_num_stages < 1:
            fail("mlrs_num_stages", f"{self.mlrs_num_stages} < 1", "Use 1 (one net) or 3 (paper).")
        optim = str(getattr(self.optim, "value", self.optim))
        if optim in NONLINEAR_OPTIM_NAMES or "layerwise" in optim:
            reason = NONLINEAR_OPTIM_NAMES.get(optim, "layer-wise optimizers step inside backward")
            fail("optim", f"{self.optim!r} cannot be driven by MLR-SNet: {reason}",
                 "Use an optimizer whose step is linear in lr, e.g. optim='adamw_torch' or 'sgd'.")
        if self.mlrs_cooldown_fraction is not None and not 0.0 <= self.mlrs_cooldown_fraction < 1.0:
            fail("mlrs_cooldown_fraction", f"{self.mlrs_cooldown_fraction} is outside [0, 1)", "Use e.g. 0.2 or 0.")
        if not 1 <= self.mlrs_horizon <= self.mlrs_meta_interval:
            fail("mlrs_horizon", f"{self.mlrs_horizon} is not between 1 and mlrs_meta_interval",
                 "A window cannot be longer than the steps between two meta-updates.")
        if self.mlrs_settle_interval is not None and self.mlrs_settle_interval < 1:
            fail("mlrs_settle_interval", f"{self.mlrs_settle_interval} < 1", "Use 1 (every step) or unset.")


def learned_scale(init: float, settings: MLRSTrainingArguments | type[MLRSTrainingArguments] = MLRSTrainingArguments,
                  hold: bool = False, confident_hold: bool = False) -> LearnedScale:
    """The LearnedScale of the `mlrs_scale_*` settings of `settings` (an instance, or the class for its defaults):
    one place that maps the arguments onto the scale, for MLRSTrainer and MLRSCallback alike. `hold`: whether the
    scale holds once its growth stops (the margin's default depends on it); `confident_hold`: only after a
    confident growth (a frozen schedule's default; `LearnedScale`), whose linear growth then defaults to
    `CONFIDENT_GROWTH_LINEAR`."""
    margin = settings.mlrs_scale_margin
    if margin is None:
        margin = CONFIDENT_MARGIN if confident_hold else 0.8 if hold else 1.0
    growth_linear = settings.mlrs_scale_growth_linear
    if growth_linear is None:
        growth_linear = CONFIDENT_GROWTH_LINEAR if confident_hold else GROWTH_LINEAR
    return LearnedScale(
        init,
        lr=settings.mlrs_scale_lr,
        bounds=(settings.mlrs_scale_min, settings.mlrs_scale_max),
        growth=settings.mlrs_scale_growth,
        growth_linear=growth_linear,
        confident_hold=confident_hold,
        growth_stop=settings.mlrs_scale_growth_stop,
        stop_votes=settings.mlrs_scale_stop_votes,
        min_growth=settings.mlrs_scale_min_growth,
        backoff=settings.mlrs_scale_backoff,
        margin=margin,
        start_update=settings.mlrs_scale_start_update,
    )
