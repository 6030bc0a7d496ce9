"""Schedule quality: MLR-SNet against the schedules users would pick instead, on three offline tasks.

Tasks (see recipes/tasks.py); each has train / validation (15% of train, stratified; lrs are chosen on it) / test:
  bbc      fine-tuning 2-layer MiniLM on BBC News (text), first 32 tokens (title and lead), one epoch
  digits   a small ResNet from scratch on scikit-learn digits (images)
  fashion  a small ResNet from scratch on 5,000 Fashion-MNIST images (images; Debian dataset-fashion-mnist)
Arms (AdamW unless said; every arm x every seed):
  default:<s>          Hugging Face schedule <s> at TrainingArguments' default lr 5e-5
  tuned:<s>            the same, peak lr chosen on validation from a 5-value grid (seed 0), then run on every seed
  schedule_free        optim="schedule_free_adamw" at its package default lr 2.5e-3, constant schedule (untuned)
  prodigy              Prodigy(lr=1.0), constant schedule (untuned)
  mlrs_meta            MLRSTrainer meta-training its schedule on the task itself, gamma = 5e-5
  mlrs_transfer        Trainer + MLRSCallback with a zoo schedule learned on another task and modality (bbc:
                       image-fashion; digits, fashion: text-bbc), gamma = 5e-5
  mlrs_transfer_tuned  the same with gamma = the tuned linear schedule's peak lr
  mlrs_learned:<v>     MLRSTrainer(mlrs_gamma="learned"), the net meta-trained too, from each of 5 starting lrs
  mlrs_frozen:default  MLRSTrainer(schedule=..., mlrs_gamma="learned"): the multi-task default frozen, only its lr
                       scale learned, from each of 5 starting lrs; on each task the default's leave-one-task-out
                       variant that never saw it (benchmarks/heldout_nets/multitask-without-<task>, committed;
                       else outputs/zoo/multitask-without-<task>-select3, made by
                       `python recipes/zoo.py --entry multitask-without-<task> --select 3`); the meta source is the
                       library's default (the next training batch since session 27; held-out batches before, in
                       records without `meta_source`)
  mlrs_callback:default  the same schedule and learned scale through a plain Trainer + MLRSCallback(gamma="learned",
                       meta_dataset=...): the held-out 10% MLRSTrainer would split off is passed as meta_dataset and
                       never trained on (a callback cannot return it to training, as MLRSTrainer does)
With --optimizer sgd every arm uses SGD with momentum 0.9 (lr grid 1e-2..1, learned-scale starts 1e-4..1).
Reported: final validation/test loss and accuracy (mean +- std over seeds), and steps to reach the target
validation accuracy, the best tuned arm's mean final validation accuracy (AlgoPerf-style), with a performance
profile across tasks.

    python benchmarks/quality.py                       # full CPU run -> benchmarks/results/quality_cpu.{json,md,png}
    python benchmarks/quality.py --smoke               # seconds; run by the test suite
    python benchmarks/quality.py --device cuda         # GPU variant (larger batches, same arms)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # recipes/tasks.py: tasks and metric


HERE = Path(__file__).resolve().parent
SCHEDULES = ["linear", "cosine", "cosine_with_min_lr", "warmup_stable_decay", "constant"]
DEFAULT_LR = 5e-5  # TrainingArguments.learning_rate
TASKS = {  # model, data sizes, training length, lr grid, and the shipped schedule transferred to it
    "bbc": dict(model="minilm-L2", max_train=None, max_test=None, max_length=32, epochs=1, batch=16,
                grid=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3], transfer_from="image-fashion"),
    "digits": dict(model="resnet-small", max_train=None, max_test=None, max_length=0, epochs=10, batch=32,
                   grid=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], transfer_from="text-bbc"),
    "fashion": dict(model="resnet-small", max_train=5000, max_test=2000, max_length=0, epochs=2, batch=64,
                    grid=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], transfer_from="text-bbc"),
    # causal LM, scored by validation loss (nats per byte), lower is better
    "lm": dict(model="gpt2-small", max_train=6400, max_test=1000, max_length=0, epochs=1, batch=16,
               grid=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2], transfer_from=None, metric="loss"),
}
LEARNED_LRS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]  # starting lrs of the learned-scale arms (AdamW): 4 decades
# --optimizer sgd (SGD with momentum 0.9): the same arms, grids and starting lrs where SGD's useful lrs live
SGD_GRID = [1e-2, 3e-2, 1e-1, 3e-1, 1.0]
SGD_LEARNED_LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def is_sgd(options) -> bool:
    return getattr(options, "optimizer", "adamw") == "sgd"


def grid_of(task_name: str, options) -> list[float]:
    grid = SGD_GRID if is_sgd(options) else TASKS[task_name]["grid"]
    return grid[:2] if options.smoke else grid


def starting_lrs(options) -> list[float]:
    """The learned-scale arms' starting lrs for this optimizer (also the columns of the spread table)."""
    return SGD_LEARNED_LRS if is_sgd(options) else LEARNED_LRS


