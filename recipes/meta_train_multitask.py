# /// script
# dependencies = ["hf_mlrs[recipes]"]
# ///
"""Meta-train one MLR-SNet over several tasks and model sizes (episodes in round-robin), then save the schedule.

Each episode is a whole training run of one (task, model) pair from `recipes/tasks.py`: a fresh model, its own meta
set and recurrent state; one net is meta-trained on across all of them (`hf_mlrs.MLRSMultiTaskTrainer`). A pair is
`task:model`, or `task:model:steps` to fix its episode length (otherwise `--episode_epochs` of its training data).

    # two tasks, three rounds, a fixed lr scale per episode of twice the usual peak lr
    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/meta_train_multitask.py \
        --pairs bbc:minilm-L2:300,digits:resnet-small:400 --rounds 3 --mlrs_gamma 2e-3 \
        --output_dir outputs/multitask

Killed? Run the same command again: finished episodes are kept, the running one resumes from its last complete
checkpoint (every `--save_steps`). The shipped schedule zoo (`recipes/zoo.py`) is made with this recipe.

Writes to --output_dir: `episode-NNNN/` (each episode's carry and record), `episodes.json` (all records) and
`schedule/` (weights, config, model card with provenance and per-episode records, lr plot), or --schedule_dir.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_mlrs import MLRSTrainingArguments


# Per-task batch size (as benchmarks/quality.py) and whether accuracy is reported (the LM reports its loss).
BATCH = {"bbc": 16, "digits": 32, "fashion": 64, "lm": 16}


@dataclass
class ScriptArguments:
    pairs: str = field(default="bbc:minilm-L2,digits:resnet-small",
                       metadata={"help": "Comma-separated task:model[:steps] pairs (see recipes/tasks.py)."})
    rounds: int = field(default=1, metadata={"help": "Passes over the pairs."})
    episode_epochs: float = field(default=1.0, metadata={"help": "Episode length of a pair without :steps."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample each training set."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Subsample each test set."})
    max_length: int = field(default=128, metadata={"help": "Tokens per article (bbc)."})
    schedule_dir: str | None = field(default=None, metadata={"help": "Where to write the schedule (default: "
                                                                     "<output_dir>/schedule)."})


RECIPE_DEFAULTS = dict(
    output_dir="outputs/meta_train_multitask", per_device_eval_batch_size=128,
    use_cpu=not torch.cuda.is_available(), logging_steps=10, report_to="none", seed=0, disable_tqdm=True,
    save_strategy="steps", save_steps=200, save_total_limit=1,  # MLRS: a restart loses at most 200 steps
    dataloader_drop_last=True,  # MLRS: a ResNet's BatchNorm fails on an epoch's last batch if it holds one example
    mlrs_meta_interval=2, mlrs_meta_lr=1e-2, mlrs_num_stages=3,
)


def parse_pairs(text: str) -> list[tuple[str, str, int | None, str | None]]:
    """'bbc:minilm-L2:300:2e-3,lm:gpt2-small' -> [('bbc', 'minilm-L2', 300, '2e-3'), ('lm', 'gpt2-small', None,
    None)]: task, model, episode steps, lr scale gamma of its episodes (default: --mlrs_gamma / --learning_rate);
    checked against the tasks and models of recipes/tasks.py before anything trains."""
    from tasks import MODELS

    pairs = []
    for item in [p.strip() for p in text.split(",") if p.strip()]:
        parts = item.split(":")
        if len(parts) not in (2, 3, 4):
            raise ValueError(f"--pairs: {item!r} is not task:model[:steps[:gamma]].")
        task, model = parts[:2]
        if task not in MODELS:
            raise ValueError(f"--pairs: unknown task {task!r} in {item!r}; tasks: {sorted(MODELS)}.")
        if model not in MODELS[task]:
            raise ValueError(f"--pairs: task {task!r} has no model {model!r}; choose one of {MODELS[task]}.")
        if len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) > 0):
            raise ValueError(f"--pairs: the steps of {item!r} must be a positive integer.")
        gamma = parts[3] if len(parts) == 4 else None
        if gamma is not None and gamma != "learned":
            try:
                assert float(gamma) > 0
            except (ValueError, AssertionError):
                raise ValueError(f"--pairs: the gamma of {item!r} must be a positive number or 'learned'.") from None
        pairs.append((task, model, int(parts[2]) if len(parts) >= 3 else None, gamma))
    if not pairs:
        raise ValueError("--pairs is empty: give at least one task:model, e.g. bbc:minilm-L2.")
    return pairs


def episode_builder(script_args: ScriptArguments, pairs):
    """make_episode for MLRSMultiTaskTrainer: the task's data (split fixed by seed 0) and a fresh model."""
    from tasks import accuracy_metric, load_task

    settings = {(task, model): (n, gamma) for task, model, n, gamma in pairs}

    def make_episode(episode):
        task = load_task(episode.task, episode.model, seed=0, max_length=script_args.max_length,
                         max_train=script_args.max_train_examples, max_test=script_args.max_eval_examples)
        batch = BATCH[episode.task]
        steps, gamma = settings[episode.task, episode.model]
        # The meta set (10%) comes out of the training data: an epoch is 90% of it.
        length = steps or math.ceil(0.9 * len(task.train) / batch * script_args.episode_epochs)
        args = {"max_steps": length, "per_device_train_batch_size": batch}
        if gamma is not None:  # tasks differ in their useful lr by 10x: one gamma for all would pin some at a bound
            args["mlrs_gamma"] = gamma
        return {"model": task.model, "train_dataset": task.train, "eval_dataset": task.test,
                "data_collator": task.data_collator, "processing_class": task.processing_class,
                "compute_metrics": None if episode.task == "lm" else accuracy_metric(), "args": args}

    return make_episode


