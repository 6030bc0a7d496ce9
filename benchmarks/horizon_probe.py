"""Which horizon's hypergradient points at the best lr? A diagnostic for the learned scale (RESULTS.md 3b).

Trains a task of quality.py at a *constant* lr (AdamW, plain PyTorch loop, 10% of the training split held out as
the meta set, as MLRSTrainer does) and every `--every` steps measures, on one held-out batch (same dropout masks),
for windows of k = 1, 4, 16, 64 steps with Delta = w_t - w_{t-k}:

    s1 = <g_meta(w_t), Delta>        the first-order window hypergradient hf_mlrs uses (dL/dlog c at c = 1)
    s0 = <g_meta(w_{t-k}), Delta>    the same at the window's start

Along the line phi(c) = L_meta(w_{t-k} + c Delta), phi'(0) = s0 and phi'(1) = s1, so a parabola puts the best
multiple of the window's displacement at c* = s0 / (s0 - s1): c* > 1 says "a larger lr", c* < 1 "a smaller one".
A criterion is calibrated when c* crosses 1 near the lr that ends a whole run best. One line per (lr, k):
median c* and the fraction of probes with s1 > 0 over the middle 60% of the run, then the final validation loss.

    python benchmarks/horizon_probe.py lm 1e-3,3e-3,1e-2,3e-2
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (also puts recipes/ on sys.path)


WINDOWS = (1, 4, 16, 64)


def plain_setup(task_name: str, seed: int, model: str | None = None) -> types.SimpleNamespace:
    """quality.py's task, splits and model for a plain PyTorch loop, with 10% of the training split held out as the
    meta set (as MLRSTrainer does): spec, collate, train_rows / meta_rows / val_rows (lists, for the collator), the
    model in train mode and its trainable parameters. Also used by averaged_horizon_lab.py."""
    from transformers import default_data_collator, set_seed

    from hf_mlrs.data import split_meta_set

    from tasks import load_task

    spec = quality.TASKS[task_name]
    set_seed(seed)
    task = load_task(task_name, model or spec["model"], max_train=spec["max_train"], max_test=spec["max_test"], seed=0,
                     max_length=spec["max_length"] or 128)
    train, val = quality.split_validation(task)
    train, meta = split_meta_set(train, 0.1, seed)
    rows = lambda data: [data[i] for i in range(len(data))]  # noqa: E731  (lists for the collator)
    net = task.model
    net.train()
    return types.SimpleNamespace(spec=spec, collate=task.data_collator or default_data_collator,
                                 train_rows=rows(train), meta_rows=rows(meta), val_rows=rows(val), net=net,
                                 params=[p for p in net.parameters() if p.requires_grad])


def loss_and_grad_at(net, params, weights, batch, dropout_seed: int | None = None):
    """Loss and gradient of `net` on `batch` at `weights` (then the parameters and buffers are put back); with
    `dropout_seed`, the same dropout masks every call."""
    import torch

    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    loss = net(**batch).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
        for b, s in buffers:
            b.copy_(s)
    return float(loss.detach()), [torch.zeros_like(p) if x is None else x for p, x in zip(params, grads)]


def run(task_name: str, lr: float, seed: int = 0, every: int = 16, model: str | None = None,
        max_steps: int | None = None) -> dict:
    """One constant-lr run with probes every `every` steps; `model`/`max_steps` override the task's (smoke test)."""
    import torch
    from torch.utils.data import DataLoader

    setup = plain_setup(task_name, seed, model)
    spec, collate, model, params = setup.spec, setup.collate, setup.net, setup.params
    train_rows, meta_rows, val_rows = setup.train_rows, setup.meta_rows, setup.val_rows
    g = torch.Generator().manual_seed(seed)
    steps = max_steps or math.ceil(len(train_rows) / spec["batch"]) * spec["epochs"]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def batches():
        while True:
            yield from DataLoader(train_rows, batch_size=spec["batch"], shuffle=True, collate_fn=collate,
                                  generator=g, drop_last=False)

    def meta_grad(batch, weights):
        """Held-out loss and gradient at `weights` (same dropout masks every call); buffers untouched."""
        return loss_and_grad_at(model, params, weights, batch, dropout_seed=12345)

    def dot(xs, ys):
        return sum(float(torch.dot(x.reshape(-1), y.reshape(-1))) for x, y in zip(xs, ys))

    snapshots = {}  # step -> weights, only those a later probe needs
    needed = {(j * every - k) for j in range(1, steps // every + 1) for k in WINDOWS}
    probes = []
    source = batches()
    mg = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        if step - 1 in needed:
            snapshots[step - 1] = [p.detach().clone() for p in params]
        batch = next(source)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0:
            index = torch.randint(len(meta_rows), (min(len(meta_rows), 128),), generator=mg).tolist()
            meta_batch = collate([meta_rows[i] for i in index])
            now = [p.detach().clone() for p in params]
            loss_now, g_now = meta_grad(meta_batch, now)
            record = {"step": step, "train_loss": float(loss), "meta_loss": loss_now}
            for k in WINDOWS:
                if step - k not in snapshots:
                    continue
                start = snapshots[step - k]
                delta = [a - b for a, b in zip(now, start)]
                loss_start, g_start = meta_grad(meta_batch, start)
                record[str(k)] = {"s0": dot(g_start, delta), "s1": dot(g_now, delta), "loss_start": loss_start}
            probes.append(record)
            for old in [s for s in snapshots if s <= step - max(WINDOWS)]:
                del snapshots[old]
    model.eval()
    with torch.no_grad():
        val_loss = statistics.fmean(float(model(**collate(val_rows[i:i + 128])).loss)
                                    for i in range(0, len(val_rows), 128))
    return {"task": task_name, "lr": lr, "seed": seed, "steps": steps, "val_loss": val_loss, "probes": probes}


def summarise(result: dict) -> list[str]:
    lines = []
    steps = result["steps"]
    middle = [p for p in result["probes"] if 0.2 * steps <= p["step"] <= 0.8 * steps]
    for k in WINDOWS:
        rows = [p[str(k)] for p in middle if str(k) in p]
        if not rows:
            continue
        stars = []
        for r in rows:
            s0, s1 = r["s0"], r["s1"]
            if s0 >= 0:  # the window's displacement did not even start downhill: "smaller"
                stars.append(1 / 16)
            elif s1 <= s0:  # no positive curvature along the line: "larger"
                stars.append(16.0)
            else:
                stars.append(min(max(s0 / (s0 - s1), 1 / 16), 16.0))
        positive = sum(r["s1"] > 0 for r in rows) / len(rows)
        lines.append(f"{result['task']} lr={result['lr']:<7.1e} k={k:<3d} median c*={statistics.median(stars):6.2f} "
                     f"geo-mean c*={math.exp(statistics.fmean(math.log(s) for s in stars)):6.2f} "
                     f"P(s1>0)={positive:.2f}  ({len(rows)} probes)")
    lines.append(f"{result['task']} lr={result['lr']:<7.1e} final validation loss {result['val_loss']:.4f}")
    return lines


def main(task_name: str, lrs: str, seed: str = "0") -> None:
    out = HERE / "results" / "horizon_probe.jsonl"
    for lr in (float(x) for x in lrs.split(",")):
        result = run(task_name, lr, int(seed))
        print("\n".join(summarise(result)), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
