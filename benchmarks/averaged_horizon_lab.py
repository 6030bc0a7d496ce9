"""A longer horizon for the one-step meta-objective: the held-out loss at an *averaged* iterate (RESULTS.md 3c).

The one-step lookahead asks "which lr for this step makes the held-out loss lowest right after it?". Late in a run
the step's noise dominates that answer (on a quadratic, E L(w - alpha g) has its minimum at
alpha* = <grad, H grad> ... / (grad^T H grad + tr(H Sigma)), which falls to 0 with the true gradient while the noise
tr(H Sigma) stays): the short-horizon bias that drives every zoo net's lr down within 15% of a run (section 8).

Here the same exact first-order hypergradient is taken at the average of the recent iterates instead,

    e_{t+1} = beta_t e_t + (1 - beta_t) w_{t+1}
    dL_meta(e_{t+1}) / dlog(alpha_t) = (1 - beta_t) <g_meta(e_{t+1}), delta_t>

(one buffer more, the average; the step is linear in alpha as before). A step's noise enters e with weight
(1 - beta) and its curvature penalty with (1 - beta)^2, while the progress of the average is first order: the lr
that is best for the average of the next H = 1 / (1 - beta) iterates, not for the next one. The horizon is
H_t = min(t + 1, H_max, T - t): it grows as the run starts (a uniform average of all iterates so far, so the first
steps are as greedy as today), and shrinks to one step at the end, so the objective itself asks for the anneal that
a fixed cooldown hard-codes today.

This lab learns only the scale (a plain PyTorch AdamW loop, the library's `LearnedScale` with its defaults: a start
relative to the model, growth, then clipped Adam on log(gamma), a meta step every step), on quality.py's tasks and
splits, with references run in the same loop. Arms:

    const:<lr> | wsd:<lr>          a constant lr / warmup-stable-decay (last 20% linear to 0) at a given lr
    greedy | greedy-cool           the one-step objective (H = 1), without / with the library's 20% linear cooldown
    avg<H> | avg<H>-cool           the averaged objective with H_max = H (e.g. avg64), without / with the cooldown
    ...-nogrow                     (suffix) no growth phase: symmetric updates from the relative start

    python benchmarks/averaged_horizon_lab.py lm greedy-cool,avg64,const:3e-3 0,1,2
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import horizon_probe  # noqa: E402  (the plain-loop setup and held-out gradient shared with the probe)


def horizon(step: int, total: int, h_max: int) -> int:
    """H_t of step `step` (0-based) of `total`: min(t + 1, H_max, T - t), at least 1."""
    return max(1, min(step + 1, h_max, total - step))


def run(task_name: str, arm: str, seed: int = 0, start_lr: float = 1e-3, model: str | None = None,
        max_steps: int | None = None) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from hf_mlrs.config import MLRSTrainingArguments, learned_scale

    setup = horizon_probe.plain_setup(task_name, seed, model)
    spec, collate, net, params = setup.spec, setup.collate, setup.net, setup.params
    train_rows, meta_rows, val_rows = setup.train_rows, setup.meta_rows, setup.val_rows
    steps = max_steps or math.ceil(len(train_rows) / spec["batch"]) * spec["epochs"]

    kind, _, value = arm.partition(":")
    fixed = kind in ("const", "wsd")
    cool = "-cool" in kind or kind == "wsd"
    h_max = 1 if kind.startswith("greedy") else int(kind.split("-")[0][3:]) if kind.startswith("avg") else 0
    scale = None if fixed else learned_scale(start_lr, MLRSTrainingArguments)
    if "-nogrow" in kind:  # no growth phase: symmetric clipped Adam on log(gamma) from the relative start
        scale.growing = False
    gamma = float(value) if fixed else scale.gamma
    optimizer = torch.optim.AdamW(params, lr=gamma, weight_decay=0.0)
    cooldown = steps // 5 if cool else 0

    g = torch.Generator().manual_seed(seed)
    mg = torch.Generator().manual_seed(seed + 1)

    def batches():
        while True:
            yield from DataLoader(train_rows, batch_size=spec["batch"], shuffle=True, collate_fn=collate,
                                  generator=g, drop_last=True)

    def meta_grad(weights):
        """Held-out loss and its gradient at `weights` (a batch as the library's meta batch); buffers untouched."""
        index = torch.randint(len(meta_rows), (min(len(meta_rows), spec["batch"]),), generator=mg).tolist()
        return horizon_probe.loss_and_grad_at(net, params, weights, collate([meta_rows[i] for i in index]))

    average = [p.detach().clone() for p in params]  # e_t, the averaged iterate
    lrs, gammas, losses = [], [], []
    source = batches()
    started = time.perf_counter()
    for step in range(steps):
        remaining = steps - step
        factor = remaining / (cooldown + 1) if 0 < remaining <= cooldown else 1.0
        lr = gamma * factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in params]
        loss = net(**next(source)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as Trainer (max_grad_norm=1.0): the step stays linear in lr
        optimizer.step()
        lrs.append(lr)
        gammas.append(gamma)
        losses.append(float(loss.detach()))
        if fixed or not math.isfinite(losses[-1]):
            continue
        with torch.no_grad():
            delta = [p.detach() - b for p, b in zip(params, before)]
            if not scale.calibrated:  # the library's relative start: rescale the first step exactly (linear in lr)
                norm = math.sqrt(sum(float(b.pow(2).sum()) for b in before))
                size = math.sqrt(sum(float(d.pow(2).sum()) for d in delta))
                new_gamma = scale.calibrate(size / max(norm, 1e-30))
                ratio = new_gamma / gamma
                for p, b, d in zip(params, before, delta):
                    p.copy_(b + ratio * d)
                delta = [ratio * d for d in delta]
                gamma = new_gamma
                lrs[-1] = gammas[-1] = gamma
            h = horizon(step, steps, h_max)
            beta = 1.0 - 1.0 / h
            for e, p in zip(average, params):
                e.mul_(beta).add_(p.detach(), alpha=1.0 - beta)
        if remaining <= cooldown:  # no meta step in the cooldown, as the library
            continue
        _, g_meta = meta_grad(average)
        hypergrad = sum(float(torch.dot(x.reshape(-1), d.reshape(-1))) for x, d in zip(g_meta, delta))
        gamma = scale.update(hypergrad)
    seconds = time.perf_counter() - started
    net.eval()
    with torch.no_grad():
        val_loss, correct = [], 0
        for i in range(0, len(val_rows), 128):
            batch = collate(val_rows[i:i + 128])
            out = net(**batch)
            val_loss.append((float(out.loss), len(val_rows[i:i + 128])))
            if task_name != "lm":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    loss_mean = sum(x * n for x, n in val_loss) / sum(n for _, n in val_loss)
    return {"task": task_name, "arm": arm, "seed": seed, "start_lr": start_lr, "steps": steps,
            "val_loss": loss_mean, "val_accuracy": None if task_name == "lm" else correct / len(val_rows),
            "lrs": lrs, "train_losses": losses, "seconds": seconds}


def main(task_name: str, arms: str, seeds: str = "0", start_lr: str = "1e-3") -> None:
    out = HERE / "results" / "averaged_horizon_lab.jsonl"
    for arm in arms.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            r = run(task_name, arm, seed, float(start_lr))
            n = len(r["lrs"])
            marks = [r["lrs"][min(n - 1, int(f * n))] for f in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)]
            acc = "" if r["val_accuracy"] is None else f" val_acc={r['val_accuracy']:.4f}"
            print(f"{task_name} {arm:14s} s={seed} start={r['start_lr']:.0e} val_loss={r['val_loss']:.4f}{acc} "
                  f"lr at 5/20/40/60/80/95%: {' '.join(f'{x:.1e}' for x in marks)} ({r['seconds']:.0f}s)", flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
