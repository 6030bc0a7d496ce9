"""Is a cell's gap bigger than its seed noise? One cell re-measured on many seeds, every arm run here and now.

transfer.py measures a held-out cell on 3 seeds and reuses the tuned built-ins from quality.py's results, run in an
earlier session. On the LM (a 340-step GPT-2 from scratch, tuned at 3e-3, the edge of stability) a seed's loss moves
by up to 2% with nothing but the thread count changed (RESULTS.md section 8, session 20), the size of the gaps the
targets are about. This runs, in one process and one environment, on seeds 0..N-1 at the lrs already tuned (on seed
0, as transfer.py does; nothing is re-tuned):
  builtin:<s>   each tuned built-in schedule at its tuned lr (read from --reuse, quality.py's results)
  zoo           each saved schedule given as FOLDER@LR, frozen (Trainer + MLRSCallback, its recorded cooldown
                unless --cooldown), at that learning_rate (gamma = LR / the schedule's start_output)
  learned       with --learned, each saved schedule frozen with its lr scale learned (no lr)
and prints, per arm, the mean and the standard error over seeds, and its gap to the tuned constant and to the best
tuned built-in paired by seed (every arm sees the same data order and initial model per seed, so the paired
difference is the less noisy comparison).

    python benchmarks/seeds_lab.py lm --seeds 10 --reuse benchmarks/results/quality_cpu.json \
        --schedules outputs/zoo/multitask-without-lm-select3-cooled/schedule@0.003 --learned

Appends every run to results/seeds/<task>.jsonl (schedules recorded relative to the repository) and writes
results/seeds/<task>.md; a rerun reuses the runs already there with the same arm, lr, seed and thread count.
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
from lab_report import mean_and_se  # noqa: E402


def tuned_lrs(reuse: str, task: str) -> dict[str, float]:
    """The tuned lr of each built-in schedule on `task` at its standard model and length, from quality.py's results."""
    lrs = {}
    for r in json.loads(Path(reuse).read_text())["runs"]:
        kind, _, name = r["arm"].partition(":")
        if r["task"] == task and kind == "tuned" and name in quality.SCHEDULES and r.get("model") in (
                None, quality.TASKS[task]["model"]):
            lrs[name] = r["lr"]
    return lrs


def paired(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Mean and standard error of x - y over seeds."""
    return mean_and_se([x - y for x, y in zip(xs, ys)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(quality.TASKS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--reuse", default=str(HERE / "results" / "quality_cpu.json"),
                        help="quality.py results that hold the tuned lr of each built-in schedule")
    parser.add_argument("--schedules", default="", help="saved schedules as FOLDER@LR, comma-separated")
    parser.add_argument("--cooldown", type=float, default=None, help="override the schedules' recorded cooldown")
    parser.add_argument("--learned", action="store_true", help="also each schedule with its lr scale learned")
    parser.add_argument("--out", default=str(HERE / "results" / "seeds"))
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{options.task}.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["lr"], r["seed"], r["threads"])] = r["score"]

    task, model = options.task, quality.TASKS[options.task]["model"]
    steps = transfer.standard_steps(task, model)
    run_options = argparse.Namespace(smoke=False, device="cpu", optimizer="adamw")
    arms = [(f"builtin:{name}", "grid:" + name, lr, None, None) for name, lr in tuned_lrs(options.reuse, task).items()]
    for spec in filter(None, options.schedules.split(",")):
        folder, _, lr = spec.rpartition("@")
        name = transfer.relative(folder)  # as transfer.py records a folder: never a path of this machine
        cooldown = None if options.cooldown is None else {"mlrs_cooldown_fraction": options.cooldown}
        # the gamma an lr gives depends on the schedule's start_output: it is part of the arm's name
        arms.append((f"zoo:{name}{transfer.start_suffix(folder)}", "mlrs_transfer", float(lr), folder, cooldown))
        # a learned scale does not start from the lr: start_output plays no part in its runs
        learned = (f"learned:{name}", "mlrs_transfer_learned", 1e-3, folder, None)
        if options.learned and learned not in arms:  # once per schedule, however many lrs it is given at
            arms.append(learned)

    scores: dict[tuple[str, float], list[float]] = {}  # per (arm, lr): one schedule may be given at several lrs
    for arm, run_arm, lr, folder, overrides in arms:
        for seed in range(options.seeds):
            key = (arm, lr, seed, threads)
            if key not in done:
                r = quality.run_one(task, run_arm, lr, seed, run_options, schedule_source=folder, model=model,
                                    steps=steps, overrides=overrides)
                done[key] = round(quality.score(r), 5)
                with open(log, "a") as f:
                    f.write(json.dumps({"task": task, "model": model, "steps": steps, "arm": arm, "lr": lr,
                                        "seed": seed, "threads": threads, "score": done[key]}) + "\n")
                print(f"{arm} lr={lr:g} seed={seed} score={done[key]:.4f}", flush=True)
            scores.setdefault((arm, lr), []).append(done[key])

    builtins = [a for a in scores if a[0].startswith("builtin:")]
    constant = next(a for a in builtins if a[0] == "builtin:constant")
    best = max(builtins, key=lambda a: statistics.fmean(scores[a]))
    unit = "% of the loss" if quality.by_loss(task) else "accuracy points"

    def gap(a, b):  # behind b, positive = behind, in the task's unit
        m, se = paired(scores[a], scores[b])
        scale = 100 / abs(statistics.fmean(scores[b])) if quality.by_loss(task) else 100
        return f"{-m * scale:+.2f} ± {se * scale:.2f}"

    lines = [f"# {task}/{model}, {steps} steps, seeds 0-{options.seeds - 1}, OMP_NUM_THREADS={threads}", "",
             f"Gaps paired by seed, mean ± standard error, in {unit}; positive = behind. Best tuned built-in by mean: "
             f"{best[0]}.", "",
             "| arm | lr | mean | std over seeds | behind the tuned constant | behind the best tuned built-in |",
             "|---|---|---|---|---|---|"]
    for arm, _, lr, _, _ in arms:
        s = scores[(arm, lr)]
        lines.append(f"| {arm} | {'learned' if arm.startswith('learned:') else f'{lr:g}'} | "
                     f"{statistics.fmean(s):.4f} | {statistics.stdev(s):.4f} | {gap((arm, lr), constant)} | "
                     f"{gap((arm, lr), best)} |")
    text = "\n".join(lines) + "\n"
    (out / f"{task}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