def learned_lrs(options) -> list[float]:
    """The starting lrs this invocation runs (the first two in a smoke run)."""
    lrs = starting_lrs(options)
    return lrs[:2] if options.smoke else lrs


def by_loss(task_name: str) -> bool:
    return TASKS[task_name].get("metric") == "loss"


def score(run: dict) -> float:
    """Higher is better: validation accuracy, or minus the validation loss for the LM task."""
    return -run["val_loss"] if by_loss(run["task"]) else run["val_accuracy"]


def split_validation(task):
    from tasks import stratified_split

    labels = task.train.with_format(None)["labels"] if task.name != "lm" else [0] * len(task.train)
    train_idx, val_idx = stratified_split(labels, test_fraction=0.15, seed=0)
    return task.train.select(train_idx), task.train.select(val_idx)


# Learned-scale arms: "mlrs_learned:<variant>" started from `lr`; each variant is a set of MLRSTrainingArguments.
LEARNED_VARIANTS = {
    "default": {},  # the library's defaults for mlrs_gamma="learned": what a user gets
    # the library default of sessions 7-8: growth exponential throughout, no margin (before session 9)
    "exp": {},
    # session 6 (RESULTS 3b, rows 25-): growth also stops on 3 of the last 4 raw hypergradients positive ("v3"), and
    # then returns to the last gamma the raw signal called too small, with fresh Adam moments ("v3b9": at most 0.9)
    "v3": dict(mlrs_scale_stop_votes=3, mlrs_scale_backoff=0.0, mlrs_scale_growth_stop=0.0, mlrs_scale_hold=False),
    "v3b9": dict(mlrs_scale_stop_votes=3, mlrs_scale_backoff=0.9, mlrs_scale_growth_stop=0.0,
                 mlrs_scale_hold=False),  # the library default of session 6
    "s5": dict(mlrs_scale_stop_votes=0, mlrs_scale_backoff=0.0, mlrs_scale_growth_stop=0.0,
               mlrs_scale_hold=False),  # the defaults of sessions 3-5 (rows 23-24)
    # session 7 (rows 27-): the averaged stop needs m / sqrt(v) above 0.3 / 0.5, not just above 0 (noise at the start)
    "gs3": dict(mlrs_scale_growth_stop=0.3, mlrs_scale_hold=False),
    "gs5": dict(mlrs_scale_growth_stop=0.5, mlrs_scale_hold=False),
    # learn the peak, hold it, anneal in the cooldown (a learned warmup-stable-decay): no meta step after growth ends,
    # so the greedy one-step signal never drives the lr down mid-run (the short-horizon bias of section 8); the
    # library default since session 7 (first run as mlrs_meta_interval=10**9, the same schedule of meta steps)
    "hold": dict(mlrs_scale_growth_stop=0.3, mlrs_scale_hold=True),
    # session 8 (RESULTS 3b): growth linear in the lr (+1.35 x the start per meta step) once 3 raw hypergradients in
    # a row say "larger", exponential otherwise (a linear warmup from scratch, the gentle growth on a pretrained
    # model); results/quality_lin/. Since session 9 the gate is 5 in a row (hf_mlrs.scale.LINEAR_AFTER), the default
    "lin": dict(mlrs_scale_growth_linear=1.35, mlrs_scale_margin=1.0),
    # the library default of session 9: the gated linear growth (gate 5) and the margin 0.8 when the scale holds, the
    # held-out share never trained on (session 10's default returns it to training once no meta step is left)
    "s9": {},
    # session 10's first step: the held-out share returned to training after the hold, growth still stoppable from
    # its 3rd update (the default then moved to 10: mlrs_scale_min_growth)
    "release": {},
    # growth from a start relative to the model, meta-updates every step until the scale settles, then every 4th
    "g1c": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2),
    "g4c": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=4, mlrs_cooldown_fraction=0.2),
    "g1": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1),
    "g1c3": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                 mlrs_scale_growth_stop=0.3),
    # relative start, no growth phase: symmetric updates (lr 0.2) every step until settled, then every 4th
    "r1c": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                mlrs_scale_growth=0.0, mlrs_scale_lr=0.2),
    "r3c": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                mlrs_scale_growth=0.0, mlrs_scale_lr=0.2, mlrs_scale_start_update=1e-3),
    "g3c": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                mlrs_scale_start_update=1e-3),
    "g3c10": dict(mlrs_settle_interval=1, mlrs_meta_interval=10, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                  mlrs_scale_start_update=1e-3),
    "g3f": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                mlrs_scale_start_update=1e-3, mlrs_scale_growth_stop=None),
    "g3e": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=1, mlrs_cooldown_fraction=0.2,
                mlrs_scale_start_update=1e-3, mlrs_meta_eval_mode=True),
    "g3h4": dict(mlrs_settle_interval=1, mlrs_meta_interval=4, mlrs_horizon=4, mlrs_cooldown_fraction=0.2,
                 mlrs_scale_start_update=1e-3),
    "h1c": dict(mlrs_meta_interval=1, mlrs_horizon=1, mlrs_scale_start_update=None, mlrs_scale_growth=0.0,
                mlrs_cooldown_fraction=0.2),
    # without the relative start and growth: symmetric updates from the given lr (negative result, see RESULTS.md)
    "h1": dict(mlrs_meta_interval=1, mlrs_horizon=1, mlrs_scale_start_update=None, mlrs_scale_growth=0.0),
    "h4": dict(mlrs_meta_interval=4, mlrs_horizon=4, mlrs_scale_start_update=None, mlrs_scale_growth=0.0),
}
# Pinned, so that each variant stays the design its results measured: every variant but "default", "lin", "s9" and
# "release" ran with exponential growth and no margin (mlrs_scale_growth_linear=0, mlrs_scale_margin=1: the defaults
# before session 9), every variant but "default" and "release" without the held-out share's return to training, and
# every variant but "default" with a stop possible from the 3rd growth update (before session 10).
for _name in set(LEARNED_VARIANTS) - {"default", "lin", "s9", "release"}:
    LEARNED_VARIANTS[_name] = {"mlrs_scale_growth_linear": 0.0, "mlrs_scale_margin": 1.0, **LEARNED_VARIANTS[_name]}
