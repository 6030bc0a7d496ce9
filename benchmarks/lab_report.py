"""Numbers for RESULTS.md from scale_lab.py's records (results/scale_lab.jsonl), without rerunning anything.

Two reports, each over the records of one task and arm (the last record wins where a run was repeated):

    # A/B: two sets of overrides on the same seeds at one starting lr, mean ± standard error and the paired difference
    python benchmarks/lab_report.py ab bbc mlrs_frozen:shipped 1e-3 '{}' '{"mlrs_meta_source": "next_batch"}'

    # the issue's protocol: mean over seeds at each starting lr, the worst start's gap to the best tuned arm of
    # quality.py's results (points of accuracy, or % of the LM's loss; with --test, the test split against the test
    # score of the arm best on validation) and the spread over starts
    python benchmarks/lab_report.py protocol bbc mlrs_callback:shipped '{"next_batch": true}' \
        --reuse benchmarks/results/quality_cpu.json

Scores are quality.py's: validation accuracy, or the validation loss for the LM. `--test` reports the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402


def records(task: str, arm: str, overrides: dict, optimizer: str = "adamw") -> dict[tuple[float, int], dict]:
    """(lr, seed) -> the last record of `task` and `arm` run with exactly `overrides` and `optimizer` ("adamw" or
    "sgd": scale_lab.py takes it among the overrides but records it apart; the earliest records name none: AdamW).
    For `mlrs_frozen:` arms, no "mlrs_meta_source" means held-out batches, on either side: MLRSTrainer's default with
    a frozen schedule until session 27, and scale_lab.py has recorded the next batch (the default since) by name."""
    def normal(o: dict) -> dict:
        return {"mlrs_meta_source": "held_out", **o} if arm.startswith("mlrs_frozen:") else o

    found, overrides = {}, normal(overrides)
    with open(HERE / "results" / "scale_lab.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if (r["task"] == task and r["arm"] == arm and normal(r.get("overrides", {})) == overrides
                    and (r.get("optimizer") or "AdamW").lower() == optimizer):
                found[(r["lr"], r["seed"])] = r
    return found


def value(run: dict, test: bool) -> float:
    if quality.by_loss(run["task"]):
        return run["test_loss" if test else "val_loss"]
    return run["test_accuracy" if test else "val_accuracy"]


def gap(task: str, value: float, target: float) -> float:
    """Behind the target, in points (LM: % of the loss); positive = behind."""
    return (value - target) / target * 100.0 if quality.by_loss(task) else (target - value) * 100.0


def mean_and_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def ab(args) -> None:
    lr = float(args.lr)
    a, b = (records(args.task, args.arm, json.loads(o), args.optimizer) for o in (args.a, args.b))
    seeds = sorted(s for (x, s) in a if x == lr and (x, s) in b)
    if not seeds:
        raise SystemExit(f"no seed has both arms at lr {lr}: run scale_lab.py for each first")
    va = [value(a[(lr, s)], args.test) for s in seeds]
    vb = [value(b[(lr, s)], args.test) for s in seeds]
    scale = 100.0 / statistics.fmean(va) if quality.by_loss(args.task) else 100.0  # % of the loss, or points
    diff = [(y - x) * scale for x, y in zip(va, vb)]
    worse = sum(d > 0 if quality.by_loss(args.task) else d < 0 for d in diff)
    unit = "%" if quality.by_loss(args.task) else " points"
    print(f"{args.task} {args.arm} lr {lr:g}, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)})"
          f"{' (test split)' if args.test else ''}")
    for name, overrides, values in (("A", args.a, va), ("B", args.b, vb)):
        print(f"  {name} {overrides}: " + "{:.4f} ± {:.4f}".format(*mean_and_se(values)))
    print("  B - A paired: {:+.2f} ± {:.2f}".format(*mean_and_se(diff)) + f"{unit}, B worse on {worse} of {len(diff)}")


def protocol(args) -> None:
    seeds = {int(s) for s in args.seeds.split(",")}
    found = records(args.task, args.arm, json.loads(args.overrides), args.optimizer)
    runs = {k: r for k, r in found.items() if k[1] in seeds}
    if not runs:
        raise SystemExit(f"no record of {args.arm} on {args.task} with overrides {args.overrides}")
    earlier = json.loads(Path(args.reuse).read_text())["runs"]
    summary = quality.summarize([r for r in earlier if r["task"] == args.task])[args.task]
    target = summary["target"]
    if args.test:  # the test score of the arm that is best on validation (the one a user would have picked)
        tuned = {a: t for a, t in summary["arms"].items() if a.startswith("tuned:")}
        best = max(tuned, key=lambda a: tuned[a]["score"])
        target = tuned[best]["test_loss" if quality.by_loss(args.task) else "test_accuracy"][0]
    per_lr: dict[float, list[float]] = {}
    for (lr, _), r in sorted(runs.items()):
        per_lr.setdefault(lr, []).append(value(r, args.test))
    means = {lr: statistics.fmean(v) for lr, v in per_lr.items()}
    loss = quality.by_loss(args.task)
    worst = max(means.values()) if loss else min(means.values())
    behind = gap(args.task, worst, target)
    print(f"{args.task} {args.arm} {args.overrides}{' (test split)' if args.test else ''}: seeds per start "
          f"{min(len(v) for v in per_lr.values())}, best tuned {target:.4f}")
    print("  by start " + " / ".join(f"{lr:g}: {m:.4f}" for lr, m in means.items()))
    print(f"  mean {statistics.fmean(means.values()):.4f}, worst-start gap {behind:+.2f}{'%' if loss else ' points'}, "
          f"spread {max(means.values()) - min(means.values()):.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="report", required=True)
    p = sub.add_parser("ab", help="two sets of overrides, paired by seed")
    p.add_argument("task"), p.add_argument("arm"), p.add_argument("lr"), p.add_argument("a"), p.add_argument("b")
    p.add_argument("--test", action="store_true", help="the test split instead of the validation split")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="the runs' optimizer")
    p.set_defaults(run=ab)
    p = sub.add_parser("protocol", help="every starting lr against the best tuned arm")
    p.add_argument("task"), p.add_argument("arm"), p.add_argument("overrides", nargs="?", default="{}")
    p.add_argument("--reuse", default=str(HERE / "results" / "quality_cpu.json"))
    p.add_argument("--seeds", default="0,1,2", help="the protocol's seeds (default 0,1,2, as quality.py)")
    p.add_argument("--test", action="store_true", help="the test split instead of the validation split")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="the runs' optimizer (with sgd, "
                   "--reuse benchmarks/results/quality_cpu_sgd.json)")
    p.set_defaults(run=protocol)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
