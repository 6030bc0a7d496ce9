# /// script
# dependencies = ["hf_mlrs[recipes]"]
# ///
"""Apply a learned schedule to another model size or task, against the Hugging Face default schedule.

Both arms train the same model from the same seed with a plain `transformers.Trainer` and the same peak lr: the
default arm uses `lr_scheduler_type` (linear decay), the MLR-SNet arm adds `MLRSCallback(schedule)` with
gamma = learning_rate. Prints a table and saves `comparison.png` (lr and training loss) and `comparison.json`.

    # text-bbc (meta-trained with 2-layer MiniLM on BBC News), applied to the full 6-layer model
    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/transfer.py \
        --schedule text-bbc --task bbc --model minilm-L6 --num_train_epochs 1
    # image-fashion (meta-trained with a small ResNet on Fashion-MNIST), applied to a 10x larger ResNet on digits:
    # a held-out task as well as a larger model
    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/transfer.py \
        --schedule image-fashion --task digits --model resnet-large --num_train_epochs 20 --learning_rate 3e-3

--schedule takes a local folder, a shipped name (`python -c "import hf_mlrs.pretrained as p; print(p.available())"`)
or a Hub repo id.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ScriptArguments:
    schedule: str = field(default="text-bbc", metadata={"help": "Folder, shipped name or Hub id of a schedule."})
    task: str = field(default="bbc", metadata={"help": "bbc, digits or fashion."})
    model: str = field(default="minilm-L6", metadata={"help": "Target model (see recipes/tasks.py), or tiny."})
    baseline: str = field(default="linear", metadata={"help": "lr_scheduler_type of the comparison arm."})
    stage_by: str = field(default="progress", metadata={"help": "progress, or loss (horizon-free)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the training set."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Subsample the test set."})
    max_length: int = field(default=128, metadata={"help": "Tokens per article (bbc)."})


RECIPE_DEFAULTS = dict(
    output_dir="outputs/transfer", num_train_epochs=1, learning_rate=5e-5, per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    use_cpu=not torch.cuda.is_available(),  # several CPU processes must join one DDP group, not run independently
    logging_steps=5, save_strategy="no", report_to="none", seed=0,
)


def run_arm(arm: str, script_args: ScriptArguments, training_args: TrainingArguments, schedule) -> dict:
    from transformers import Trainer, set_seed

    from hf_mlrs import MLRSCallback

    from tasks import accuracy_metric, load_task  # recipes/tasks.py: data and models of the recipes

    set_seed(training_args.seed)  # the same model initialisation and data order in both arms
    task = load_task(script_args.task, script_args.model, seed=training_args.seed, max_length=script_args.max_length,
                     max_train=script_args.max_train_examples, max_test=script_args.max_eval_examples)
    args = dataclasses.replace(training_args, output_dir=str(Path(training_args.output_dir) / arm),
                               lr_scheduler_type=script_args.baseline)
    callbacks = [MLRSCallback(schedule, stage_by=script_args.stage_by)] if arm == "mlrs" else []  # MLRS
    trainer = Trainer(model=task.model, args=args, train_dataset=task.train, eval_dataset=task.test,
                      data_collator=task.data_collator, processing_class=task.processing_class,
                      compute_metrics=accuracy_metric(), callbacks=callbacks)
    print(f"[{arm}] training {script_args.model} on {script_args.task} ...", flush=True)
    trainer.train()
    metrics = trainer.evaluate()
    logs = [e for e in trainer.state.log_history if "learning_rate" in e]
    return {"eval": metrics, "steps": [e["step"] for e in logs], "lr": [e["learning_rate"] for e in logs],
            "loss": [e["loss"] for e in logs], "world_size": trainer.accelerator.num_processes,
            "is_main": trainer.is_world_process_zero()}


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), dpi=100)
    canvas = FigureCanvasAgg(figure)
    lr_axes, loss_axes = figure.subplots(1, 2)
    for arm, r in results.items():
        lr_axes.plot(r["steps"], r["lr"], label=arm)
        loss_axes.plot(r["steps"], r["loss"], label=arm)
    lr_axes.set(xlabel="step", ylabel="learning rate (logged = applied)", title="Learning rate")
    loss_axes.set(xlabel="step", ylabel="training loss", title="Training loss")
    loss_axes.legend()
    figure.tight_layout()
    canvas.print_png(str(path))


def main(script_args: ScriptArguments, training_args: TrainingArguments) -> dict:
    from hf_mlrs import MLRSNet

    schedule = MLRSNet.from_pretrained(script_args.schedule)  # MLRS: local folder, shipped name or Hub id
    results = {arm: run_arm(arm, script_args, training_args, schedule) for arm in ("mlrs", script_args.baseline)}
    if results["mlrs"]["is_main"]:
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        print(f"\n{'arm':12s} {'eval_loss':>10s} {'eval_accuracy':>14s}   (peak lr {training_args.learning_rate:g})")
        for arm, r in results.items():
            print(f"{arm:12s} {r['eval']['eval_loss']:10.4f} {r['eval'].get('eval_accuracy', float('nan')):14.4f}")
        plot(results, out / "comparison.png")
        summary = {"schedule": script_args.schedule, "task": script_args.task, "model": script_args.model,
                   "args": {k: getattr(training_args, k) for k in ("learning_rate", "num_train_epochs", "max_steps",
                                                                    "per_device_train_batch_size", "seed")},
                   **{arm: r for arm, r in results.items()}}
        (out / "comparison.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"Saved {out / 'comparison.png'} and {out / 'comparison.json'}")
    return results


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_into_dataclasses())
