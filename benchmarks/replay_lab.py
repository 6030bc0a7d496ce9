"""Is it the learned lrs, or the machinery around them? Replays a learned-scale run's applied lrs in a plain Trainer.

For each seed: one `mlrs_learned:<variant>` run (quality.py's LEARNED_VARIANTS, `default` unless given; MLRSTrainer,
start 1e-3, every step logged), then its exact per-step lrs in a plain `Trainer` (no meta step, no held-out meta set,
all of the training split), and edits of them: `linear_warmup` (the growth phase, up to the step where the lr peaks,
replaced by a linear ramp to the same peak), `tuned_peak` (the whole sequence scaled so that its peak is the tuned
warmup-stable-decay peak lr of quality.py), `capped` (every lr above the held one, the median of the middle 40% of
the run, cut to it: the growth's overshoot before its stop removed), `capped_085` (that, x 0.85) and `restart` (the
held lr from the first step, the run's cooldown kept: no growth phase at all; `restart_counted`: the same, shorter by
the steps the growth took, as if they were spent).
Appends every run to benchmarks/results/replay_lab.jsonl and prints one line per run.

    python benchmarks/replay_lab.py fashion 0,1,2,3,4
    python benchmarks/replay_lab.py lm 0,1,2 lin
    python benchmarks/replay_lab.py fashion 0,1,2 default '{"without_meta_share": true}'

A fourth argument, a JSON object, overrides the replays' training arguments (quality.run_one's `overrides`; e.g.
`without_meta_share`: replay on only the part of the training split the learned run trained on). A fifth, a
comma-separated list of edits, replays only those:

    python benchmarks/replay_lab.py lm 0,1,2,3,4,5,6,7,8,9 default '{}' exact,capped
"""

import json
import os
import statistics
import sys
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402


def tuned_peak(task: str) -> float:
    """The peak lr quality.py tuned for warmup-stable-decay on this task (its committed results)."""
    summary = json.loads((HERE / "results" / "quality_cpu.json").read_text())["summary"]
    return summary[task]["arms"]["tuned:warmup_stable_decay"]["lr"]


def applied_lrs(run: dict, steps: int) -> list[float]:
    """lr of step k (0-based) = the lr logged at step k + 1 (MLRSTrainer logs the lr it applied)."""
    logged = dict(run["lrs"])
    assert sorted(logged) == list(range(1, steps + 1)), "the learned run must log every step"
    return [logged[k + 1] for k in range(steps)]


def edits(lrs: list[float], task: str) -> dict[str, list[float]]:
    body = lrs[: int(0.8 * len(lrs))]  # before the cooldown
    peak_step = max(range(len(body)), key=body.__getitem__)
    peak = lrs[peak_step]
    ramp = [peak * (k + 1) / (peak_step + 1) for k in range(peak_step + 1)]
    held = statistics.median(lrs[int(0.3 * len(lrs)):int(0.7 * len(lrs))])
    capped = [min(x, held) for x in lrs]
    # The held lr from the first step on (the growth phase replaced by it), the run's own cooldown kept: what a run
    # would do that probes the scale, restores the weights it started from and trains again at the found scale.
    restart = [held if k < int(0.8 * len(lrs)) else x for k, x in enumerate(capped)]
    # The same with the probe's steps counted in the budget: a run of the steps left after the hold began (fresh
    # weights and optimizer), at the held lr until the same cooldown.
    probe = next((k for k in range(peak_step, len(lrs)) if abs(lrs[k] - held) <= 0.02 * held), peak_step)
    restart_counted = restart[probe:]
    return {"exact": lrs, "linear_warmup": ramp + lrs[peak_step + 1:],
            "tuned_peak": [x * tuned_peak(task) / peak for x in lrs],
            "capped": capped, "capped_085": [0.85 * x for x in capped], "restart": restart,
            "restart_counted": restart_counted}


def main(task: str, seeds: str, variant: str = "default", overrides: str = "{}", only: str = "") -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = types.SimpleNamespace(smoke=False, device="cpu")
    with open(HERE / "results" / "replay_lab.jsonl", "a") as out:
        for seed in (int(s) for s in seeds.split(",")):
            learned = quality.run_one(task, f"mlrs_learned:{variant}", 1e-3, seed, options,
                                      overrides={"logging_steps": 1})
            lrs = applied_lrs(learned, learned["steps"])
            runs, edited = {"learned": learned}, edits(lrs, task)
            wanted = only.split(",") if only else list(edited)
            unknown = set(wanted) - set(edited)
            if unknown:
                raise ValueError(f"replay_lab: unknown edits {sorted(unknown)}; edits: {sorted(edited)}.")
            for name, sequence in edited.items():
                if name not in wanted:
                    continue
                runs[name] = quality.run_one(task, "replay", 1e-3, seed, options, lr_sequence=sequence,
                                             steps=len(sequence), overrides=json.loads(overrides))
                runs[name]["replay"] = name
                runs[name]["overrides"] = json.loads(overrides)
            for name, r in runs.items():
                peak = max(x for _, x in r["lrs"])
                print(f"{task} s={seed} {name:14s} val={r['val_accuracy'] or r['val_loss']:.4f} "
                      f"test={r['test_accuracy'] or r['test_loss']:.4f} peak lr {peak:.2e} ({r['seconds']:.0f}s)",
                      flush=True)
                out.write(json.dumps(r) + "\n")
                out.flush()  # a killed lab loses at most the run in progress


if __name__ == "__main__":
    main(*sys.argv[1:6])
