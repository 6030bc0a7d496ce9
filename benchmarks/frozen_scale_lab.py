"""A frozen schedule with its lr scale learned: what the scale does after its growth stops (RESULTS.md section 8,
session 22).

Applies the default's leave-one-task-out variant of each task (`quality.held_out_default_dir`: committed in
benchmarks/heldout_nets/, else `outputs/zoo/multitask-without-<task>-select3`, built by
`python recipes/zoo.py --entry multitask-without-<task> --select 3`) frozen with `mlrs_gamma="learned"`, as
`benchmarks/transfer.py`'s learned-scale arm does (`quality.run_one`, arm `mlrs_transfer_learned`), the scale learned
from held-out batches as when these designs were measured (sessions 21-23), under one design:

  track      the session-21 default: growth (linear 1.35 x the start), stop, then tracking the signal
  hold       hold after any stop (margin 0.8, rewind when the probe took at most 20% of the run), growth 1.35
  sign       track, but on the signs of the raw hypergradients (a robust average: on a plateau the signal is small,
             mostly "smaller", with rare large "larger" values that Adam's average follows)
  holdfast   hold after any stop, growth 2.7
  confident  hold (and rewind) after a confident growth, track after a stop on noise, growth 2.7, margin 0.8
  down       confident, then the scale keeps meta-updating but only downwards (never above the held value)
  default    the library's default since session 22: confident with a margin of 0.6
  stagetrack default, and from the frozen net's next stage on, the held scale tracks again (a shape learned elsewhere
             may step the lr down further than this task wants; tracking is how a scale follows such a step)
  fromstart  default, but a growth is confident (linear, then held) only if its signal said "larger" from the first
             update on, as from scratch; a run of "larger" after a "smaller" (a pretrained model's head learning
             after a noisy start: bbc, session 23) keeps the gentle growth and tracks after the stop
  trackdecay<b>  (scale_lab.py, '{"patch": "trackdecay0.3"}') default, and a scale that tracks after its stop (a
             growth that was not confident: a pretrained model) also steps log(gamma) down by its lr x b per update
  confidentmeta  (for scale_lab.py's meta-trained arms, '{"patch": "confidentmeta"}') the meta-trained default's
             scale, too, holds (and rewinds) only after a confident growth and tracks after a stop on noise, with its
             own margin (0.8) and growth (1.35)

(The `track` records in results/frozen_scale_lab.jsonl are transfer.py's learned-scale runs of session 21, made with
that default; the others were made with this script's design before it was committed, in the same process setup.)

    python benchmarks/frozen_scale_lab.py default lm:gpt2-small:10,bbc:minilm-L2:3,digits:resnet-small:3

Prints one line per run and appends its record to results/frozen_scale_lab.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import transfer  # noqa: E402, F401, I001  (first: quality.py puts recipes/, which has a transfer.py of its own, ahead)
import quality  # noqa: E402

VARIANTS = {
    "track": {"mlrs_scale_hold": False, "mlrs_scale_growth_linear": 1.35},
    "hold": {"mlrs_scale_hold": True, "mlrs_scale_growth_linear": 1.35},
    "sign": {"mlrs_scale_hold": False, "mlrs_scale_growth_linear": 1.35},
    "holdfast": {"mlrs_scale_hold": True, "mlrs_scale_growth_linear": 2.7},
    "confident": {"mlrs_scale_margin": 0.8},
    "down": {"mlrs_scale_margin": 0.8},
    "default": {},
    "stagetrack": {},
    "fromstart": {},
}


# the designs that are code, not settings
PATCHES = ("sign", "down", "stagetrack", "fromstart", "confidentmeta", "lastlarger", "trackdecay0.1", "trackdecay0.3")


def patch(variant: str) -> None:
    """The designs that are not settings (PATCHES): patched into the library for this process only. (`fromstart` has
    been the library's own rule since session 23, hf_mlrs/scale.py: there it changes nothing.)"""
    from hf_mlrs import hypergrad, scale

    update, interval = scale.LearnedScale.update, hypergrad.MetaLearner.current_interval
    if variant == "sign":
        def signed_update(self, g):  # tracking on the sign of each raw hypergradient (growth unchanged)
            g = float(g)
            if not self.growing and math.isfinite(g) and g != 0:
                g = math.copysign(1.0, g)
            return update(self, g)

        scale.LearnedScale.update = signed_update
    elif variant == "down":
        def capped_update(self, g):  # after the stop: never above the gamma it stopped (and held) at
            growing = self.growing
            update(self, g)
            if growing and not self.growing:
                self.cap = self.log_gamma
            if not self.growing and getattr(self, "cap", None) is not None:
                self.log_gamma = min(self.log_gamma, self.cap)
            return self.gamma

        def tracking_interval(self):  # meta-updates go on after the stop (the rewind still happens)
            return self.interval if self.scale is not None and self.scale.settled else interval(self)

        scale.LearnedScale.update = capped_update
        hypergrad.MetaLearner.current_interval = tracking_interval
    elif variant == "stagetrack":
        from hf_mlrs import scheduler

        update_stage = scheduler.MLRSScheduler._update_stage

        def stage_then_track(self):  # a held scale tracks again once the frozen net moves to a later stage
            before = self.stage
            update_stage(self)
            learner = self.meta_learner
            if self.stage > before and self.scale is not None and self.scale.holds and learner is not None:
                self.scale.confident = False  # holds is now False: MetaLearner schedules meta-updates again
                learner.next_due = self.num_observed - 1 + learner.interval
                learner.window_length = min(learner.horizon, learner.interval)

        scheduler.MLRSScheduler._update_stage = stage_then_track
    elif variant == "fromstart":
        def from_start_update(self, g):  # one "smaller" before the growth turned linear: never confident
            if not self.confident and math.isfinite(float(g)) and float(g) > 0:
                self.doubted = True
            if getattr(self, "doubted", False) and not self.confident:
                self.larger_streak = min(self.larger_streak, scale.LINEAR_AFTER - 2)  # this update cannot reach it
            return update(self, g)

        scale.LearnedScale.update = from_start_update
    elif variant == "confidentmeta":  # every learned scale holds only after a confident growth (with its own margin
        init = scale.LearnedScale.__init__  # and growth: for a meta-trained net 0.8 and 1.35, as learned_scale sets)

        def confident_init(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "confident_hold": True})

        scale.LearnedScale.__init__ = confident_init
    elif variant == "lastlarger":  # the rule before session 28: a confident growth's stop backs off to the last
        def last_larger_update(self, g):  # "larger" vote of all, not the last one of its agreeing streak
            if self.growing and math.isfinite(float(g)) and float(g) <= 0:
                self.last_larger = self.log_gamma  # before update() reads its target, as it did until session 28
            return update(self, g)

        scale.LearnedScale.update = last_larger_update
    elif variant.startswith("trackdecay"):  # a scale that tracks after its stop (not held) also steps down by
        bias = float(variant[len("trackdecay"):])  # lr x bias per update: its rest point is where the signal says
        # "larger" with a normalised confidence of `bias`, below the one-step zero crossing (session 30)

        def decaying_update(self, g):
            tracking = not self.growing
            update(self, g)
            if tracking and math.isfinite(float(g)):
                self.log_gamma = max(self.log_gamma - self.lr * bias, self.log_low)
            return self.gamma

        scale.LearnedScale.update = decaying_update


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("cells", help="task:model:seeds[:schedule],... e.g. lm:gpt2-small:10,fashion:resnet-small:3 "
                        "(schedule: a shipped name; default: the default's variant without the task)")
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    patch(options.variant)
    run_options = argparse.Namespace(smoke=False, device="cpu", optimizer="adamw")
    root = HERE.parent
    with open(HERE / "results" / "frozen_scale_lab.jsonl", "a") as out:
        for cell in options.cells.split(","):
            task, model, seeds, *shipped = cell.split(":")
            source = root / "hf_mlrs" / "pretrained" / shipped[0] if shipped else quality.held_out_default_dir(task)[0]
            for seed in range(int(seeds)):
                r = quality.run_one(task, "mlrs_transfer_learned", 1e-3, seed, run_options,
                                    schedule_source=str(source), model=model,
                                    overrides={"mlrs_meta_source": "held_out", **VARIANTS[options.variant]})
                # the held-out variant's name, wherever its net lives (outputs/zoo/<name>-select3/schedule or the
                # committed benchmarks/heldout_nets/<name>)
                r["variant"], r["schedule"] = options.variant, shipped[0] if shipped else (
                    source.parent.name if source.name == "schedule" else source.name)
                out.write(json.dumps(r) + "\n")
                out.flush()
                every = max(1, len(r["lrs"]) // 7)
                print(f"{options.variant} {task}/{model} seed={seed} score={quality.score(r):.4f} "
                      f"lrs: {[f'{x:.1e}' for _, x in r['lrs'][::every]]} ({r['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
