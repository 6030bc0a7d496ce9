"""Is a frozen shape's gap the shape, or where the 1-3-10 gamma grid puts its plateau? A diagnostic, not a rule.

A zoo net at gamma g applies lr = g x A_t, and a selected shape's first stage is about 0.5: at equal tuning its plateau
lands between the grid values the built-in schedules are tuned on (0.47 x 3e-3 = 1.4e-3 on the LM, whose tuned
constant is 3e-3). This replays the net's applied lrs in a plain Trainer (quality.py's `replay` arm, no meta step)
twice: as applied at its tuned gamma (a check of the replay), and scaled so that its first stage sits on each grid
value given (gamma = the peak lr, as for every built-in schedule), seed 0 for every peak, the other seeds at the best.

The per-step lrs are rebuilt from the seed-0 run's logged lrs in a transfer results file: the level of each stage
(frozen nets are constant per stage), the stages at equal thirds, and the cooldown of `hf_mlrs.MLRSScheduler`
(`hf_mlrs.scheduler.cooldown_factor`, the same function).

    python benchmarks/peak_lab.py benchmarks/results/selected_cooldown lm gpt2-small multitask-without-lm-select3 \
        0.003 0.2 0.003,0.01

Appends every run to <results folder>/peak_lab.jsonl and prints one line per run.
"""

import json
import math
import statistics
import sys
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402

from hf_mlrs.scheduler import cooldown_factor  # noqa: E402


def stage_levels(results: Path, task: str, model: str, schedule: str, gamma: float,
                 cooldown_fraction: float) -> tuple[list[float], int]:
    """A_t of each third of the seed-0 run of `schedule` at `gamma` (read at the middle of the part of each third
    before the cooldown), and its steps."""
    runs = json.loads((results / "transfer_cpu.json").read_text())["runs"]
    run = next(r for r in runs if r["task"] == task and r.get("model") == model and r["seed"] == 0 and r["lr"] == gamma
               and r["arm"].startswith(f"zoo:{schedule}@"))
    steps, logged = int(run["steps"]), dict(run["lrs"])

    def at(step):
        return logged[min(logged, key=lambda s: abs(s - step))] / gamma

    ends = [min((k + 1) / 3, 1 - cooldown_fraction) for k in range(3)]
    return [at(steps * (k / 3 + ends[k]) / 2) for k in range(3)], steps


def shape(levels: list[float], steps: int, cooldown_fraction: float) -> list[float]:
    cooldown = math.floor(cooldown_fraction * steps)
    return [levels[min(2, int(3 * k / steps))] * cooldown_factor(steps - k, cooldown) for k in range(steps)]


def main(argv):
    folder, task, model, schedule, gamma, cooldown, peaks = argv
    folder, gamma, cooldown = Path(folder), float(gamma), float(cooldown)
    levels, steps = stage_levels(folder, task, model, schedule, gamma, cooldown)
    a = shape(levels, steps, cooldown)
    options = types.SimpleNamespace(smoke=False, device="cpu", optimizer="adamw")

    def run(scale, seed, tag):
        r = quality.run_one(task, "replay", 1e-3, seed, options, lr_sequence=[scale * x for x in a], steps=steps,
                            model=model)
        record = {"schedule": schedule, "task": task, "model": model, "tag": tag, "first_lr": scale * a[0],
                  "seed": seed, "score": quality.score(r), "val_loss": r["val_loss"], "levels": levels}
        with open(folder / "peak_lab.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return quality.score(r)

    for seed in (0, 1, 2):
        run(gamma, seed, f"as applied at gamma {gamma:g}")
    scores = {float(p): run(float(p) / levels[0], 0, f"first stage at {p}") for p in peaks.split(",")}
    best = max(scores, key=scores.get)
    rest = [run(best / levels[0], seed, f"first stage at {best:g}") for seed in (1, 2)]
    print(f"first stage at {best:g}: mean score {statistics.fmean([scores[best], *rest]):.4f} over 3 seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
