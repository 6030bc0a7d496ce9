"""Model card and lr plot of a saved schedule: what it is, how it was learned, what lr it produces.

The functions take an `MLRSNet` but this module does not import `modeling.py` (which imports it). A card links only
to what exists: the paper. It never records a path of this machine: the usage snippet names the Hub repo the card
is pushed to, and provenance names a local model by its name (see `MLRSTrainer.provenance`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData


PAPER_URL = "https://arxiv.org/abs/2007.14546"
# Provenance keys shown in sections of their own (or only in the plot), not in the "How it was learned" table.
OWN_SECTIONS = ("lr_history", "learned_shapes", "episode_records", "transfer", "shape_probe", "selection")
TRANSFER_HEADING = "## Transfer"
CARD_NAME = "README.md"
PLOT_NAME = "lr_curve.png"
CITATION = """@article{shu2022mlrsnet,
  title   = {MLR-SNet: Transferable LR Schedules for Heterogeneous Tasks},
  author  = {Shu, Jun and Zhu, Yanwen and Zhao, Qian and Xu, Zongben and Meng, Deyu},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year    = {2022}
}"""


def reference_loss_trace(net, steps: int = 300) -> list[float]:
    """A smooth, decaying loss in the net's input units: 1 -> 0.05 normalised, or ln(10) -> 0.01 raw."""
    start, end = (2.3, 0.01) if net.input_normalization == "raw" else (1.0, 0.05)
    return [start * (end / start) ** (t / (steps - 1)) for t in range(steps)]


@torch.no_grad()
def stage_outputs(net, losses: list[float]) -> list[list[float]]:
    """A_t of every stage along `losses` (already normalised), each from the zero state with the state carried."""
    curves = []
    for stage in range(net.num_stages):
        state, curve = None, []
        for x in losses:
            out, state = net(torch.tensor([[x]]), state, stage=stage)
            curve.append(float(out))
        curves.append(curve)
    return curves


def plot_schedule(net, path: str | Path, losses: list[float] | None = None) -> Path:
    """Save a PNG: the lr/gamma each stage produces along a loss trace, and the lr learned at meta-training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    losses = losses if losses is not None else reference_loss_trace(net)
    history = net.provenance.get("lr_history") or []
    shapes = net.provenance.get("learned_shapes") or {}  # multi-episode meta-training: A_t per (task, model)
    figure = Figure(figsize=(10 if history or shapes else 5.5, 3.6), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if history or shapes else 1, squeeze=False)[0]
    ax = axes[0]
    for k, curve in enumerate(stage_outputs(net, losses)):
        ax.plot(curve, label=f"stage {k} (from {net.stage_starts[k]:.2f} of training)")
    twin = ax.twinx()
    twin.plot(losses, color="grey", linestyle=":", label="input loss")
    twin.set_ylabel("net input (loss, " + net.input_normalization + ")")
    ax.set(xlabel="step", ylabel="A_t = lr / gamma", title="Response to a loss trace")
    ax.legend(fontsize=7, loc="upper right")
    if shapes:
        for name, points in shapes.items():
            if points:
                axes[1].plot(*zip(*points), label=name)
        axes[1].set(xlabel="fraction of the run", ylabel="A_t = lr / gamma", ylim=(0, 1),
                    title="Learned at meta-training (last round)")
        axes[1].legend(fontsize=7)
    elif history:
        steps, lrs = zip(*history)
        axes[1].plot(steps, lrs)
        title = f"Learned at meta-training: {net.provenance.get('task', '')}"
        axes[1].set(xlabel="step", ylabel="learning rate", title=title)
    figure.tight_layout()
    path = Path(path)
    canvas.print_png(str(path))
    return path


def render_card(net, repo_id: str | None = None) -> ModelCard:
    """The model card: YAML metadata, usage, provenance, stages and citation."""
    provenance = {k: v for k, v in net.provenance.items() if k not in OWN_SECTIONS}
    data = ModelCardData(
        library_name="hf_mlrs",
        license="apache-2.0",
        tags=["hf_mlrs", "mlr-snet", "learning-rate-schedule", "meta-learning", "arxiv:2007.14546"],
    )
    name = repo_id or "path/to/this/folder"
    rows = "\n".join(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in provenance.items())
    stages = "\n".join(
        f"| {k} | {start:.3f} | {float(net.stage_switch_losses[k]):.4g} |" for k, start in enumerate(net.stage_starts)
    )
    sections = "".join(section(net.provenance) for section in (shape_section, selection_section, episodes_section,
                                                                transfer_section))
    content = f"""---
{data.to_yaml()}
---

# MLR-SNet learning-rate schedule{': ' + str(provenance['task']) if provenance.get('task') else ''}

A learning-rate schedule learned by [MLR-SNet]({PAPER_URL}) (Shu et al., TPAMI 2022) with hf_mlrs:
a small LSTM that reads the training loss each step and outputs the learning rate `gamma * A_t`, `A_t` in (0, 1).

![learned lr]({PLOT_NAME})

## Use it with any `transformers.Trainer`

```python
from hf_mlrs import MLRSCallback, MLRSNet

schedule = MLRSNet.from_pretrained("{name}")
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[MLRSCallback(schedule)])
```

{gamma_note(net)}{cooldown_note(net)}

## Stages

Input normalisation: `{net.input_normalization}`; hidden size {net.hidden_size}.