for _name in set(LEARNED_VARIANTS) - {"default", "release"}:
    LEARNED_VARIANTS[_name] = {"mlrs_release_meta_share": False, **LEARNED_VARIANTS[_name]}
for _name in set(LEARNED_VARIANTS) - {"default"}:  # before session 10 a stop could end the growth at update 3
    LEARNED_VARIANTS[_name] = {"mlrs_scale_min_growth": 3, **LEARNED_VARIANTS[_name]}
# Since session 13 the default rewinds after a probe of at most 20% of the run (mlrs_scale_rewind,
# mlrs_scale_rewind_max_share): every variant above but "default" ran without it.
for _name in set(LEARNED_VARIANTS) - {"default"}:
    LEARNED_VARIANTS[_name] = {"mlrs_scale_rewind": False, **LEARNED_VARIANTS[_name]}
# The 4-step windows (g4c, g3h4, h4) ran before the hold (session 7) and tracked the scale after its growth: a scale
# that holds would never use their windows, which MLRSTrainer now refuses (RESULTS.md 3b, session 30).
for _name in ("g4c", "g3h4", "h4"):
    LEARNED_VARIANTS[_name] = {"mlrs_scale_hold": False, **LEARNED_VARIANTS[_name]}
# the default of sessions 10-12 (its runs were recorded as "default" until session 13)
LEARNED_VARIANTS["s10"] = {"mlrs_scale_rewind": False}
# session 12: the session-10 default, and when the growth stops the model is rewound to its starting weights and
# trains again from there at the found gamma (hf_mlrs/rewind.py; the growth's steps are spent as a probe), whatever
# the probe's length
LEARNED_VARIANTS["rewind"] = {"mlrs_scale_rewind": True, "mlrs_scale_rewind_max_share": 1.0}
# Since session 23 the linear growth engages the first time only after a streak of "larger" from the first update
# (hf_mlrs/scale.py). The bbc runs of the default of sessions 13-22 are kept as "mlrs_learned:s13@<lr>" in
# results/quality_cpu.json: a label, not a variant (the difference is code); on digits, fashion and the LM the rule did
# not act (the same scale trajectories on 10 seeds, RESULTS.md 3b session 23), and their runs stay "default".


# Committed copies of the leave-one-task-out variants measured in RESULTS.md (session 27 on): rebuilds of one command
# differ by up to 2 points of transfer between machines and library versions (section 8; 3b, session 26), so the
# held-out cells are measured with these nets wherever they are rerun. benchmarks/heldout_variants.sh copies a build
# here when none is committed yet.
HELD_OUT_NETS = HERE / "heldout_nets"


def held_out_default_dir(task_name: str) -> tuple[Path, str]:
    """Where the multi-task default's leave-one-task-out variant without `task_name` lives (its committed copy, else
    the build under outputs/zoo/), made as the shipped default is (a selection over its draws), and the command that
    makes it."""
    import zoo

    name, count = f"multitask-without-{task_name}", zoo.entry("multitask-default")["select"]
    committed = HELD_OUT_NETS / name
    folder = committed if (committed / "model.safetensors").is_file() else zoo.pool_dir(name, count, "select")
    return folder, f"python recipes/zoo.py --entry {name} --select {count}"


