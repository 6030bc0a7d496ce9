"""The learned lr scale: log(gamma) adapted online from the same exact hypergradient that trains the net.

The lr of step t is alpha_t = gamma * A_t. Because alpha_t is linear in gamma, the hypergradient of the held-out
loss with respect to log(gamma) needs no new computation (mlrsnet.md section 4):

    dL_meta/dlog(gamma) = gamma * dL_meta/dgamma = alpha_t * dL_meta/dalpha_t = <g_meta, delta>

and over a horizon of k real steps taken with a shared scale, w_{t+k} = w_t + Delta, the first-order gradient of
L_meta(w_t + c * Delta) in log(c) at c = 1 is again one dot product, <g_meta(w_{t+k}), Delta>, with one buffer.

Known failure modes of hypergradient lr adaptation, and the safeguard for each:
  * the lr goes negative or explodes (Baydin et al. 2018): we adapt log(gamma), inside hard bounds;
  * one noisy hypergradient moves the lr by orders of magnitude: each update is Adam-normalised and clipped, so
    gamma changes by at most a factor exp(max_step) per meta-update, whatever the hypergradient's size;
  * oscillation: Adam's first moment averages the sign over recent updates, and the step shrinks as the sign flips.
All state is plain Python floats (float64): identical on every rank given the same all-reduced scalar, and exact
through a JSON checkpoint.
"""

from __future__ import annotations

import math


# Raw hypergradients in a row that must say "larger" before growth turns linear. From scratch the signal agrees every
# time; on a pretrained model near its start it is noise, and 3 in a row happen by chance (1 in 8): the linear step
# that followed (+1.35 x start at 1.2 x start: x1.65) collapsed a frozen-shape bbc run (RESULTS 3b, session 9).
LINEAR_AFTER = 5

STATE_KEYS = ("log_gamma", "initial_log_gamma", "m", "v", "t", "adam_t", "num_updates", "num_skipped", "settled",
              "growing", "calibrated", "recent_positive", "last_larger", "larger_streak", "confident")


