"""What a shipped schedule has learned: its lr shape A_t under controlled loss curves, per stage and as applied.

A frozen MLR-SNet maps the normalised training loss x_t (loss / first loss) and its recurrent state to A_t in (0, 1);
the lr is gamma * A_t. This script feeds each schedule's stages the same synthetic loss curves over a run of
`--steps` steps and records A_t, so the questions of issue 10 are answered by measurement, not by reading weights:
- where does it decay?            A_t over the run on a typical curve (`fast`: most of the fall in the first 10%)
- does it react to the loss?      `fast` vs `slow` vs `flat` (same steps, different losses), and `spike` (the loss
                                  jumps back to its start at half of the run): a net that reacts moves A_t
- how do stages differ?           each stage alone over the whole run, and the stages as applied (stage k over the
                                  k-th part of the run, `stage_by="progress"`, the default of MLRSCallback)

    python benchmarks/zoo_shapes.py                      # every shipped schedule -> results/zoo_shapes.{json,md,png}
    python benchmarks/zoo_shapes.py --schedules lm-bytes,outputs/zoo/multitask-without-lm/schedule

CPU, seconds: only the 11,776-parameter LSTM runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))  # zoo.py

# Normalised loss curves x_t (t = 0..T-1), all starting at 1: the net's input on any task (initial_loss normalisation).
PROBES = {
    "fast": lambda t, T: 0.35 + 0.65 * math.exp(-t / (0.05 * T)),
    "slow": lambda t, T: 0.35 + 0.65 * math.exp(-t / (0.5 * T)),
    "flat": lambda t, T: 1.0,
    "spike": lambda t, T: 0.35 + 0.65 * math.exp(-t / (0.05 * T)) if t < T // 2 else 1.0,
}


def applied(net, curve: list[float]) -> list[float]:
    """A_t as MLRSCallback applies the frozen net: the library's own MLRSScheduler (stages by training progress,
    input normalised by the first loss, state carried across stage switches) at gamma 1 on a run of len(curve)."""
    from hf_mlrs import MLRSScheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = MLRSScheduler(optimizer, net, gamma=1.0, num_training_steps=len(curve))
    return [scheduler.observe(x) for x in curve]


def measure(net, steps: int) -> dict:
    """A_t of each stage alone from the zero state (the card's `stage_outputs`) and of the stages as applied."""
    from hf_mlrs.card import stage_outputs

    curves = {name: [f(t, steps) for t in range(steps)] for name, f in PROBES.items()}
    per_stage = {name: stage_outputs(net, c) for name, c in curves.items()}
    return {"stages": {k: {name: per_stage[name][k] for name in curves} for k in range(net.num_stages)},
            "applied": {name: applied(net, c) for name, c in curves.items()}}


# Where the table reads A_t: away from the paper's stage switches (1/3, 2/3), whose first steps are transients of the
# recurrent state; 1.0 is the last step.
MARKS = (0, 0.1, 0.25, 0.5, 0.8, 1.0)


def at(values: list[float], fraction: float) -> float:
    """A_t at step int(fraction x steps) (the first step of a stage starting at that fraction), or the last step."""
    return values[min(len(values) - 1, int(fraction * len(values)))]


def summary(name: str, result: dict) -> list[str]:
    """Table rows: A_t at MARKS of the run, and the reaction to the loss."""
    rows = []
    marks = MARKS
    for label, curves in [(f"stage {k}", v) for k, v in result["stages"].items()] + [("applied", result["applied"])]:
        fast = curves["fast"]
        # Reaction: how A_t moves when the loss does (same step, different loss): slow/fast at 10%, spike/fast at 60%.
        slow_vs_fast = at(curves["slow"], 0.1) / at(fast, 0.1)
        spike_vs_fast = at(curves["spike"], 0.6) / at(fast, 0.6)
        rows.append(f"| {name} | {label} | " + " | ".join(f"{at(fast, m):.3f}" for m in marks)
                    + f" | {at(curves['flat'], 0.5):.3f} | {slow_vs_fast:.2f} | {spike_vs_fast:.2f} |")
    return rows


def describe(result: dict) -> str:
    """One paragraph: where the applied schedule decays, by how much, and whether any stage reacts to the loss."""
    fast = result["applied"]["fast"]
    steps = len(fast)
    levels = [at(fast, m) for m in MARKS]  # read away from the switch transients
    half = next((t for t, a in enumerate(fast) if a < 0.5 * fast[0]), None)
    where = "never falls below half of its start" if half is None else f"first falls below half of its start at " \
        f"{half / steps:.0%} of the run"
    low, high = min(levels), max(levels)
    if low < fast[0] / 1.05:
        change = f"lowest {low:.3g}: {fast[0] / low:.3g}x below its start"
    elif high > fast[0] * 1.05:
        change = f"highest {high:.3g}: it rises, {high / fast[0]:.3g}x above its start"
    else:
        change = "nearly flat"
    # Reaction: the largest relative change of A_t at the same step when only the loss curve differs.
    reaction = max(abs(at(curves[other], m) / at(curves["fast"], m) - 1)
                   for curves in list(result["stages"].values()) + [result["applied"]]
                   for other in ("slow", "flat", "spike") for m in (0.1, 0.5, 0.6, 0.9))
    reacts = "barely reacts to the loss" if reaction < 0.05 else "reacts to the loss"
    return (f"As applied (stages switching at their fractions of the run), A_t = lr / gamma starts at {fast[0]:.3g}, "
            f"{where}, and ends at {fast[-1]:.3g} ({change}). It "
            f"{reacts}: with the same steps and a different loss curve, A_t moves by at most {reaction:.1%}.")


def write_card(folder: Path, name: str, result: dict, rows: list[str], header: str, steps: int) -> None:
    from hf_mlrs import MLRSNet, pretrained

    net = MLRSNet.from_pretrained(folder)
    net.provenance["shape_probe"] = {"summary": describe(result), "table": header + "\n" + "\n".join(rows),
                                     "command": f"python benchmarks/zoo_shapes.py --schedules {name} --write-cards",
                                     "steps": steps}
    net.save_pretrained(folder, repo_id=pretrained.name_of(folder))
    print(f"card updated: {folder}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for probe, style in (("fast", "-"), ("slow", "--"), ("spike", ":")):
            for k, curves in result["stages"].items():
                ax.plot(curves[probe], style, color=f"C{k}", lw=1, alpha=0.6,
                        label=f"stage {k}" if probe == "fast" else None)
            ax.plot(result["applied"][probe], style, color="k", lw=1.6, label=f"applied, {probe} loss")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("A_t (lr / gamma)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve(names: list[str]) -> dict[str, Path]:
    import zoo

    from hf_mlrs import pretrained

    found = {}
    for name in names:
        if name in zoo.ZOO:
            folder = zoo.schedule_dir(name)
        elif Path(name).is_dir():
            folder = Path(name)
        else:
            folder = pretrained.path(name)
        if (folder / "config.json").exists():
            found[name] = folder
        else:
            print(f"{name}: no schedule at {folder} (meta-train it first: python recipes/zoo.py --entry {name})")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", help="zoo entries, shipped names or folders (default: every shipped one)")
    parser.add_argument("--steps", type=int, default=300, help="run length of the probes")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--write-cards", action="store_true", help="add a 'What it learned' section to each card")
    options = parser.parse_args(argv)
    from hf_mlrs import MLRSNet, pretrained

    names = options.schedules.split(",") if options.schedules else pretrained.available()
    header = ("| schedule | stage | " + " | ".join(f"A at {m:.0%}" if m == 0 else f"{m:.0%}" for m in MARKS)
              + " | flat loss, 50% | slow / fast loss at 10% | spike / fast at 60% |\n|---" + "|---" * 10 + "|")
    results, rows, text = {}, [], []
    for name, folder in resolve(names).items():
        net = MLRSNet.from_pretrained(folder).eval()
        results[name] = measure(net, options.steps)
        own = summary(name, results[name])
        rows += own
        text.append(f"- {name}: {describe(results[name])}")
        if options.write_cards:
            write_card(folder, name, results[name], own, header, options.steps)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    table = header + "\n" + "\n".join(rows) + "\n\n" + "\n".join(text)
    command = " ".join(["python benchmarks/zoo_shapes.py"] + (sys.argv[1:] if argv is None else list(argv)))
    (out / "zoo_shapes.md").write_text(f"# Learned shapes ({options.steps}-step probes)\n\nCommand: `{command}`"
                                       f"\n\n{table}\n")
    (out / "zoo_shapes.json").write_text(json.dumps({"steps": options.steps, "results": results}))
    if results:
        plot(results, out / "zoo_shapes.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
