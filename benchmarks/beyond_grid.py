"""A frozen schedule at gammas outside the equal-tuning grid: does the shape itself do well at a larger scale?

transfer.py tunes a zoo schedule's gamma on the built-in schedules' lr grid (equal tuning). A schedule whose peak is
well below 1 (multitask-default starts at 0.38 of gamma) then peaks below the grid's top lr; when its best gamma is
the grid's top, this runs it at larger gammas, 3 seeds, and prints the mean validation score. Not equal tuning: a
diagnostic of the shape, reported beside the table (RESULTS.md section 8).

    python benchmarks/beyond_grid.py fashion outputs/zoo/multitask-without-fashion/schedule 3e-2,1e-1
"""

import json
import statistics
import sys
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402


def main(task: str, schedule: str, gammas: str, seeds: str = "0,1,2") -> None:
    options = types.SimpleNamespace(smoke=False, device="cpu")
    with open(HERE / "results" / "beyond_grid.log", "a") as log:
        for gamma in (float(g) for g in gammas.split(",")):
            scores = [quality.score(quality.run_one(task, "mlrs_transfer", gamma, int(s), options,
                                                    schedule_source=schedule)) for s in seeds.split(",")]
            rounded = json.dumps([round(x, 4) for x in scores])
            mean = statistics.fmean(scores)
            line = f"{task} {schedule} gamma={gamma:g} seeds={seeds} scores={rounded} mean={mean:.4f}"
            print(line, flush=True)
            log.write(line + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
