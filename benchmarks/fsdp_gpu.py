"""MLRSTrainer meta-training under FSDP2 on GPUs: exactness against one process, resume, and cost against plain FSDP.

Not measured yet: on one H200 (session 27, torch 2.11) the launch failed inside accelerate's FSDP2 preparation, for a
plain Trainer too (RESULTS.md section 5); the mechanism is tested on CPU in tests/test_fsdp.py. Runs on
however many GPUs are present (one works: FSDP2 over a 1-rank mesh). The driver starts every part in its own process:

  check      one process, no FSDP: MLRSTrainer meta-training of a small BERT (float64, dropout 0, sequential data,
             a meta-update every 2nd step) on the global batch (N x per-device batch) -> reference.pt
             then `accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml` on N GPUs, the same run
             sharded (mixed precision off, so that rtol 1e-5 means something), a SHARDED_STATE_DICT checkpoint at
             step 10 -> fsdp.pt; then the same launch resumed from checkpoint-10 -> resumed.pt.
             Compared: lrs, hypergradients, the schedule net, the gathered model (rtol 1e-5); resumed against
             uninterrupted (rtol 1e-5: CUDA's embedding backward is not bitwise deterministic).
  time       plain FSDP (transformers.Trainer) vs FSDP + MLRSTrainer meta-training (a meta-update every step and
             every 10th), bf16 as in fsdp.yaml: median step time and torch.cuda.max_memory_allocated, one process
             group per arm (peak memory is a per-process high-water mark).

    python benchmarks/fsdp_gpu.py                       # everything -> benchmarks/results/fsdp_gpu.{json,md}
                                                        # (runs and checkpoints under outputs/fsdp_gpu/)
    python benchmarks/fsdp_gpu.py --parts check         # only the exactness check
    python benchmarks/fsdp_gpu.py --print-commands      # what it would launch (works without a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml"
SIZES = {  # BERT encoders with a small vocabulary, so that the transformer layers (the FSDP units) dominate
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=512),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=8192),
}
CHECK_STEPS, SAVE_AT, RTOL, ATOL = 20, 10, 1e-5, 1e-10


# ---- inside one process: data, model, trainer ----------------------------------------------------------------------

def make_dataset(n: int, seq: int, vocab: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    ids[:, 1] = torch.randint(1, 10, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n,
                              "label": (ids[:, 1] % 3).tolist()})


def make_model(size: str, seq: int, dtype):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=seq, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **SIZES[size])
    return BertForSequenceClassification(config).to(dtype)


def full_parameters(model) -> dict:
    """Whole parameters on the CPU; under FSDP2 every rank must call this (full_tensor() all-gathers)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).cpu().clone()
            for name, p in model.named_parameters()}


def run_check(args) -> None:
    """reference (one process, the global batch) or fsdp/resumed (this launch): train, save what is compared."""
    import torch

    from hf_mlrs import MLRSTrainer, MLRSTrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = args.batch * (args.num_processes if args.role == "reference" else 1)  # same global batch
    seq = 16
    out = Path(args.out)
    trainer = MLRSTrainer(
        model=make_model(args.size, seq, torch.float64),
        args=MLRSTrainingArguments(
            str(out / f"run_{args.role}"), per_device_train_batch_size=batch, max_steps=CHECK_STEPS,
            learning_rate=1e-3, logging_steps=1, report_to="none", seed=0, disable_tqdm=True,
            train_sampling_strategy="sequential", mlrs_meta_interval=2, mlrs_meta_lr=1e-2,
            mlrs_meta_batch_size=batch, save_strategy="steps" if args.role != "reference" else "no",
            save_steps=SAVE_AT, dataloader_drop_last=True),
        train_dataset=make_dataset(4096, seq, SIZES[args.size]["vocab_size"]),
    )
    resume = str(out / "run_fsdp" / f"checkpoint-{SAVE_AT}") if args.role == "resumed" else None
    trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    result = {
        "world_size": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "lrs": [e["learning_rate"] for e in history if "learning_rate" in e],
        "hypergrads": [e["mlrs/hypergrad"] for e in history if "mlrs/hypergrad" in e],
        "net": {k: v.detach().cpu().clone() for k, v in trainer.schedule.state_dict().items()},
        "model": full_parameters(trainer.model),
    }
    if trainer.accelerator.is_main_process:
        torch.save(result, out / f"{args.role}.pt")
    trainer.accelerator.wait_for_everyone()


