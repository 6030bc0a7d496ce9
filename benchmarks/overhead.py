"""Per-step cost of hf_mlrs against a plain Trainer: wall time and peak memory, as ratios measured in one run.

Arms (same model, data, batch size, AdamW; the meta batch is as large as the training batch):
  plain      transformers.Trainer with its default linear schedule
  transfer   the same Trainer + MLRSCallback (a frozen schedule)
  meta_1     MLRSTrainer meta-training, a meta-update every step
  meta_10    MLRSTrainer meta-training, a meta-update every 10 steps
  paper_1    the paper-style meta-update (copy the model, virtual step, autograd through it) every step
  paper_10   the same every 10 steps
  learned    MLRSTrainer meta-training with the learned lr scale (the recommended settings: a meta step every
             step until the scale settles, every 4th after, none in the final cooldown); its cost is reported over
             the whole run, warm-up steps included, since its meta steps are denser at the start
  frozen_learned  MLRSTrainer applying the shipped multitask-default frozen with the learned lr scale from held-out
             meta batches (a meta_dataset given; the default before session 27): the no-lr path, only the scale is
             learned; meta steps every step while it grows, then none if it holds or every 4th if it tracks, none in
             the cooldown; reported over the whole run, as `learned`
  frozen_learned_half  the same with mlrs_scale_track_batch_share=0.5 (half of each meta batch while it tracks)
  frozen_learned_next  the same with mlrs_meta_source="next_batch" (the default without a meta_dataset since session
             27): the hypergradient from the next step's training gradient, no meta batch (all the data trains)
  callback_next  MLRSCallback(multitask-default, gamma="learned") without meta_dataset: the same next-batch path
  callback_learned  the same no-lr path in a plain Trainer: MLRSCallback(multitask-default, gamma="learned",
             meta_dataset=...), timed as `transfer` (its hooks) and reported over the whole run, as `learned`
Each arm runs in a fresh process, because peak memory (RSS on CPU) is a per-process high-water mark; arms are
interleaved over repeats and the fastest repeat of each is kept. Whole-step times on a shared host are noisy, so the
time spent inside hf_mlrs's own per-step code (the callback's hooks, the trainer's before/after-step halves: the lr
computation and the whole meta-update) is also measured in-process; (plain + that) / plain is the robust overhead.

    python benchmarks/overhead.py                 # full CPU run -> benchmarks/results/overhead_cpu.{json,md}
    python benchmarks/overhead.py --smoke         # seconds, in one process; run by the test suite
    python benchmarks/overhead.py --device cuda   # GPU variant -> benchmarks/results/overhead_cuda.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ARMS = ["plain", "transfer", "meta_1", "meta_10", "paper_1", "paper_10", "learned", "frozen_learned",
        "frozen_learned_half", "frozen_learned_next", "callback_learned", "callback_next"]
SIZES = {  # BERT encoders; vocabulary kept small so the transformer body dominates the parameter count
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=8192),
    "base": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                 vocab_size=8192),
}


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker when its parent dies: a worker left running after its parent was killed keeps timing on the
    shared CPU and spoils every measurement taken next to it (it did once: RESULTS.md 3b, the cost row)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:  # a dead parent's children are re-parented
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker(arm: str, size: str, steps: int, warmup: int, batch: int, seq: int, device: str) -> dict:
    """Train one arm for warmup + steps optimizer steps and report its step times and peak memory."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from hf_mlrs import MLRSCallback, MLRSNet, MLRSTrainer, MLRSTrainingArguments
    from hf_mlrs.reference import paper_style_trainer_class

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=seq, num_labels=2, **SIZES[size])
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup + 1)
    ids = torch.randint(0, config.vocab_size, (n + 4 * batch, seq), generator=g)
    rows = {"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * len(ids), "label": (ids[:, 0] % 2).tolist()}
    data = Dataset.from_dict(rows)
    train, meta = data.select(range(n)), data.select(range(n, n + 4 * batch))

    hook_seconds = [0.0]  # wall time spent inside hf_mlrs's own per-step code

    def timed(obj, name):
        """Accumulate the time of obj.name: hf_mlrs's added cost, measured apart from the host's noise."""
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if device == "cuda":
                    torch.cuda.synchronize()
                hook_seconds[0] += time.perf_counter() - started

        setattr(obj, name, wrapper)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.hooks = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.hooks.append(hook_seconds[0])

    clock = StepClock()
    common = dict(output_dir="/tmp/hf_mlrs_overhead", max_steps=steps + warmup, per_device_train_batch_size=batch,
                  learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10_000,
                  disable_tqdm=True, use_cpu=device == "cpu", dataloader_pin_memory=False)
    if arm in ("plain", "transfer", "callback_learned", "callback_next"):
        callbacks = [clock] + ([MLRSCallback(MLRSNet())] if arm == "transfer" else [])
        if arm == "callback_learned":
            callbacks.append(MLRSCallback(MLRSNet.from_pretrained("multitask-default"), gamma="learned",
                                          meta_dataset=meta, meta_batch_size=batch))
        if arm == "callback_next":  # no meta_dataset: the next step's gradient
            callbacks.append(MLRSCallback(MLRSNet.from_pretrained("multitask-default"), gamma="learned"))
        for callback in callbacks[1:]:
            for hook in ("on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
                timed(callback, hook)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, callbacks=callbacks)
    else:
        cls = paper_style_trainer_class() if arm.startswith("paper") else MLRSTrainer
        if arm in ("learned", "frozen_learned", "frozen_learned_half", "frozen_learned_next"):
            settings = dict(mlrs_gamma="learned")  # the library defaults for a learned scale
            if arm == "frozen_learned_half":
                settings["mlrs_scale_track_batch_share"] = 0.5
            if arm == "frozen_learned_next":
                settings["mlrs_meta_source"] = "next_batch"
        else:
            settings = dict(mlrs_meta_interval=int(arm.split("_")[1]))
        if arm != "frozen_learned_next":  # the next batch has no meta batch (a size would be refused)
            settings["mlrs_meta_batch_size"] = batch
        args = MLRSTrainingArguments(**common, **settings)
        schedule = MLRSNet.from_pretrained("multitask-default") if arm.startswith("frozen_learned") else None
        trainer = cls(model=model, args=args, train_dataset=train, callbacks=[clock], schedule=schedule,
                      meta_dataset=None if arm == "frozen_learned_next" else meta)
        timed(cls.meta_step_class, "before_step")
        timed(cls.meta_step_class, "after_step")
    trainer.train()
    times = [b - a for a, b in zip(clock.stamps[warmup:], clock.stamps[warmup + 1:])]
    # A step time robust to passing noise from the host: the median over windows of 10 steps (one meta cycle at
    # interval 10) of the window's mean.
    windows = [statistics.fmean(times[i:i + 10]) for i in range(0, len(times) - 9, 10)] or [statistics.fmean(times)]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    added = (clock.hooks[-1] - clock.hooks[warmup]) / len(times)
    whole_added = clock.hooks[-1] / len(clock.stamps)  # every step, warm-up included
    return {"arm": arm, "size": size, "step_s": statistics.median(windows), "mean_step_s": statistics.fmean(times),
            "added_s": added, "whole_added_s": whole_added,
            "peak_bytes": peak, "param_bytes": param_bytes, "num_params": sum(p.numel() for p in model.parameters())}


def run_arm(arm, size, options) -> dict:
    if options.smoke:  # in-process: checks the script end to end in seconds; its memory numbers mean nothing
        return worker(arm, size, options.steps, options.warmup, options.batch, options.seq, options.device)
    command = [sys.executable, __file__, "--worker", arm, "--sizes", size, "--steps", str(options.steps),
               "--warmup", str(options.warmup), "--batch", str(options.batch), "--seq", str(options.seq),
               "--device", options.device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"arm {arm}/{size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(results: list[dict], options) -> tuple[dict, str]:
    rows, lines = [], []
    for size in options.sizes.split(","):
        best = {arm: min((r for r in results if r["arm"] == arm and r["size"] == size),
                         key=lambda r: r["step_s"]) for arm in options.arms.split(",")}
        plain = best["plain"]
        added = {arm: statistics.median(r["added_s"] for r in results if r["arm"] == arm and r["size"] == size)
                 for arm in best}
        for arm, r in best.items():
            rows.append({**r, "added_s": added[arm], "time_vs_plain": r["step_s"] / plain["step_s"],
                         "added_vs_plain": (plain["step_s"] + added[arm]) / plain["step_s"],
                         "extra_memory_in_param_sizes": (r["peak_bytes"] - plain["peak_bytes"]) / r["param_bytes"]})
        for p in ("1", "10"):
            if f"meta_{p}" in best and f"paper_{p}" in best:
                meta, paper, base = added[f"meta_{p}"], added[f"paper_{p}"], plain["step_s"]
                rows.append({"size": size, "arm": f"meta_{p} vs paper_{p}: whole step", "value": (base + paper) /
                             (base + meta)})
                rows.append({"size": size, "arm": f"meta_{p} vs paper_{p}: meta-update cost", "value": paper / meta})
    memory = "peak GPU memory allocated" if options.device == "cuda" else "peak process RSS"
    lines.append(f"| size | params | arm | step (ms) | time / plain | hf_mlrs code (ms/step) | (plain + hf_mlrs) / "
                 f"plain | {memory} (MB) | extra memory / parameter size |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "value" in r:
            lines.append(f"| {r['size']} | | **{r['arm']}** | | | | **{r['value']:.2f}x** | | |")
        else:
            lines.append(f"| {r['size']} | {r['num_params'] / 1e6:.1f}M | {r['arm']} | {1e3 * r['step_s']:.1f} | "
                         f"{r['time_vs_plain']:.3f} | {1e3 * r['added_s']:.2f} | {r['added_vs_plain']:.3f} | "
                         f"{r['peak_bytes'] / 2**20:.0f} | {r['extra_memory_in_param_sizes']:+.2f} |")
    return {"rows": rows}, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=60, help="measured steps (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, no files written")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results"))
    options = parser.parse_args(argv)
    if options.worker:
        exit_with_parent()
        print(json.dumps(worker(options.worker, options.sizes, options.steps, options.warmup, options.batch,
                                options.seq, options.device)))
        return None
    if options.smoke:
        options.sizes, options.steps, options.warmup, options.repeats, options.batch, options.seq = (
            "tiny", 10, 1, 1, 4, 16)
    results = []
    for _ in range(options.repeats):
        for size in options.sizes.split(","):
            for arm in options.arms.split(","):
                results.append(run_arm(arm, size, options))
                print(f"{size:6s} {arm:9s} {1e3 * results[-1]['step_s']:8.1f} ms", flush=True)
    summary, table = summarize(results, options)
    print(table)
    if not options.smoke:
        import torch

        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}" + (f", {torch.cuda.get_device_name()}" if options.device == "cuda" else ""))
        command = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(options.out).mkdir(parents=True, exist_ok=True)
        stem = Path(options.out) / f"overhead_{options.device}"
        stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, **summary,
                                                         "raw": results}, indent=2))
        stem.with_suffix(".md").write_text(f"# Overhead ({options.device})\n\nMachine: {machine}\n\nCommand: "
                                           f"`{command.strip()}`\n\n{table}\n")
    return summary


if __name__ == "__main__":
    main()
