"""`hf-mlrs`: inspect and plot learned schedules from the command line.

    hf-mlrs info SCHEDULE                      config, stages and provenance of a folder, shipped name or Hub id
    hf-mlrs plot SCHEDULE --out lr.png         the lr each stage produces along a loss trace
    hf-mlrs list                               the shipped schedules: what each was learned on, how it transfers
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _info(args) -> int:
    from .card import OWN_SECTIONS
    from .modeling import MLRSNet

    net = MLRSNet.from_pretrained(args.schedule)
    provenance = {k: v for k, v in net.provenance.items() if k not in OWN_SECTIONS}  # long: in the card
    print(f"schedule            {args.schedule}")
    print(f"hidden size         {net.hidden_size} ({sum(p.numel() for p in net.stages[0].parameters()):,} "
          "parameters per stage)")
    print(f"input normalization {net.input_normalization}")
    print(f"output bias init    {net.output_bias_init}")
    print(f"stages              {net.num_stages}")
    for k, start in enumerate(net.stage_starts):
        switch = float(net.stage_switch_losses[k])
        print(f"  stage {k}: from {start:.3f} of training" + ("" if math.isnan(switch) else
                                                             f", or (stage_by='loss') at loss {switch:.4g}"))
    print("provenance")
    for key, value in provenance.items():
        print(f"  {key:20s}{json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if net.provenance.get("lr_history"):
        lrs = [lr for _, lr in net.provenance["lr_history"]]
        print(f"  {'learned lr':20s}{lrs[0]:.3g} -> {lrs[-1]:.3g} (min {min(lrs):.3g}, max {max(lrs):.3g})")
    return 0


def _plot(args) -> int:
    from .card import plot_schedule
    from .modeling import MLRSNet

    net = MLRSNet.from_pretrained(args.schedule)
    losses = None
    if args.losses:
        with open(args.losses) as f:
            losses = [float(v) for v in f.read().replace(",", " ").split()]
        if not losses or not all(math.isfinite(v) for v in losses):
            raise ValueError(f"{args.losses}: expected finite numbers (the net's input, one per step).")
    path = plot_schedule(net, args.out, losses)
    print(f"wrote {path}")
    return 0


def _list(args) -> int:
    from . import pretrained

    for name in pretrained.available():
        print(summary_line(name, _provenance(pretrained.path(name))))
    return 0


def _provenance(folder) -> dict:
    """A shipped schedule's provenance, read from its config.json alone (no weights loaded)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("provenance") or {}


def summary_line(name: str, provenance: dict) -> str:
    """`name | learned on: ... | transfer: ...` from the schedule's config (zoo entries record both)."""
    learned_on = provenance.get("learned_on")
    if not learned_on:
        steps = provenance.get("steps")
        learned_on = f"{provenance.get('task', 'unknown')}" + (f", {steps:,} steps" if steps else "")
    transfer = (provenance.get("transfer") or {}).get("summary") or "not measured yet"
    return f"{name} | learned on: {learned_on} | transfer: {transfer}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-mlrs", description="Inspect and plot MLR-SNet learning-rate schedules.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="config, stages and provenance of a schedule")
    info.add_argument("schedule", help="a folder, a shipped name (hf-mlrs list) or a Hub repo id")
    info.set_defaults(run=_info)
    plot = commands.add_parser("plot", help="plot the lr each stage produces along a loss trace")
    plot.add_argument("schedule", help="a folder, a shipped name (hf-mlrs list) or a Hub repo id")
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.add_argument("--losses", help="a text file of losses (the net's input units), one per step; default: a "
                      "smooth decay")
    plot.set_defaults(run=_plot)
    listing = commands.add_parser("list", help="schedules shipped with hf_mlrs, with what each was learned on and "
                                  "how it transfers")
    listing.set_defaults(run=_list)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as err:
        print(f"hf-mlrs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
