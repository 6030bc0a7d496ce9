"""How should `recipes/zoo.py --select` score its candidate shapes? (RESULTS.md section 3b, session 29.)

`--select K` keeps, of the last-round runs of K meta-training draws, the one whose shape trails the best tuned
built-in least on the entry's own tasks, each candidate scored by one seed-0 run per task with its gamma tuned over
two grid values (`benchmarks/transfer.py`'s `selection_scores`). A held-out variant is then applied another way:
frozen, its scale learned (`mlrs_gamma="learned"`, the next batch, the selected cooldown and start), on a task it
never saw. This lab applies every candidate the way the selection will be used, on several seeds, on the entry's
tasks and on its held-out task, so two questions get numbers: does scoring candidates as applied (and on more seeds)
pick another shape, and does either score predict the held-out task?

    python recipes/zoo.py --entry multitask-without-bbc --select 3          # the draws and their candidates first
    python benchmarks/selection_lab.py run multitask-without-bbc --tasks digits,fashion,lm,bbc --seeds 0,1,2
    python benchmarks/selection_lab.py report multitask-without-bbc

`run` appends one record per (candidate, task, seed) to results/selection_lab.jsonl (a record already there is not
rerun: the script resumes); `report` prints per candidate the seed-0 selection score of its zoo build, its mean gap
as applied on the entry's tasks, and its gap on the held-out task (points; LM: % of the loss; positive = behind the
best tuned arm of quality.py's results), with the choice each score makes.
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
sys.path.insert(0, str(HERE.parent / "recipes"))
import lab_report  # noqa: E402
import quality  # noqa: E402


RECORDS = HERE / "results" / "selection_lab.jsonl"


def candidates(entry: str, count: int) -> tuple[list[dict], list[str]]:
    """The candidates `zoo.py --entry <entry> --select <count>` saved, with its seed-0 scores (its selection record),
    and the tasks the entry was meta-trained on."""
    import zoo

    target = zoo.pool_dir(entry, count, "select")
    config = json.loads((target / "config.json").read_text())
    selection = config["provenance"]["selection"]
    saved = zoo.candidates_dir(entry, count, target)
    for i, c in enumerate(selection):
        c["folder"] = str(saved / f"run-{i:02d}")
    return selection, sorted({p.split(":")[0] for p in zoo.entry(entry)["pairs"]})


def as_applied(folder: str, outputs: list[float]):
    """A candidate as the selection would ship it (`zoo.as_shipped`)."""
    import zoo

    from hf_mlrs import MLRSNet

    return zoo.as_shipped(MLRSNet.from_pretrained(folder), outputs)


def load_records(entry: str) -> dict[tuple[str, str, int], dict]:
    found = {}
    if RECORDS.is_file():
        for line in RECORDS.read_text().splitlines():
            r = json.loads(line)
            if r["entry"] == entry:
                found[(r["candidate"], r["task"], r["seed"])] = r
    return found


def run(options) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    selection, _ = candidates(options.entry, options.count)
    done = load_records(options.entry)
    run_options = argparse.Namespace(smoke=False, device="cpu", optimizer="adamw")
    with open(RECORDS, "a") as out:
        for task in options.tasks.split(","):
            for c in selection:
                for seed in (int(s) for s in options.seeds.split(",")):
                    if (c["run"], task, seed) in done:
                        continue
                    r = quality.run_one(task, "mlrs_transfer_learned", 1e-3, seed, run_options,
                                        schedule_source=as_applied(c["folder"], c["outputs"]))
                    r.update(entry=options.entry, candidate=c["run"])
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    print(f"{task} seed={seed} {c['run']:55s} score={quality.score(r):.4f} "
                          f"gamma_end={r['gammas'][-1][1]:.2e} ({r['seconds']:.0f}s)", flush=True)


def targets(reuse: str) -> dict[str, float]:
    """Per task, the 3-seed mean validation score of the best tuned arm (lab_report.py's target)."""
    runs = json.loads(Path(reuse).read_text())["runs"]
    return {task: s["target"] for task, s in quality.summarize(runs).items()}


def report(options) -> None:
    selection, own = candidates(options.entry, options.count)
    records, target = load_records(options.entry), targets(options.reuse)
    held = sorted({t for (_, t, _) in records} - set(own))
    rows = []
    for c in selection:
        per_task = {}
        for task in own + held:
            values = [lab_report.value(r, test=False) for (run_, t, _), r in records.items()
                      if run_ == c["run"] and t == task]
            if values:
                per_task[task] = (lab_report.gap(task, statistics.fmean(values), target[task]), len(values))
        mean_own = statistics.fmean(per_task[t][0] for t in own) if all(t in per_task for t in own) else None
        rows.append((c, per_task, mean_own))
    print(f"{options.entry}: candidates of --select {options.count}; gaps behind the best tuned arm (3-seed mean), "
          f"points (lm: % of the loss); own tasks {', '.join(own)}; held out {', '.join(held) or '-'}")
    print(f"{'candidate':58s} {'A_t':18s} {'seed-0 score':>12s} {'as applied':>10s} " +
          " ".join(f"{t:>8s}" for t in own + held) + "  seeds")
    for c, per_task, mean_own in rows:
        print(f"{c['run']:58s} {'/'.join(f'{o:.2f}' for o in c['outputs']):18s} {c['mean_gap']:12.2f} "
              f"{'-' if mean_own is None else f'{mean_own:.2f}':>10s} " +
              " ".join(f"{per_task[t][0]:8.2f}" if t in per_task else f"{'-':>8s}" for t in own + held) +
              "  " + ",".join(str(per_task[t][1]) for t in own + held if t in per_task))
    scored = [row for row in rows if row[2] is not None]
    scores = (("seed-0 score (zoo.py today)", lambda row: row[0]["mean_gap"]),
              ("as applied, mean over seeds", lambda row: row[2]))
    for name, key in scores if scored else ():
        c, per_task, _ = min(scored, key=key)
        print(f"choice by {name}: {c['run']}" +
              "".join(f"; {t} {per_task[t][0]:+.2f}" for t in held if t in per_task))
    for t in held:
        both = [row for row in scored if t in row[1]]
        if len(both) > 2:
            for name, key in scores:
                rho = spearman([key(row) for row in both], [row[1][t][0] for row in both])
                print(f"rank correlation of the {name} with the {t} gap over {len(both)} candidates: {rho:+.2f}")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation, tied values sharing their mean rank."""
    def ranks(v):
        return [statistics.fmean(r for r, w in enumerate(sorted(v)) if w == x) for x in v]

    rx, ry = ranks(xs), ranks(ys)
    return statistics.correlation(rx, ry)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("run", run), ("report", report)):
        p = sub.add_parser(name)
        p.add_argument("entry", help="a zoo entry built with --select, e.g. multitask-without-bbc")
        p.add_argument("--count", type=int, default=3, help="its --select count (default 3)")
        p.set_defaults(fn=fn)
        if name == "run":
            p.add_argument("--tasks", required=True, help="comma-separated tasks: its own and its held-out one")
            p.add_argument("--seeds", default="0,1,2")
        else:
            p.add_argument("--reuse", default=str(HERE / "results" / "quality_cpu.json"))
    options = parser.parse_args(argv)
    options.fn(options)


if __name__ == "__main__":
    main()