| stage | starts at (fraction of training) | switch loss (horizon-free mode) |
|---|---|---|
{stages}

## How it was learned

| field | value |
|---|---|
{rows if rows else '| (no provenance recorded) | |'}

{sections}## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(content)


def gamma_note(net) -> str:
    """What the Trainer's `learning_rate` means for this schedule (MLRSNet.start_output)."""
    if net.start_output == 1.0:
        return "`gamma` defaults to the Trainer's `learning_rate`: the schedule's lr never exceeds it."
    return (f"`gamma` defaults to the Trainer's `learning_rate / {net.start_output:g}` (`start_output` in "
            "config.json, the net's first output in the run it was learned from): the schedule starts at "
            "`learning_rate`, as a built-in schedule peaks at it, so tune `learning_rate` on the grid you would use "
            "for those.")


def cooldown_note(net) -> str:
    """One sentence on the final cooldown the schedule is applied with by default, if it records one."""
    if not net.cooldown_fraction:
        return ""
    return (f" Over the last {net.cooldown_fraction:.0%} of training the lr anneals linearly towards 0 on top of "
            f"the schedule (`cooldown_fraction={net.cooldown_fraction:g}` in config.json, the cooldown its transfer "
            "was measured with); pass `MLRSCallback(schedule, cooldown_fraction=0)` to turn it off.")


def shape_section(provenance: dict) -> str:
    """What the schedule learned, measured by `benchmarks/zoo_shapes.py --write-cards` under controlled loss curves."""
    probe = provenance.get("shape_probe") or {}
    if not probe:
        return ""
    return f"""## What it learned

{probe['summary']}

{probe['table']}

Measured with `{probe['command']}`: each stage fed the same synthetic normalised loss curves over a
{probe['steps']}-step run (`fast`: most of the fall in the first 10%; `slow`; `flat`; `spike`: the loss jumps back to
its start at half of the run). A net that reacts to the loss moves A_t between curves; ratios of 1.00 mean it does not.

"""


def selection_section(provenance: dict) -> str:
    """A selected schedule (`recipes/zoo.py --select`): every candidate run, its shape and its gap per task, the
    chosen one in bold."""
    candidates = provenance.get("selection") or []
    if not candidates:
        return ""
    tasks = sorted({task for c in candidates for task in c["gaps"]})

    def line(c):
        cells = [c["run"], ", ".join(f"{a:.2g}" for a in c["outputs"])] + [f"{c['gaps'][t]:+.2f}" for t in tasks]
        cells.append(f"{c['mean_gap']:+.2f}")
        bold = c["run"] == provenance.get("selected_run")
        return "| " + " | ".join(f"**{x}**" if bold else x for x in cells) + " |"

    return f"""## How this run was chosen

Each candidate is one whole meta-training run's shape (its stages taken at the middle of each stage of that run),
applied frozen at a tuned gamma to the standard benchmark cell of every task it was meta-trained on; the one that
trails the best tuned built-in schedule least on average (accuracy points; LM: % of the loss) is this schedule.

| candidate run | A_t at its stage midpoints | {' | '.join(tasks)} | mean gap |
|---|---|{'---|' * len(tasks)}---|
{chr(10).join(line(c) for c in candidates)}

"""


def episodes_section(provenance: dict) -> str:
    """Per episode of a multi-task meta-training: the loss scale the net saw, its normalised input and its output."""
    records = provenance.get("episode_records") or []
    if not records:
        return ""

    def span(v):
        return "-" if not v else f"{v[0]:.3g} .. {v[1]:.3g}"

    rows = "\n".join(
        f"| {r['index']} | {r['task']}/{r['model']} | {r['steps']} | {r['loss_scale']:.3g} | {span(r['input_range'])} "
        f"| {span(r['output_range'])} | {span(r['lr_range'])} | "
        + ", ".join(f"{k[5:]} {v:.4g}" for k, v in r.get("eval", {}).items()) + " |" for r in records)
    return f"""## Episodes

One net, meta-trained over these runs in order (each a fresh model with its own meta set and recurrent state).
Loss scale: the first raw training loss; input: the net's normalised input (logged means); A_t = lr / gamma.

| episode | task/model | steps | loss scale | input | A_t | lr | final eval |
|---|---|---|---|---|---|---|---|
{rows}

"""


def transfer_section(provenance: dict) -> str:
    """The measured transfer table of a zoo entry (`benchmarks/transfer.py --write-cards`), or a placeholder."""
    transfer = provenance.get("transfer") or {}
    if "zoo_entry" not in provenance and not transfer:  # a schedule of your own: nothing measured, nothing to say
        return ""
    body = transfer.get("table") or (
        "Not measured yet. Fill in with `python benchmarks/transfer.py --entries "
        f"{provenance['zoo_entry']} --write-cards` (see benchmarks/RESULTS.md).")
    summary = f"{transfer['summary']}\n\n" if transfer.get("summary") else ""
    return f"{TRANSFER_HEADING}\n\n{summary}{body}\n\n"


def write_card_and_plot(net, folder: Path, repo_id: str | None = None) -> None:
    """Write the model card and the lr plot of `net` (an `MLRSNet`) into `folder`."""
    plot_schedule(net, folder / PLOT_NAME)
    render_card(net, repo_id).save(folder / CARD_NAME)
