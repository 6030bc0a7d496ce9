"""A diagnostic for `recipes/zoo.py --select` (RESULTS.md section 8, session 16): candidate runs measured on a task
at equal tuning, with benchmarks/transfer.py's runs (gamma from the task's grid on seed 0, then 3 seeds).

    python benchmarks/candidate_lab.py fashion outputs/zoo/multitask-without-fashion-select3/candidates/run-04
    python benchmarks/candidate_lab.py fashion outputs/zoo/multitask-without-fashion/schedule --cooldown 0.2

Run on the held-out task of a leave-one-task-out variant, it peeks at the task the selection must not see: it says
whether the candidates hold a shape that transfers (an oracle's choice), not how to choose one. One JSON line per
candidate is appended to results/selected/candidate_lab.jsonl (the folder is recorded relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import transfer  # noqa: E402, I001  (first: quality.py puts recipes/, which has a transfer.py of its own, ahead)
import quality  # noqa: E402


def measure(task: str, folder: str, cooldown: float = 0.0, seeds: int = 3) -> dict:
    options = argparse.Namespace(smoke=False, device="cpu", remeasure=None, cooldown=cooldown)
    runs = transfer.Runs(options, log=lambda line: None)
    model = quality.TASKS[task]["model"]
    steps = transfer.standard_steps(task, model)
    grid = quality.TASKS[task]["grid"]
    arm = f"zoo:{folder}"
    gamma, tuned = runs.tuned(task, model, steps, arm, grid, seeds, folder)  # gamma on seed 0, then every seed
    return {"task": task, "candidate": os.path.relpath(folder, HERE.parent), "cooldown_fraction": cooldown,
            "grid": {str(lr): round(quality.score(runs.get(task, model, steps, arm, lr, 0, folder)), 4)
                     for lr in grid}, "gamma": gamma,
            "seeds": [round(quality.score(r), 4) for r in tuned],
            "mean": round(statistics.fmean(map(quality.score, tuned)), 4),
            "shape": [round(a, 4) for a in transfer.shape_of(tuned[0])]}  # A_t on seed 0's run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(quality.TASKS))
    parser.add_argument("folders", nargs="+", help="saved schedules (MLRSNet folders) to measure")
    parser.add_argument("--cooldown", type=float, default=0.0, help="MLRSCallback(cooldown_fraction=...): a linear "
                        "decay to 0 over this last share of the run, on top of the frozen shape")
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = HERE / "results" / "selected" / "candidate_lab.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in options.folders:
        record = measure(options.task, folder, options.cooldown)
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