class StepTimer:
    """Median step time after warm-up, and the peak allocated memory from the end of warm-up on."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                import torch

                torch.cuda.synchronize()
                if state.global_step == warmup:
                    torch.cuda.reset_peak_memory_stats()
                timer.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                torch.cuda.synchronize()
                if state.global_step > warmup:
                    timer.times.append(time.perf_counter() - timer.began)

        self.callback, self.times, self.began = Callback(), [], 0.0


def run_time(args) -> None:
    """One arm, under the FSDP launch: plain Trainer, or MLRSTrainer meta-training every `interval` steps."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_mlrs import MLRSTrainer, MLRSTrainingArguments

    seq = 128
    common = dict(per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                  logging_steps=10_000, report_to="none", seed=0, disable_tqdm=True, save_strategy="no")
    model, data = make_model(args.size, seq, torch.float32), make_dataset(8192, seq, SIZES[args.size]["vocab_size"])
    timer = StepTimer(args.warmup)
    if args.arm == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(str(Path(args.out) / "time_plain"), **common),
                          train_dataset=data, callbacks=[timer.callback])
    else:
        interval = int(args.arm.split("_")[1])
        trainer = MLRSTrainer(model=model, train_dataset=data, callbacks=[timer.callback], args=MLRSTrainingArguments(
            str(Path(args.out) / f"time_{args.arm}"), mlrs_meta_interval=interval, **common))
    trainer.train()
    result = {"arm": args.arm, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "distributed_type": str(trainer.accelerator.distributed_type),
              "step_ms": 1000 * statistics.median(timer.times),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "parameters": sum(p.numel() for p in trainer.model.parameters())}
    if trainer.accelerator.is_main_process:
        (Path(args.out) / f"time_{args.arm}.json").write_text(json.dumps(result))


# ---- the driver ----------------------------------------------------------------------------------------------------

def commands(args) -> list[tuple[str, list[str]]]:
    """(label, command) of every process group the driver starts, in order."""
    me = [str(Path(__file__).resolve()), "--out", args.out, "--batch", str(args.batch),
          "--num_processes", str(args.num_processes)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
              "--num_processes", str(args.num_processes)]
    runs = []
    if "check" in args.parts:
        check = ["--size", "tiny"]
        runs.append(("reference", [sys.executable, *me, *check, "--role", "reference"]))
        runs.append(("fsdp", [*launch, "--mixed_precision", "no", *me, *check, "--role", "fsdp"]))
        runs.append(("resumed", [*launch, "--mixed_precision", "no", *me, *check, "--role", "resumed"]))
    if "time" in args.parts:
        for arm in ("plain", "meta_1", "meta_10"):
            runs.append((f"time_{arm}", [*launch, *me, "--size", args.size, "--role", "time", "--arm", arm,
                                         "--steps", str(args.steps), "--warmup", str(args.warmup)]))
    return runs


