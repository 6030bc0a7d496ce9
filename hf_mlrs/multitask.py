"""MLRSMultiTaskTrainer: one MLR-SNet meta-trained over several tasks and model sizes, one training run at a time.

The paper meta-trains its net in one long run on one task (200 epochs of CIFAR-10) and transfers it; a net learned on
one dataset can learn that dataset's habits. Here one net is meta-trained over *episodes*:

- An episode is one whole training run of one (task, model) pair: a fresh model, its own held-out meta set and its
  own recurrent state (each run's scheduler starts from h = c = 0, as the paper's meta-test does on a new task).
  `MLRSTrainer(schedule=net, continue_meta_training=True)` meta-trains the one net further in each. Episodes go
  round-robin over the pairs, `rounds` times (p0, p1, ..., p0, p1, ...), so no task has the last word for long.
- Between episodes the net's weights and the meta-optimizer's (Adam) state carry over. After each episode they are
  written to `episode-NNNN/carry/`, then the marker `episode-NNNN/done.json` (the episode's record) is written
  last, atomically. Every episode after the first starts from the previous carry *read from disk*, in a run that was
  never interrupted too, so a restarted run is bitwise the run that was not.
- Inside an episode the Trainer checkpoints every `save_steps` (hf_mlrs's crash-safe checkpoints); a restart resumes
  the first unfinished episode from `last_complete_checkpoint`. An episode's checkpoints are deleted once its
  carry and marker are written: the carry is all the next episode needs.
- Stage snapshots. The paper's stages are its net at epochs 1, 100 and 200 of one meta-training run: the lr that
  run wanted early, midway and late. Meta-trained over episodes, the net *tracks* the one-step signal inside each
  run (its output falls within a run and rises again when the next one starts), so any one moment of the whole
  meta-training is the habit of whichever task ran then (benchmarks/RESULTS.md, section 8, session 5). So stage k is
  taken inside the runs of the *last round*: the live net at the middle of stage k's part of every episode of that
  round (`stage_midpoints`), written to `episode-NNNN/midpoints/` with its output A_t when reached; stage k is the
  one of these nets whose A_t was the median over the round's episodes (the middle task's lr at that point), so the
  final net's last stage is such a midpoint net too, not the last carry. A plan of one episode is the paper's own
  regime (one long run): its snapshots are taken inside that run, as `MLRSTrainer` takes them. Switch losses (for
  `stage_by="loss"`) are the mean over the last round of each episode's smoothed normalised loss when it reached the
  stage's share of its run.
- Each episode's record names its task, its loss scale (the first raw training loss) and the range of the net's
  normalised input and output (from the logged losses and net outputs): whether the normalised loss lets one net serve
  tasks whose losses live on different scales is read off these.

Tested in one process; under several processes the files are written by the main process only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .checkpoints import last_complete_checkpoint
from .config import MLRSTrainingArguments
from .modeling import MLRSNet


DONE_NAME = "done.json"  # an episode's record, written last: its presence means the carry is complete
CARRY_DIR = "carry"
MIDPOINTS_DIR = "midpoints"  # last round: the live net at the middle of each stage's part of the run
META_OPTIMIZER_NAME = "meta_optimizer.pt"
EPISODE_KEYS = {"model", "train_dataset", "eval_dataset", "meta_dataset", "data_collator", "processing_class",
                "compute_metrics", "callbacks", "args"}


@dataclasses.dataclass(frozen=True)
class Episode:
    """One training run of the multi-task meta-training: the `index`-th, in round `round`, of `task` with `model`."""

    index: int
    round: int
    task: str
    model: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}/{self.model}"

    @property
    def folder(self) -> str:
        return f"episode-{self.index:04d}"


def plan_episodes(pairs: Sequence[tuple[str, str]], rounds: int, seed: int = 0) -> list[Episode]:
    """Round-robin over the (task, model) pairs, `rounds` times; episode i gets seed `seed + i` (its own model
    initialisation, data order and meta set)."""
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("MLRSMultiTaskTrainer: no (task, model) pairs given; pass at least one, e.g. "
                         "[('bbc', 'minilm-L2')].")
    bad = [p for p in pairs if len(p) != 2 or not all(isinstance(x, str) and x for x in p)]
    if bad:
        raise ValueError(f"MLRSMultiTaskTrainer: pairs must be (task, model) strings, got {bad}.")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"MLRSMultiTaskTrainer: rounds={rounds!r} must be an integer >= 1.")
    return [Episode(r * len(pairs) + i, r, task, model, seed + r * len(pairs) + i)
            for r in range(rounds) for i, (task, model) in enumerate(pairs)]


class MLRSMultiTaskTrainer:
    """Meta-trains one [`MLRSNet`] over episodes of several (task, model) pairs; resumable at any point.

    Args:
        schedule (`MLRSNet`): the net to start from (e.g. `MLRSNet()`, or a shipped schedule to continue).
        pairs (`list[tuple[str, str]]`): the (task, model) pairs, in round-robin order.
        make_episode (`Callable[[Episode], dict]`): builds one episode's run. Returns `MLRSTrainer` keyword
            arguments: `model` and `train_dataset` (required), `eval_dataset`, `meta_dataset`, `data_collator`,
            `processing_class`, `compute_metrics`, `callbacks`, and `args`, a dict of `MLRSTrainingArguments` fields
            that differ for this episode (e.g. `max_steps`, `per_device_train_batch_size`). Called after the
            episode's seed is set, so a model built in it is initialised the same on a restart.
        args (`MLRSTrainingArguments`): settings of every episode; `output_dir` holds the episodes' folders. Set
            `save_strategy="steps"` and `save_steps` for restarts inside an episode. Episodes meta-train the net up
            to their cooldown, so with `mlrs_gamma="learned"` they run with `mlrs_scale_hold=False` (unless an
            episode's `args` says otherwise).
        rounds (`int`, *optional*, defaults to `1`): passes over the pairs.

    After `train()`, `records` holds one dict per episode. Example:

    ```python
    >>> runner = MLRSMultiTaskTrainer(MLRSNet(), [("bbc", "minilm-L2"), ("digits", "resnet-small")],
    ...                               make_episode, MLRSTrainingArguments("out", learning_rate=1e-3), rounds=3)
    >>> net = runner.train()          # rerun the same line after a kill: it continues where it stopped
    >>> net.save_pretrained("multitask-schedule")
    ```
    """

    def __init__(self, schedule: MLRSNet, pairs: Sequence[tuple[str, str]], make_episode: Callable[[Episode], dict],
                 args: MLRSTrainingArguments, rounds: int = 1):
        if not isinstance(schedule, MLRSNet):
            raise TypeError(f"MLRSMultiTaskTrainer needs an MLRSNet to start from, got {type(schedule).__name__}.")
        if not isinstance(args, MLRSTrainingArguments):
            raise TypeError("MLRSMultiTaskTrainer: args must be MLRSTrainingArguments.")
        self.plan = plan_episodes(pairs, rounds, args.seed)
        self.rounds = rounds
        self.schedule = schedule
        self.make_episode = make_episode
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.records: list[dict] = []

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self) -> MLRSNet:
        """Run every episode not yet done (continuing an interrupted one from its last complete checkpoint) and
        return the net with its stage snapshots and a `multitask` provenance."""
        self.records = self._finished_records()
        for episode in self.plan[len(self.records):]:
            self.records.append(self._run_episode(episode))
        return self._assemble()

    def _run_episode(self, episode: Episode) -> dict:
        from transformers import set_seed

        from .trainer import MLRSTrainer

        net, meta_state = self._carry_before(episode)
        set_seed(episode.seed)
        spec = dict(self.make_episode(episode))
        unknown = set(spec) - EPISODE_KEYS
        if unknown or "model" not in spec or "train_dataset" not in spec:
            raise ValueError(f"MLRSMultiTaskTrainer: make_episode({episode.name}) must return 'model' and "
                             f"'train_dataset' and only keys of {sorted(EPISODE_KEYS)}; got {sorted(spec)}.")
        folder = self.output_dir / episode.folder
        # An episode meta-trains the net to its cooldown: with a learned gamma, no hold once the scale settles
        args = dataclasses.replace(self.args, output_dir=str(folder), seed=episode.seed, run_name=episode.name,
                                   **{"mlrs_scale_hold": False, **spec.pop("args", {})})
        trainer = MLRSTrainer(args=args, schedule=net, continue_meta_training=True, meta_optimizer_state=meta_state,
                              **spec)
        trainer._take_snapshots = self.one_run  # one run: the paper's in-run snapshots (module doc)
        if not self.one_run and episode.round == self.rounds - 1:
            trainer.add_callback(_MidpointSnapshots(trainer.schedule, folder / MIDPOINTS_DIR,
                                                    trainer.is_world_process_zero()))
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder))
        record = episode_record(trainer, episode, time.perf_counter() - started)
        if trainer.is_world_process_zero():
            self._write_carry(folder, trainer, record)
        trainer.accelerator.wait_for_everyone()
        return record

    def _carry_before(self, episode: Episode) -> tuple[MLRSNet, dict | None]:
        """The net and meta-optimizer state the episode starts from: the initial net, or the previous carry."""
        if episode.index == 0:
            return copy.deepcopy(self.schedule), None
        carry = self.output_dir / self.plan[episode.index - 1].folder / CARRY_DIR
        state = torch.load(carry / META_OPTIMIZER_NAME, weights_only=True) if (carry / META_OPTIMIZER_NAME).exists() \
            else None
        return MLRSNet.from_pretrained(carry), state

    def _write_carry(self, folder: Path, trainer, record: dict) -> None:
        carry = folder / CARRY_DIR
        trainer.schedule.save_pretrained(carry, write_card=False)
        state = trainer.meta_optimizer_state()
        if state is not None:
            _atomic_write(carry / META_OPTIMIZER_NAME, lambda path: torch.save(state, path))
        _atomic_write(folder / DONE_NAME, lambda path: Path(path).write_text(json.dumps(record, indent=1)))
        _drop_checkpoints(folder)

    def _finished_records(self) -> list[dict]:
        """Records of the episodes already done, in order; refuses an output_dir written with another plan."""
        records = []
        for episode in self.plan:
            done = self.output_dir / episode.folder / DONE_NAME
            if not done.exists():
                break
            record = json.loads(done.read_text())
            if (record.get("task"), record.get("model"), record.get("seed")) != (episode.task, episode.model,
                                                                                  episode.seed):
                raise ValueError(
                    f"MLRSMultiTaskTrainer: {done} records episode {record.get('task')}/{record.get('model')} "
                    f"(seed {record.get('seed')}), but this plan has {episode.name} (seed {episode.seed}) there: "
                    "the output_dir holds a run with other pairs, rounds or seed. Use a new output_dir."
                )
            _drop_checkpoints(done.parent)  # a kill between the marker and the clean-up leaves them
            records.append(record)
        extra = self.output_dir / f"episode-{len(self.plan):04d}" / DONE_NAME
        if len(records) == len(self.plan) and extra.exists():
            raise ValueError(f"MLRSMultiTaskTrainer: {extra} exists: the output_dir holds a longer run. Use a new "
                             "output_dir.")
        return records

    @property
    def one_run(self) -> bool:
        """A plan of one episode: the paper's regime, whose stage snapshots are taken inside the run."""
        return len(self.plan) == 1

    # ---- the final net ------------------------------------------------------------------------------------------

    def _assemble(self) -> MLRSNet:
        """The final net with its stages from the last round (see the module doc)."""
        last = self.output_dir / self.plan[-1].folder / CARRY_DIR
        net = MLRSNet.from_pretrained(last)
        steps = [r["steps"] for r in self.records]
        last_round = [r for r in self.records if r["round"] == self.rounds - 1]
        chosen = None
        if not self.one_run:  # one run: the carry already holds the snapshots taken inside it
            stages, chosen = median_midpoints([self.output_dir / self.plan[r["index"]].folder / MIDPOINTS_DIR
                                               for r in last_round], net.num_stages)
            for stage, state in zip(net.stages, stages):
                stage.load_state_dict(state)
        _set_switch_losses(net, last_round)
        net.provenance = {
            "mode": "multi-task meta-training",
            "pairs": sorted({r["task"] + "/" + r["model"] for r in self.records}),
            "rounds": self.rounds,
            "episodes": len(self.records),
            "steps": sum(steps),
            "stages_from": "inside the run" if self.one_run else
            f"the last round's {len(last_round)} runs, at the middle of each stage's part: the median net",
            "episode_records": [compact(r) for r in self.records],
        }
        if chosen is not None:
            net.provenance["stage_midpoints"] = chosen
        return net.eval()


def stage_midpoints(stage_starts: list[float], max_steps: int) -> list[int]:
    """Global step (1-based) at the middle of each stage's part of a run of `max_steps` steps."""
    ends = list(stage_starts[1:]) + [1.0]
    return [min(max_steps, max(1, round((start + end) / 2 * max_steps))) for start, end in zip(stage_starts, ends)]


def midpoint_record(folder: Path, k: int) -> dict:
    """The step and A_t written with stage k's midpoint net in `folder`."""
    return json.loads((Path(folder) / f"stage-{k}.json").read_text())


def _set_switch_losses(net: MLRSNet, last_round: list[dict]) -> None:
    """Stage k's switch loss (for `stage_by="loss"`): the mean over the last round of each run's, where finite."""
    for k in range(1, net.num_stages):
        values = [r["switch_losses"][k] for r in last_round if math.isfinite(r["switch_losses"][k])]
        net.stage_switch_losses[k] = sum(values) / len(values) if values else float("nan")


def pool_draws(net: MLRSNet, output_dirs: Sequence[Path], labels: Sequence[str],
               rounds: int) -> tuple[list[dict], list[str]]:
    """Stages from several finished meta-trainings of one plan (draws: the same command with other seeds), in place:
    the rule of a single run's stages (`median_midpoints` over the last round) applied to the last rounds of all of
    them together, so stage k is the median of len(output_dirs) times as many nets. Why: two draws of one command
    transfer up to 5 points apart (benchmarks/RESULTS.md section 8), and a median over more runs is less a draw.
    `labels` name the draws in the provenance. Returns, per stage, the outputs and the net chosen, and the runs they
    come from, in the order of the outputs ("<label>/episode-NNNN task/model")."""
    last_rounds, folders, names = last_round_runs(output_dirs, labels, rounds)
    stages, chosen = median_midpoints(folders, net.num_stages, names)
    for stage, state in zip(net.stages, stages):
        stage.load_state_dict(state)
    _set_switch_losses(net, last_rounds)
    return chosen, names


def last_round_runs(output_dirs: Sequence[Path], labels: Sequence[str],
                    rounds: int) -> tuple[list[dict], list[Path], list[str]]:
    """The runs of the last round of each finished meta-training in `output_dirs` (draws of one plan): their
    records, their midpoint folders and their names ("<label>/episode-NNNN task/model"), in episode order."""
    last_rounds, folders, names = [], [], []
    for output_dir, label in zip(output_dirs, labels, strict=True):
        records = [json.loads(p.read_text()) for p in sorted(Path(output_dir).glob(f"episode-*/{DONE_NAME}"))]
        last = [r for r in records if r["round"] == rounds - 1]
        if not last or len(last) != sum(r["round"] == 0 for r in records):
            raise FileNotFoundError(f"{output_dir} holds no finished last round (round {rounds - 1} of "
                                    f"{rounds}; {len(records)} episodes done): finish that draw first (rerun its "
                                    "command: it resumes).")
        last_rounds += last
        folders += [Path(output_dir) / f"episode-{r['index']:04d}" / MIDPOINTS_DIR for r in last]
        names += [f"{label}/episode-{r['index']:04d} {r['task']}/{r['model']}" for r in last]
    return last_rounds, folders, names


def load_run_stages(net: MLRSNet, midpoints: Path) -> list[float]:
    """Every stage of `net` (in place) from one run's midpoint nets: the whole shape that run's net had, stage k its
    live net at the middle of stage k's part. Returns the run's outputs A_t at those midpoints."""
    stages, _ = median_midpoints([Path(midpoints)], net.num_stages)
    for stage, state in zip(net.stages, stages):
        stage.load_state_dict(state)
    return [midpoint_record(midpoints, k)["output"] for k in range(net.num_stages)]


def median_midpoints(folders: list[Path], num_stages: int,
                     names: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Stage k's weights: of the stage-k midpoints in `folders` (one per episode of the last round), the net whose
    output A_t there was the median (the lower one for an even count). A real net, not an average: the nets of one
    round differ by more than averaging their weights preserves (a weight average of nets at 0.08-0.73 output 0.75).
    Also returns, per stage, every episode's output and the one chosen (by `names`, default its episode folder),
    for the provenance."""
    missing = [str(f / f"stage-{k}.json") for f in folders for k in range(num_stages)
               if not (f / f"stage-{k}.json").is_file()]
    if missing:
        raise ValueError(
            f"MLRSMultiTaskTrainer: the last round's stage midpoints are missing ({missing[0]}, {len(missing)} in "
            "all): the output_dir was written by an hf_mlrs that took no midpoints, or a run of the last round "
            "stopped before the middle of a stage. Delete the last round's episode-NNNN folders and rerun the same "
            "command: those episodes run again and take them.")
    stages, chosen = [], []
    for k in range(num_stages):
        outputs = [midpoint_record(f, k)["output"] for f in folders]
        median = sorted(range(len(folders)), key=lambda i: outputs[i])[(len(folders) - 1) // 2]
        stages.append(load_file(str(folders[median] / f"stage-{k}.safetensors")))
        chosen.append({"outputs": [round(o, 4) for o in outputs],
                       "chosen": names[median] if names else folders[median].parent.name})
    return stages, chosen


class _MidpointSnapshots(TrainerCallback):
    """Writes the live net's weights, then its output A_t, when a run reaches the middle of each stage's part.

    Written in `on_step_end`, which runs before the step's checkpoint is saved: a checkpoint at or after a midpoint
    implies the midpoint's files are complete, and a resumed run redoes any later midpoint with the same net (exact
    resume) and writes it again. Each write is atomic (a kill leaves the old file or the new one). A step that held
    its lr (a non-finite loss) has no fresh A_t: the midpoint is then taken at the next step that has one.
    """

    def __init__(self, schedule: MLRSNet, folder: Path, write: bool):
        self.schedule, self.folder, self.write = schedule, Path(folder), write
        self.steps: list[int] | None = None
        self.pending: set[int] = set()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.steps is not None:
            return
        # At the first step, not in on_train_begin: the Trainer restores a resumed run's state after that event.
        # state.max_steps is the run's length as the Trainer computed it (also for runs given in epochs).
        self.steps = stage_midpoints(self.schedule.stage_starts, state.max_steps)
        done = {k for k in range(len(self.steps)) if (self.folder / f"stage-{k}.json").is_file()
                and midpoint_record(self.folder, k)["step"] <= state.global_step}
        self.pending = set(range(len(self.steps))) - done  # a resumed run keeps the midpoints it had passed

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        due = [k for k in sorted(self.pending) if state.global_step >= self.steps[k]]
        if not due or lr_scheduler is None or lr_scheduler.last_output is None:
            return
        for k in due:
            self.pending.discard(k)
            if not self.write:
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            live = {n: t.detach().clone().contiguous() for n, t in self.schedule.stages[-1].state_dict().items()}
            record = {"step": state.global_step, "output": float(lr_scheduler.last_output)}
            _atomic_write(self.folder / f"stage-{k}.safetensors", lambda path, live=live: save_file(live, path))
            _atomic_write(self.folder / f"stage-{k}.json",  # last: a json means the weights are there
                          lambda path, record=record: Path(path).write_text(json.dumps(record)))


def episode_record(trainer, episode: Episode, seconds: float) -> dict:
    """What one episode did: the loss scale it fed the net, the normalised input and output ranges, the lrs."""
    scheduler = trainer.lr_scheduler
    logs = trainer.state.log_history
    losses = [e["loss"] for e in logs if "loss" in e and "mlrs/net_output" in e]
    outputs = [(e["step"], e["mlrs/net_output"]) for e in logs if e.get("mlrs/net_output") is not None]
    lrs = [e["learning_rate"] for e in logs if "learning_rate" in e]
    inputs = [scheduler.normalize(x) for x in losses] if scheduler.initial_loss else []
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    every = max(1, len(outputs) // 50)
    return {
        "index": episode.index, "round": episode.round, "task": episode.task, "model": episode.model,
        "seed": episode.seed, "steps": trainer.state.global_step,
        "loss_scale": scheduler.initial_loss,  # the first raw training loss
        "final_loss": losses[-1] if losses else None,
        "input_range": [min(inputs), max(inputs)] if inputs else None,  # the net's normalised input, logged means
        "output_range": [min(o for _, o in outputs), max(o for _, o in outputs)] if outputs else None,
        "lr_range": [min(lrs), max(lrs)] if lrs else None,
        "gamma": scheduler.gamma,
        "meta_updates": scheduler.meta_learner.num_updates,
        "switch_losses": [float(v) for v in trainer.schedule.stage_switch_losses],
        # A_t over the run (fraction of training, net output): the learned shape on this task
        "shape": [[round(s / trainer.state.max_steps, 4), o] for s, o in outputs[::every]],
        "eval": {k: v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")},
        "seconds": round(seconds, 1),
    }


def compact(record: dict) -> dict:
    """A record as provenance keeps it (config.json): everything but the per-step shape and the timing."""
    return {k: v for k, v in record.items() if k not in ("shape", "seconds", "switch_losses")}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_checkpoints(folder: Path) -> None:
    """Delete a finished episode's `checkpoint-N/` folders (only those: its carry and record stay)."""
    for checkpoint in Path(folder).glob("checkpoint-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)