class LearnedScale:
    """gamma = exp(s), grown from a conservative start, then updated by a clipped Adam step along dL_meta/ds.

    Two phases. *Growth*: while the hypergradient is not confidently positive ("a larger lr would hurt the held-out
    loss"), s grows by `growth` per update. At a far too small lr the one-step signal is pure noise (a step of 1e-6
    changes nothing measurable), so a symmetric update would random-walk there; too large an lr shows itself
    loudly, through the curvature term alpha^2 <d, H d>. Growth ends, for good, when Adam's normalised first
    moment m / sqrt(v) exceeds `growth_stop`: by default as soon as the averaged hypergradient turns positive.
    That stop is sensitive to noise, which is why the start is relative to the model (see `start_update`): a
    start where the held-out signal is already measurable, not a far too small lr.
    *Tracking*: symmetric clipped Adam steps on s follow the hypergradient for the rest of the run.

    Args:
        init (`float`): the starting gamma.
        lr (`float`, defaults to `0.1`): Adam step size on s = log(gamma): a meta-update changes gamma by at most
            about `exp(lr)` (10% at 0.1) once Adam's moments are warm.
        bounds (`tuple[float, float]`): gamma never leaves [bounds[0], bounds[1]].
        max_step (`float`, defaults to `0.5`): hard clip on |change of s| per update (a factor 1.65).
        betas (`tuple[float, float]`): Adam's moment decays.
        growth (`float`, defaults to `0.0`): the growth of s per update in the growth phase (0: no growth phase).
        growth_stop (`float`, defaults to `0.0`): the m / sqrt(v) above which the growth phase ends (0: as soon as
            the averaged hypergradient turns positive, after at least 3 updates); None: at the first positive one.
        stop_votes (`int`, defaults to `0`): growth also ends once `stop_votes` of the last `stop_votes + 1` raw
            hypergradients are positive (0: only the averaged one counts). Adam's average is weighted by size, and
            the hypergradient shrinks 10-100x while the loss first falls: the large early "larger" values hold the
            average negative for dozens of updates after the raw signal has turned.
        backoff (`float`, defaults to `0.0`): when growth ends, gamma goes back to the last value whose raw
            hypergradient still said "larger", by at most `backoff` in log and never below the (calibrated) start,
            and Adam's moments restart there: their history is of a larger hypergradient at a smaller lr. After a
            confident growth, "larger" counts only inside a streak that agreed (the linear growth engaged): the
            first "smaller" ends that streak where the one-step signal crosses zero, and the votes after it are
            noise around zero while growth goes on, whose last "larger" came 1.5-2.5x past the crossing on some
            seeds and held a from-scratch LM where it stalled (RESULTS.md 3b, session 28).
        growth_linear (`float`, defaults to `0.0`): growth linear in the lr while the signal agrees: once the last
            `LINEAR_AFTER` (5) raw hypergradients in a row said "larger", each growth update adds growth_linear x the
            start to gamma (still clipped to `max_step`) instead of multiplying it by exp(growth); a sign that
            disagrees returns to exponential growth (0: always exponential). From scratch, where the early signal
            says "larger" every time, this is a linear warmup to wherever the signal stops it; a pretrained model
            whose signal is noise near its start keeps the gentle exponential growth. The first time, the streak must
            run from the first update on (a *confident* growth): on a pretrained model a run of "larger" after a
            noisy start is its head learning fast, and a linear step there overshot (RESULTS.md 3b, session 23).
        min_growth (`int`, defaults to `3`): the update (counted from 1) from which a stop can end the growth phase
            (on a pretrained model the first raw hypergradients are noise, and stop votes read from them end it by
            chance).
        margin (`float`, defaults to `1.0`): when growth stops, gamma (after the backoff) is multiplied by this
            factor in (0, 1]. The one-step signal stops growth near the largest lr that still helps *now*; held there
            for a whole run, a model trained from scratch can sit at its edge of stability (a byte-level LM spiked
            on some seeds and not on others at the same peak).
        start_update (`float`, *optional*): a start relative to the model, not to the user's lr: after the first
            step, gamma is reset so that this step moved the weights by `start_update` x their norm (the step is
            linear in the lr, so it is rescaled exactly). Whatever lr the user gave, the run then continues the same.
        confident_hold (`bool`, defaults to `False`): where the run holds the scale once growth stops (`holds`),
            hold only after a *confident* growth, one whose raw signal said "larger" from its first update on, at
            least `LINEAR_AFTER` times (the linear growth engaged): from scratch the stop then marks the largest lr
            that still helps, and holding it (with the margin) beats following the one-step signal, which pushes the
            lr up on a plateau. A stop reached while the signal was still noise (a pretrained model near its start),
            or after a streak that began later, is not trusted: no margin, and the scale goes on tracking (RESULTS.md
            section 8, session 22; 3b, session 23).
    """

    def __init__(
        self,
        init: float,
        *,
        lr: float = 0.1,
        bounds: tuple[float, float] = (1e-8, 10.0),
        max_step: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-30,  # the hypergradient scales with alpha: no absolute floor on its size
        settle_after: int = 10,
        settle_threshold: float = 0.5,
        growth: float = 0.0,
        growth_stop: float | None = 0.0,
        stop_votes: int = 0,
        backoff: float = 0.0,
        start_update: float | None = None,
        growth_linear: float = 0.0,
        margin: float = 1.0,
        min_growth: int = 3,
        confident_hold: bool = False,
    ):
        low, high = (float(b) for b in bounds)
        if not (0 < low < high and math.isfinite(high)):
            raise ValueError(f"LearnedScale: bounds must satisfy 0 < low < high < inf, got {bounds!r}.")
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"LearnedScale: the starting gamma must be a positive number, got {init!r}.")
        if not (lr > 0 and max_step > 0):
            raise ValueError(f"LearnedScale: lr and max_step must be positive, got {lr!r}, {max_step!r}.")
        self.lr, self.max_step, self.betas, self.eps = float(lr), float(max_step), betas, eps
        self.log_low, self.log_high = math.log(low), math.log(high)
        self.log_gamma = min(max(math.log(init), self.log_low), self.log_high)
        self.initial_log_gamma = self.log_gamma
        self.m = 0.0  # Adam's first and second moments of dL/ds, and its step count
        self.v = 0.0
        self.t = 0
        self.num_updates = 0
        self.num_skipped = 0
        # Settled: the hypergradient's sign no longer agrees from one update to the next (|E g| / sqrt(E g^2) small:
        # about 0.23 for pure noise at beta1 0.9, near 1 while the scale is still far from where the signal wants it).
        self.settle_after, self.settle_threshold = settle_after, settle_threshold
        self.settled = False
        self.growth, self.growth_stop = float(growth), growth_stop
        if not (math.isfinite(growth_linear) and growth_linear >= 0):
            raise ValueError(f"LearnedScale: growth_linear must be a number >= 0, got {growth_linear!r}.")
        self.growth_linear = float(growth_linear)
        self.growing = self.growth > 0  # growth_linear shapes a growth phase; mlrs_scale_growth=0 means none
        self.larger_streak = 0  # raw hypergradients in a row that said "larger"
        if not (math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"LearnedScale: backoff must be a number >= 0, got {backoff!r}.")
        self.backoff = float(backoff)
        if not (math.isfinite(margin) and 0 < margin <= 1):
            raise ValueError(f"LearnedScale: margin must be in (0, 1], got {margin!r}.")
        self.margin = float(margin)
        if not (isinstance(stop_votes, int) and stop_votes >= 0):
            raise ValueError(f"LearnedScale: stop_votes must be an integer >= 0, got {stop_votes!r}.")
        self.stop_votes = stop_votes
        if not (isinstance(min_growth, int) and min_growth >= 1):
            raise ValueError(f"LearnedScale: min_growth must be an integer >= 1, got {min_growth!r}.")
        self.min_growth = min_growth
        self.recent_positive: list[bool] = []  # the last stop_votes + 1 raw signs, while growing
        self.last_larger = self.log_gamma  # the last log(gamma) whose raw signal said "larger" (see `backoff`)
        self.adam_t = 0  # Adam's own step count (restarts with its moments)
        self.start_update = start_update
        self.calibrated = start_update is None
        self.confident_hold = bool(confident_hold)
        self.confident = False  # the growth turned linear: LINEAR_AFTER or more raw "larger" votes from the first

    @property
    def gamma(self) -> float:
        return math.exp(self.log_gamma)

    @property
    def trusts_stop(self) -> bool:
        """Whether a stop of the growth is held (with the margin) rather than tracked: always, unless
        `confident_hold` asks for a confident growth first."""
        return self.confident or not self.confident_hold

    @property
    def holds(self) -> bool:
        """Whether a run that holds its scale (MetaLearner's `hold`) stops meta-updating it now: once settled, and
        with `confident_hold` only after a confident growth."""
        return self.settled and self.trusts_stop

    def update(self, grad_log_gamma: float) -> float:
        """One clipped Adam step on s = log(gamma) along dL_meta/ds; returns the new gamma.

        A non-finite gradient is skipped (counted, gamma unchanged): it never reaches the moments.
        """
        g = float(grad_log_gamma)
        if not math.isfinite(g):
            self.num_skipped += 1
            return self.gamma
        g = min(max(g, -1e150), 1e150)  # g * g must stay finite; Adam's step depends on the sign and relative size
        beta1, beta2 = self.betas
        self.t += 1
        self.adam_t += 1
        self.m = beta1 * self.m + (1 - beta1) * g
        self.v = beta2 * self.v + (1 - beta2) * g * g
        m_hat, v_hat = self.m / (1 - beta1**self.adam_t), self.v / (1 - beta2**self.adam_t)
        confidence = m_hat / (math.sqrt(v_hat) + self.eps)  # in [-1, 1]: +1 = every recent signal says "smaller"
        overshoot = g > 0 if self.growth_stop is None else confidence > self.growth_stop
        if self.growing and self.stop_votes:
            self.recent_positive = (self.recent_positive + [g > 0])[-(self.stop_votes + 1):]
            overshoot = overshoot or sum(self.recent_positive) >= self.stop_votes
        stopped_now = self.growing and self.t >= self.min_growth and overshoot
        larger_at = self.growing and g <= 0  # this update's step was taken at this gamma, and it was too small
        if stopped_now:
            self.growing, self.settled = False, True  # the held-out loss says the lr is now large enough
        self.larger_streak = self.larger_streak + 1 if g <= 0 else 0
        # The signal agrees: a confident growth if it has said "larger" at every update so far (from scratch), or
        # once it was confident; a streak after a "smaller" is not (a pretrained model, session 23).
        agreeing = self.growing and self.larger_streak >= LINEAR_AFTER and (
            self.confident or self.larger_streak == self.t)
        self.confident = self.confident or agreeing
        if larger_at and (agreeing or not self.confident):  # once confident, only inside a streak that agrees
            self.last_larger = self.log_gamma
        if agreeing and self.growth_linear:  # + c x start, not x e^growth
            step = self.log_gamma - math.log(self.gamma + self.growth_linear * math.exp(self.initial_log_gamma))
        elif self.growing:
            step = -self.growth
        else:
            step = self.lr * confidence
        step = min(max(step, -self.max_step), self.max_step)
        if stopped_now and self.backoff > 0:  # back to where the raw signal last said "larger"; a fresh Adam there
            target = max(self.last_larger, self.log_gamma - self.backoff, self.initial_log_gamma)
            step = max(0.0, self.log_gamma - target)
            self.m = self.v = 0.0
            self.adam_t = 0
        if stopped_now and self.trusts_stop:
            step -= math.log(self.margin)  # below the stop by the margin (a factor; 1: none); not for a scale that
            # goes on tracking after a stop on noise
        self.log_gamma = min(max(self.log_gamma - step, self.log_low), self.log_high)
        self.num_updates += 1
        if not self.settled and not self.growing and self.t >= self.settle_after:
            self.settled = abs(confidence) < self.settle_threshold  # once, for good
        return self.gamma

    def calibrate(self, relative_update: float) -> float:
        """After the first step, which moved the weights by `relative_update` x their norm at the current gamma:
        move gamma so that it would have moved them by `start_update` x their norm; returns the new gamma."""
        if math.isfinite(relative_update) and relative_update > 0:
            log_gamma = self.log_gamma + math.log(self.start_update / relative_update)
            self.log_gamma = self.initial_log_gamma = min(max(log_gamma, self.log_low), self.log_high)
            self.last_larger = self.log_gamma
        self.calibrated = True
        return self.gamma

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint written before the stop votes and the backoff existed: Adam never restarted in it.
        state = {"adam_t": state.get("t", 0), "recent_positive": [], "last_larger": state.get("log_gamma"),
                 "larger_streak": 0, "confident": False, **state}
        for key, value in state.items():
            setattr(self, key, value)