def compare_check(out: Path) -> dict:
    import torch

    loaded = {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ("reference", "fsdp", "resumed")}
    want, got, resumed = loaded["reference"], loaded["fsdp"], loaded["resumed"]

    def close(a, b, rtol=RTOL, atol=ATOL):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))

    verdict = {"world_size": got["world_size"], "distributed_type": got["distributed_type"],
               "meta_updates": len(got["hypergrads"]), "lr_range": [min(want["lrs"]), max(want["lrs"])]}
    for key in ("lrs", "hypergrads"):
        verdict[f"{key}_close"] = close(got[key], want[key])
    verdict["net_close"] = all(close(got["net"][k], v) for k, v in want["net"].items())
    verdict["model_close"] = all(close(got["model"][k], v) for k, v in want["model"].items())
    # rtol, not bit equality: CUDA's embedding backward accumulates with atomics, in no fixed order
    verdict["resume_close"] = (close(resumed["lrs"], got["lrs"][-len(resumed["lrs"]):])
                               and all(close(resumed["net"][k], v) for k, v in got["net"].items())
                               and all(close(resumed["model"][k], v) for k, v in got["model"].items()))
    verdict["ran_sharded"] = got["distributed_type"].endswith("FSDP") and resumed["distributed_type"].endswith("FSDP")
    return verdict


def write_report(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_gpu.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# FSDP2 on {summary['gpus']} x {summary['gpu_name']}", ""]
    if "check" in summary:
        lines += ["## Exactness (rtol 1e-5, float64)", "", "| what | result |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["check"].items()] + [""]
    if "time" in summary:
        plain = summary["time"].get("plain", {})
        lines += ["## Cost per step (bf16, median after warm-up)", "",
                  "| arm | parameters | step ms | x plain | peak GiB | x plain |", "|---|---|---|---|---|---|"]
        for arm, row in summary["time"].items():
            ratio_t = row["step_ms"] / plain["step_ms"] if plain else float("nan")
            ratio_m = row["peak_gib"] / plain["peak_gib"] if plain else float("nan")
            lines.append(f"| {arm} | {row['parameters'] / 1e6:.1f}M | {row['step_ms']:.1f} | {ratio_t:.2f} | "
                         f"{row['peak_gib']:.2f} | {ratio_m:.2f} |")
    (out / "fsdp_gpu.md").write_text("\n".join(lines) + "\n")


def drive(args) -> dict:
    import torch

    if args.print_commands:
        for label, command in commands(args):
            print(f"{label}: {' '.join(command)}")
        return {"commands": commands(args)}
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fsdp_gpu.py needs at least one CUDA GPU (accelerate does not do FSDP on CPU; "
                         "the CPU test of the same mechanism is tests/test_fsdp.py).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    summary = {"gpus": args.num_processes, "gpu_name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for label, command in commands(args):
        began = time.time()
        result = subprocess.run(command, env=env, cwd=ROOT)
        print(f"[fsdp_gpu] {label}: exit {result.returncode} in {time.time() - began:.0f} s", flush=True)
        if result.returncode != 0:
            raise SystemExit(f"[fsdp_gpu] {label} failed: {' '.join(command)}")
    if "check" in args.parts:
        summary["check"] = compare_check(out)
    if "time" in args.parts:
        summary["time"] = {arm: json.loads((out / f"time_{arm}.json").read_text())
                           for arm in ("plain", "meta_1", "meta_10")}
    write_report(Path(args.report_dir), summary)
    print(json.dumps(summary, indent=1))
    return summary


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["check", "time"], choices=["check", "time"])
    parser.add_argument("--num_processes", type=int, default=None, help="GPUs to use (default: all present)")
    parser.add_argument("--size", default="base", choices=sorted(SIZES), help="model of the timing arms")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per arm")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "fsdp_gpu"), help="runs and checkpoints (large)")
    parser.add_argument("--report_dir", default=str(HERE / "results"), help="where fsdp_gpu.{json,md} go")
    parser.add_argument("--print-commands", action="store_true", help="print the launches and stop")
    parser.add_argument("--role", default="driver", choices=["driver", "reference", "fsdp", "resumed", "time"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--arm", default="plain", choices=["plain", "meta_1", "meta_10"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_processes is None:
        import torch

        args.num_processes = max(1, torch.cuda.device_count())
    return args


def main(argv=None):
    args = parse(argv)
    if args.role == "driver":
        return drive(args)
    if args.role == "time":
        return run_time(args)
    result = run_check(args)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