# Arm families run from each starting lr of the learned scale (LEARNED_LRS), one record per start and seed
LEARNED_FAMILIES = ("mlrs_learned:", "mlrs_scale:", "mlrs_frozen:", "mlrs_callback:")


def frozen_source(task_name: str, entry: str, smoke: bool = False):
    """The frozen schedule of arm `mlrs_frozen:<entry>` on a task: for "default", the shipped multi-task default's
    leave-one-task-out variant made as the default is (a selection over its draws), so the task is a held-out one."""
    from hf_mlrs import MLRSNet

    if entry not in ("default", "shipped"):
        raise ValueError(f"mlrs_frozen:{entry}: mlrs_frozen:default (the multi-task default, held out) or "
                         "mlrs_frozen:shipped (the shipped default itself, trained on these tasks: for A/B tests of "
                         "the learned scale's mechanics, not of transfer)")
    if smoke:
        return MLRSNet()
    if entry == "shipped":
        return MLRSNet.from_pretrained("multitask-default")
    folder, command = held_out_default_dir(task_name)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist: make it with `{command}` (after its draws)")
    return MLRSNet.from_pretrained(folder)


def run_one(task_name: str, arm: str, lr: float, seed: int, options, schedule_source=None, model: str | None = None,
            steps: int | None = None, overrides: dict | None = None, lr_sequence: list[float] | None = None) -> dict:
    """Train one arm on one task with one seed; returns its validation curve and final metrics.

    `model` and `steps` override the task's model and its length (benchmarks/transfer.py: other model sizes and
    budgets). Arm `mlrs_transfer_learned` applies `schedule_source` frozen and learns only its lr scale. `overrides`
    replace (Trainer or MLRS) training arguments last (benchmarks/scale_lab.py: one-off designs); among them
    `meta_from_train: True` draws the meta batches from the training data instead of a held-out share, and
    `without_meta_share: True` trains any arm on only the part MLRSTrainer trains on (the rest is its held-out meta
    set; same number of steps), to measure what the held-out share costs. Arm `replay`
    is a plain Trainer whose step k is taken at `lr_sequence[k]` (benchmarks/replay_lab.py: another run's applied
    lrs)."""
    import torch
    from prodigyopt import Prodigy
    from transformers import Trainer, TrainingArguments, set_seed

    from hf_mlrs import MLRSCallback, MLRSNet, MLRSTrainer, MLRSTrainingArguments

    from tasks import accuracy_metric, load_task

    spec = TASKS[task_name]
    set_seed(seed)
    model = "tiny" if options.smoke else model or spec["model"]
    task = load_task(task_name, model, max_train=spec["max_train"], max_test=spec["max_test"], seed=0,
                     max_length=spec["max_length"] or 128)
    train, val = split_validation(task)
    steps = steps or (2 if options.smoke else math.ceil(len(train) / spec["batch"]) * spec["epochs"])
    schedule = arm.split(":")[1] if ":" in arm else "constant"
    kwargs = {"cosine_with_min_lr": {"min_lr_rate": 0.1},
              "warmup_stable_decay": {"num_decay_steps": max(1, steps // 5)}}.get(schedule, {})
    common = dict(output_dir=f"/tmp/hf_mlrs_quality/{task_name}/{arm}/{seed}", max_steps=steps, learning_rate=lr,
                  per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=128, seed=seed,
                  lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs, eval_strategy="steps",
                  eval_steps=max(1, steps // 10), logging_steps=max(1, steps // 20), save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=options.device == "cpu",
                  optim="sgd" if is_sgd(options) else
                  "schedule_free_adamw" if arm == "schedule_free" else "adamw_torch",
                  optim_args="momentum=0.9" if is_sgd(options) else None,
                  dataloader_pin_memory=False)
    overrides = dict(overrides or {})
    # not a training argument: the meta batches drawn from the training data itself instead of a held-out share (in
    # another order than the training batches: the meta sampler's seed could otherwise repeat the sampler's order)
    meta_from_train = overrides.pop("meta_from_train", False)
    if overrides.pop("without_meta_share", False):  # the 90% MLRSTrainer keeps (its default split and seed)
        from hf_mlrs.data import split_meta_set

        train = split_meta_set(train, MLRSTrainingArguments.mlrs_meta_fraction, seed)[0]  # the class holds the default

    def arguments(cls=TrainingArguments, **extra):
        return cls(**{**common, **extra, **overrides})

    data = dict(train_dataset=train, eval_dataset=val, data_collator=task.data_collator,
                processing_class=task.processing_class,
                compute_metrics=None if by_loss(task_name) else accuracy_metric())
    if arm == "mlrs_meta":
        args = arguments(MLRSTrainingArguments, mlrs_meta_interval=2, mlrs_meta_lr=1e-2)
        trainer = MLRSTrainer(model=task.model, args=args, **data)
    elif arm.startswith(("mlrs_learned", "mlrs_scale")):  # learned gamma: meta-trained net, or a flat frozen net
        variant = dict(LEARNED_VARIANTS[arm.split(":")[1].split("@")[0]])
        if arm.startswith("mlrs_scale"):  # a flat frozen net tracked its scale until session 22, from held-out
            variant = {"mlrs_scale_hold": False, "mlrs_meta_source": "held_out", **variant}  # batches: pinned
        common["lr_scheduler_type"] = "constant"
        args = arguments(MLRSTrainingArguments, mlrs_gamma="learned", mlrs_meta_lr=1e-2, **variant)
        flat = None
        if arm.startswith("mlrs_scale"):  # A_t = sigmoid(bias) whatever the loss: only the scale is learned
            flat = MLRSNet(output_bias_init=8.0)  # the head's bias starts at 8; a zero weight ignores the loss
            torch.nn.init.zeros_(flat.stages[0].head.weight)
        trainer = MLRSTrainer(model=task.model, args=args, schedule=flat,
                              meta_dataset=train.shuffle(seed=10_007 + seed) if meta_from_train else None, **data)
    elif arm == "mlrs_transfer_learned" or arm.startswith("mlrs_frozen:"):  # a frozen shape, its scale learned
        if arm.startswith("mlrs_frozen:"):
            schedule_source = frozen_source(task_name, arm.split(":")[1].split("@")[0], options.smoke)
        net = MLRSNet.from_pretrained(schedule_source) if isinstance(schedule_source, str) else schedule_source
        common["lr_scheduler_type"] = "constant"
        args = arguments(MLRSTrainingArguments, mlrs_gamma="learned")
        trainer = MLRSTrainer(model=task.model, args=args, schedule=net, **data)
    elif arm.startswith("mlrs_callback:"):  # the no-lr path in an unmodified Trainer: MLRSTrainer's held-out split
        from hf_mlrs.data import split_meta_set

        train, meta = split_meta_set(train, MLRSTrainingArguments.mlrs_meta_fraction, seed)
        net = frozen_source(task_name, arm.split(":")[1].split("@")[0], options.smoke)
        common["lr_scheduler_type"] = "constant"
        if overrides.pop("next_batch", False):  # not a training argument: no held-out data, the next batch's gradient
            train, meta = data["train_dataset"], None
        callback = MLRSCallback(net, gamma="learned", meta_dataset=meta)
        trainer = Trainer(model=task.model, args=arguments(), callbacks=[callback], **{**data, "train_dataset": train})
    elif arm.startswith("mlrs_transfer"):
        net = MLRSNet.from_pretrained(schedule_source) if isinstance(schedule_source, str) else schedule_source
        callback = MLRSCallback(net, cooldown_fraction=overrides.pop("mlrs_cooldown_fraction", None))  # None: net's
        trainer = Trainer(model=task.model, args=arguments(), callbacks=[callback], **data)
    elif arm == "replay":  # HF's own optimizer, stepped through a given lr sequence (no meta step, no held-out set)
        from torch.optim.lr_scheduler import LambdaLR

        class Replay(Trainer):
            def create_scheduler(self, num_training_steps, optimizer=None):
                if self.lr_scheduler is None:
                    self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                                 lambda k: lr_sequence[min(k, len(lr_sequence) - 1)] / lr)
                    self._created_lr_scheduler = True
                return self.lr_scheduler

        trainer = Replay(model=task.model, args=arguments(), **data)
    elif arm == "prodigy":
        optimizer = Prodigy(task.model.parameters(), lr=1.0, weight_decay=0.0)
        trainer = Trainer(model=task.model, args=arguments(), optimizers=(optimizer, None), **data)
    else:
        trainer = Trainer(model=task.model, args=arguments(), **data)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = trainer.state.log_history
    key = "eval_loss" if by_loss(task_name) else "eval_accuracy"
    curve = [(e["step"], e[key]) for e in history if key in e]
    test = trainer.evaluate(task.test, metric_key_prefix="test")
    return {"task": task_name, "model": model, "arm": arm, "lr": lr, "seed": seed, "steps": steps, "seconds": seconds,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,  # as applied
            "val_accuracy": None if by_loss(task_name) else curve[-1][1],
            "val_loss": [e["eval_loss"] for e in history if "eval_loss" in e][-1],
            "test_accuracy": test.get("test_accuracy"), "test_loss": test["test_loss"], "val_curve": curve,
            "lrs": [[e["step"], e["learning_rate"]] for e in history if "learning_rate" in e],
            "losses": [[e["step"], e["loss"]] for e in history if "loss" in e],
            "gammas": [[e["step"], e["mlrs/gamma"]] for e in history if "mlrs/gamma" in e],
            # where the scale's hypergradient came from, as resolved (MLRSTrainer's default changed in session 27)
            "meta_source": getattr(trainer, "meta_source", None)}


def run_task(task_name: str, options, log, earlier: list[dict]) -> list[dict]:
    spec = TASKS[task_name]
    grid = grid_of(task_name, options)
    seeds = list(range(options.seeds))
    source = spec["transfer_from"]
    if options.smoke:
        from hf_mlrs import MLRSNet

        source = MLRSNet()
    runs = []

    def record(arm, lr, seed, **kw):
        runs.append(run_one(task_name, arm, lr, seed, options, **kw))
        r = runs[-1]
        log(f"{task_name:8s} {arm:28s} lr={lr:<8.2g} seed={seed} val_acc={r['val_accuracy']} "
            f"val_loss={r['val_loss']:.4f} test_acc={r['test_accuracy']} test_loss={r['test_loss']:.4f} "
            f"({r['seconds']:.1f}s)")

    arms = options.arms.split(",")
    for schedule in SCHEDULES:
        if "default" in arms:
            for seed in seeds:
                record(f"default:{schedule}", DEFAULT_LR, seed)
    tuned_lr = {}
    for schedule in SCHEDULES:
        if "tuned" in arms:
            for lr in grid:  # the grid on seed 0; the best validation accuracy wins
                record(f"grid:{schedule}", lr, 0)
            best = max((r for r in runs if r["arm"] == f"grid:{schedule}"), key=score)
            tuned_lr[schedule] = best["lr"]
            runs.append({**best, "arm": f"tuned:{schedule}"})
            for seed in seeds[1:]:
                record(f"tuned:{schedule}", best["lr"], seed)
    if "sweep" in arms:  # constant and cosine at the learned arms' starting lrs (seed 0), for the spread
        done = {(r["arm"].split(":")[1], r["lr"]) for r in runs + earlier if r["arm"].startswith(("grid:", "sweep:"))
                and r["seed"] == 0}
        for schedule in ("constant", "cosine"):
            for lr in learned_lrs(options):
                if (schedule, lr) not in done:
                    record(f"sweep:{schedule}", lr, 0)
    for seed in seeds:
        if "schedule_free" in arms:
            record("schedule_free", 2.5e-3, seed)
        if "prodigy" in arms:
            record("prodigy", 1.0, seed)
        if "mlrs_meta" in arms:
            record("mlrs_meta", DEFAULT_LR, seed)
        for arm in arms:
            if arm.startswith(LEARNED_FAMILIES):
                for lr in learned_lrs(options):
                    record(f"{arm}@{lr:g}", lr, seed)
        if "mlrs_transfer" in arms and source is not None:
            record("mlrs_transfer", DEFAULT_LR, seed, schedule_source=source)
            if "linear" in tuned_lr:
                record("mlrs_transfer_tuned", tuned_lr["linear"], seed, schedule_source=source)
    return runs


def summarize(runs: list[dict], starts: list[float] = LEARNED_LRS) -> dict:
    """Per task and arm: mean/std of the metrics, and steps to the target (AlgoPerf: the best tuned arm's mean final
    validation score: accuracy, or loss for the LM task)."""
    summary = {}
    for task in sorted({r["task"] for r in runs}):
        sign = -1.0 if by_loss(task) else 1.0
        rows = [r for r in runs if r["task"] == task and not r["arm"].startswith(("grid:", "sweep:"))]
        by_arm = {}
        for r in rows:
            by_arm.setdefault(r["arm"], []).append(r)
        tuned = [statistics.fmean(score(x) for x in rs) for arm, rs in by_arm.items() if arm.startswith("tuned:")]
        target = max(tuned) if tuned else max(statistics.fmean(score(x) for x in rs) for rs in by_arm.values())
        table = {}
        for arm, rs in by_arm.items():
            def stat(key, rs=rs):
                values = [x[key] for x in rs]
                if any(v is None for v in values):
                    return None
                return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

            reach = [next((s for s, v in x["val_curve"] if sign * v >= target - 1e-12), None) for x in rs]
            hits = [s for s in reach if s is not None]
            table[arm] = {"lr": rs[0]["lr"], "seeds": len(rs), "score": statistics.fmean(score(x) for x in rs),
                          "val_accuracy": stat("val_accuracy"), "val_loss": stat("val_loss"),
                          "test_accuracy": stat("test_accuracy"), "test_loss": stat("test_loss"),
                          "steps_to_target": statistics.median(hits) if len(hits) * 2 > len(rs) else None,
                          "reached_target": f"{len(hits)}/{len(rs)}", "steps": rs[0]["steps"]}
        summary[task] = {"metric": "loss" if by_loss(task) else "accuracy", "target": sign * target, "arms": table,
                         "learned": learned_scale_table(task, runs, target, starts)}
    return summary


def learned_scale_table(task: str, runs: list[dict], best_tuned: float, starts: list[float] = LEARNED_LRS) -> dict:
    """Per learned-scale variant (and, for comparison, constant and cosine at the same starting lrs, seed 0): the
    mean score at each starting lr, the worst, the spread, and the worst gap to the best tuned arm (in points for
    accuracy, in % of the loss for the LM task)."""
    by_variant: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r["task"] != task:
            continue
        if r["arm"].startswith(LEARNED_FAMILIES):
            name = r["arm"].split("@")[0]
        elif r["arm"].startswith(("sweep:", "grid:")) and r["arm"].split(":")[1] in ("constant", "cosine") \
                and r["lr"] in starts:
            name = "fixed lr: " + r["arm"].split(":")[1]
        else:
            continue
        by_variant.setdefault(name, {}).setdefault(r["lr"], []).append(score(r))
    table = {}
    for name, per_lr in by_variant.items():
        means = {lr: statistics.fmean(v) for lr, v in sorted(per_lr.items())}
        worst = min(means.values())
        gap = (best_tuned - worst) * (100.0 if not by_loss(task) else 100.0 / -best_tuned)
        table[name] = {"per_lr": means, "seeds": min(len(v) for v in per_lr.values()), "worst": worst,
                       "spread": max(means.values()) - worst, "worst_gap": gap}
    return table


def performance_profile(summary: dict) -> dict[str, list[float]]:
    """Per arm, the ratios steps_to_target / best arm's steps_to_target on each task (inf if never reached)."""
    ratios = {}
    for task in summary.values():
        reached = [a["steps_to_target"] for a in task["arms"].values() if a["steps_to_target"]]
        best = min(reached) if reached else None
        for arm, a in task["arms"].items():
            ratio = a["steps_to_target"] / best if a["steps_to_target"] and best else math.inf
            ratios.setdefault(arm, []).append(ratio)
    return ratios


def render(summary: dict, ratios: dict, path_png: Path | None, starts: list[float] = LEARNED_LRS) -> str:
    lines = []
    for task, result in summary.items():
        lines += [f"\n### {task} (target validation {result['metric']} {result['target']:.4f})\n",
                  "| arm | peak lr | val acc | val loss | test acc | test loss | steps to target | reached |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, a in sorted(result["arms"].items(), key=lambda kv: -kv[1]["score"]):
            fmt = lambda v, d=4: "-" if v is None else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"  # noqa: E731
            steps = f"{a['steps_to_target']:.0f} / {a['steps']}" if a["steps_to_target"] else f"- / {a['steps']}"
            lines.append(f"| {arm} | {a['lr']:.2g} | {fmt(a['val_accuracy'])} | {fmt(a['val_loss'])} | "
                         f"{fmt(a['test_accuracy'])} | {fmt(a['test_loss'])} | {steps} | {a['reached_target']} |")
    for task, result in summary.items():
        if result["learned"]:
            unit = "% of the loss" if result["metric"] == "loss" else "accuracy points"
            lines += [f"\n### {task}: learned scale by starting lr (validation {result['metric']}; worst gap to the "
                      f"best tuned arm in {unit})\n",
                      "| arm | " + " | ".join(f"start {lr:g}" for lr in starts)
                      + " | spread | worst gap | seeds |",
                      "|---" * (len(starts) + 4) + "|"]
            for name, row in sorted(result["learned"].items()):
                sign = -1.0 if result["metric"] == "loss" else 1.0
                cells = [f"{sign * row['per_lr'][lr]:.4f}" if lr in row["per_lr"] else "-" for lr in starts]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['spread']:.4f} | {row['worst_gap']:.2f} | "
                             f"{row['seeds']} |")
    lines += ["\n### Performance profile (fraction of tasks on which an arm reaches the target within tau x the "
              "fastest arm's steps)\n", "| arm | tau=1 | tau=1.5 | tau=2 | tau=4 |", "|---|---|---|---|---|"]
    for arm, rs in sorted(ratios.items()):
        lines.append(f"| {arm} | " + " | ".join(f"{sum(r <= tau for r in rs) / len(rs):.2f}" for tau in (1, 1.5, 2, 4))
                     + " |")
    if path_png is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4), dpi=100)
        canvas = FigureCanvasAgg(figure)
        ax = figure.subplots()
        taus = [1 + 0.05 * i for i in range(61)]
        for arm, rs in sorted(ratios.items()):
            style = "-" if arm.startswith("mlrs") else "--" if arm.startswith("tuned") else ":"
            ax.step(taus, [sum(r <= t for r in rs) / len(rs) for t in taus], style, label=arm, where="post")
        ax.set(xlabel="tau (steps / fastest arm's steps)", ylabel="fraction of tasks", title="Performance profile")
        ax.legend(fontsize=6, ncol=2)
        figure.tight_layout()
        canvas.print_png(str(path_png))
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path) -> None:
    """lr and training loss of seed 0 of the main arms, per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in runs})
    figure = Figure(figsize=(11, 3.2 * len(tasks)), dpi=90)
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(len(tasks), 2, squeeze=False)
    shown = ("default:linear", "tuned:linear", "tuned:cosine", "schedule_free", "prodigy", "mlrs_meta",
             "mlrs_transfer", "mlrs_transfer_tuned")
    for row, task in zip(axes, tasks):
        for r in runs:
            if r["task"] == task and r["seed"] == 0 and r["arm"] in shown and r["lrs"]:
                steps, lrs = zip(*r["lrs"])
                row[0].plot(steps, lrs, label=r["arm"])
                steps, losses = zip(*r["losses"])
                row[1].plot(steps, losses, label=r["arm"])
        row[0].set(title=f"{task}: learning rate (logged = applied)", xlabel="step", yscale="log")
        row[1].set(title=f"{task}: training loss", xlabel="step", yscale="log")
        row[1].legend(fontsize=6)
    figure.tight_layout()
    canvas.print_png(str(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="bbc,digits,fashion")
    parser.add_argument("--arms", default="default,tuned,schedule_free,prodigy,mlrs_meta,mlrs_transfer")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                        help="sgd: SGD with momentum 0.9 for every arm, its own lr grid and starting lrs; results "
                        "go to quality_<device>_sgd.*")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, 1 seed, 2 grid values")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--reuse", help="a results JSON whose runs of other arms are kept instead of rerun "
                        "(e.g. the tuned baselines of an earlier run)")
    parser.add_argument("--report", action="store_true", help="train nothing: rewrite the tables and plots from "
                        "the runs of --reuse (e.g. after relabelling runs whose design became the default)")
    options = parser.parse_args(argv)
    if options.report and not options.reuse:
        parser.error("--report rewrites the results of --reuse: give --reuse RESULTS.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adamw_only = {"schedule_free", "prodigy", "mlrs_meta", "mlrs_transfer"} & set(options.arms.split(","))
    if is_sgd(options) and adamw_only:
        parser.error(f"--optimizer sgd runs the tuned, sweep, default and {'/'.join(LEARNED_FAMILIES)} "
                     f"arms; {', '.join(sorted(adamw_only))} are AdamW arms: drop them from --arms.")
    if options.smoke:
        options.seeds, options.tasks = 1, "digits"
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{options.device}{'_sgd' if is_sgd(options) else ''}{'_smoke' if options.smoke else ''}"
    starts = starting_lrs(options)
    runs = []
    if options.reuse:  # keep earlier runs, except those of the arm families this invocation runs on its tasks
        fresh = [] if options.report else [a.split(":")[0] for a in options.arms.split(",")]
        for r in json.loads(Path(options.reuse).read_text())["runs"]:
            family = "tuned" if r["arm"].startswith("grid:") else r["arm"].split(":")[0].split("@")[0]
            if r["task"] not in options.tasks.split(",") or family not in fresh:
                runs.append(r)
    with open(stem.with_suffix(".log"), "a") as log_file:  # appended: a rerun of one arm keeps the others' lines
        log_file.write(f"# {time.strftime('%Y-%m-%d %H:%M')} python benchmarks/quality.py {' '.join(argv or [])}\n")

        def log(line):
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        for task in [] if options.report else options.tasks.split(","):
            runs += run_task(task, options, log, [r for r in runs if r["task"] == task])
            stem.with_suffix(".json").write_text(json.dumps({"runs": runs}))  # keep partial results
    summary = summarize(runs, starts)
    ratios = performance_profile(summary)
    table = render(summary, ratios, None if options.smoke else stem.with_name(stem.name + "_profile.png"), starts)
    if not options.smoke:
        plot_curves(runs, stem.with_name(stem.name + "_curves.png"))
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if options.device == "cuda" else "")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else [])
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command.strip(),
                                                     "summary": summary, "profile": ratios, "runs": runs},
                                                    indent=1, default=str))
    stem.with_suffix(".md").write_text(f"# Quality ({options.device})\n\nMachine: {machine}\n\n"
                                       f"Command: `{command.strip()}`\n{table}\n")
    print(table)
    return summary


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