def main(script_args: ScriptArguments, training_args: MLRSTrainingArguments, command: str | None = None,
         extra_provenance: dict | None = None):
    """Meta-train, save the schedule; `command` and `extra_provenance` (e.g. a zoo entry's name) go into its card."""
    from meta_train import shareable  # recipes/meta_train.py: command lines without this machine's paths
    from transformers import set_seed

    from hf_mlrs import MLRSMultiTaskTrainer, MLRSNet, __version__, pretrained
    from hf_mlrs.trainer import run_environment

    pairs = parse_pairs(script_args.pairs)
    # The net's initial weights come from the global RNG: seed it, or the same command meta-trains another net (each
    # episode seeds its own model and data; only this net was left to chance until session 12).
    set_seed(training_args.seed)
    net = MLRSNet(hidden_size=training_args.mlrs_hidden_size, output_bias_init=training_args.mlrs_output_bias_init,
                  input_normalization=training_args.mlrs_input_normalization,
                  stage_starts=[k / training_args.mlrs_num_stages for k in range(training_args.mlrs_num_stages)])
    runner = MLRSMultiTaskTrainer(net, [(t, m) for t, m, _, _ in pairs], episode_builder(script_args, pairs),
                                  training_args, rounds=script_args.rounds)  # MLRS: one net, many runs
    print(f"Meta-training over {len(runner.plan)} episodes ({len(pairs)} pairs x {script_args.rounds} rounds); "
          f"{sum(Path(training_args.output_dir, e.folder, 'done.json').exists() for e in runner.plan)} already done",
          flush=True)
    schedule = runner.train()
    last_round = [r for r in runner.records if r["round"] == script_args.rounds - 1]
    schedule.provenance.update({
        "task": ", ".join(f"{t}/{m}" for t, m, _, _ in pairs),
        "gamma_rule": "per pair" if any(g for *_, g in pairs) else training_args.mlrs_gamma or "learning_rate",
        "gamma": {f"{t}/{m}": g or training_args.mlrs_gamma_value for t, m, _, g in pairs},
        "optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
        "meta_interval": training_args.mlrs_meta_interval, "meta_lr": training_args.mlrs_meta_lr,
        "input_normalization": schedule.input_normalization,
        "learned_shapes": {f"{r['task']}/{r['model']}": r["shape"] for r in last_round},
        "command": command or ("python recipes/meta_train_multitask.py " + " ".join(map(shareable, sys.argv[1:]))),
        "hf_mlrs_version": __version__,
        "environment": run_environment(),  # a rebuild matches bit for bit only in the same environment
        **(extra_provenance or {}),
    })
    out = Path(training_args.output_dir)
    (out / "episodes.json").write_text(json.dumps(runner.records, indent=1))
    target = Path(script_args.schedule_dir) if script_args.schedule_dir else out / "schedule"
    schedule.save_pretrained(target, repo_id=pretrained.name_of(target))  # MLRS: weights, config, card, lr plot
    print(f"\nSchedule: {target}  ({schedule.provenance['steps']} steps over {len(runner.records)} episodes)")
    for r in runner.records:
        print(f"  episode {r['index']:3d} {r['task']}/{r['model']:14s} loss scale {r['loss_scale']:.3g}  input "
              f"{r['input_range']}  A_t {r['output_range']}  eval {r['eval']}")
    return schedule, runner.records


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, MLRSTrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_into_dataclasses())
