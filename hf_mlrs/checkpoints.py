"""Crash-safe checkpoints: save so that a complete `checkpoint-N/` can be told from one a kill cut short, and find it.

A kill while the Trainer writes `checkpoint-N/` leaves a folder without `trainer_state.json`, with a truncated file,
or (several processes) without some ranks' files; `resume_from_checkpoint=True` takes the newest folder anyway and
crashes or resumes wrongly. Upstream twice added write-to-a-temporary-folder-then-rename and twice reverted it
(multi-node and network file systems), so nothing here renames folders. Instead:

- A save through `save_checkpoint_safely` (MLRSTrainer, and Trainer + MLRSCallback) ends with a completion marker,
  `hf_mlrs_complete.json`, that the main process writes after every process has finished writing (a barrier) and
  after syncing the files to disk; it lists each file with its size. `trainer_state.json` declares that a marker ends
  the save, and a stale marker is removed before a folder is written again, so a folder without a marker is known to
  be cut short. Checkpoint rotation (`save_total_limit`) runs after the marker: the previous complete checkpoint is
  deleted only once the new one is complete.
- `last_complete_checkpoint(output_dir)` returns the newest folder that is complete: every file its marker lists is
  there with its size, or, for a folder saved without hf_mlrs (no declaration), its files pass structural checks
  (JSON parses, safetensors/torch files are not truncated, per-rank RNG files are contiguous). It never deletes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints


MARKER = "hf_mlrs_complete.json"
DECLARATION = "hf_mlrs.checkpoint"  # key in trainer_state.json's stateful_callbacks: "a marker ends this save"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
           "adapter_model.safetensors", "adapter_model.bin")
_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_RNG = re.compile(r"^rng_state_(\d+)\.pth$")


# ---- finding the checkpoint to resume from ------------------------------------------------------------------------

def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete, or None if there is none (or no folder).

    Incomplete folders newer than it (a save cut short by a kill, a truncated file) are skipped with a warning naming
    each and why; nothing is deleted. A restart script passes the result to
    `trainer.train(resume_from_checkpoint=...)`: None starts from scratch. With a plain `Trainer`, add `MLRSCallback`
    (or use `MLRSTrainer`): they mark checkpoints complete and keep a run resumed from its final checkpoint from
    training one step too many, which a `Trainer` alone does.
    """
    found, skipped = _scan(output_dir)
    if skipped:
        _warn_skipped(skipped, found)
    return found


def checkpoint_to_resume(output_dir: str | os.PathLike) -> str:
    """What `resume_from_checkpoint=True` means in MLRSTrainer: the newest complete checkpoint, or a clear error."""
    found, skipped = _scan(output_dir)
    if found is None and not skipped:
        raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")  # the Trainer's error
    if found is None:
        raise ValueError(
            f"hf_mlrs: no complete checkpoint in {output_dir} to resume from: {_describe(skipped)}. Nothing was "
            "deleted. To start over, train without resume_from_checkpoint (or pass "
            "hf_mlrs.last_complete_checkpoint(output_dir), None here): the run rewrites those folders as it reaches "
            "their steps."
        )
    if skipped:
        _warn_skipped(skipped, found)
    return found


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from exactly, or None if it is complete."""
    folder = str(folder)
    state, problem = _read_json(os.path.join(folder, TRAINER_STATE))
    if problem:
        return f"{TRAINER_STATE} {problem}"
    if os.path.lexists(os.path.join(folder, MARKER)):
        marker, problem = _read_json(os.path.join(folder, MARKER))
        return f"its completion marker {MARKER} {problem}" if problem else _marker_problem(folder, marker, state)
    if DECLARATION in (state.get("stateful_callbacks") or {}):
        return f"it has no completion marker {MARKER}: its save was cut short"
    return _structural_problem(folder)  # saved without hf_mlrs (plain Trainer, older hf_mlrs)


def _scan(output_dir) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete folder or None, [(newer incomplete folder, why)]), newest first by step number."""
    if not os.path.isdir(output_dir):
        return None, []
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _FOLDER.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    skipped = []
    for _, name in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def _describe(skipped: list[tuple[str, str]]) -> str:
    return "; ".join(f"{os.path.basename(folder)} ({problem})" for folder, problem in skipped)


def _warn_skipped(skipped, found) -> None:
    then = f"using {os.path.basename(found)}" if found else "no complete checkpoint left: starting from scratch"
    warnings.warn(f"hf_mlrs: skipped incomplete checkpoint(s): {_describe(skipped)}; {then}. Nothing was deleted.",
                  UserWarning, stacklevel=3)


# ---- what "complete" means ----------------------------------------------------------------------------------------

def _read_json(path: str) -> tuple[dict | None, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"cannot be read ({type(error).__name__}: truncated or damaged)"
    return (value, None) if isinstance(value, dict) else (None, "is not a JSON object")


def _marker_problem(folder: str, marker: dict, state: dict) -> str | None:
    files = marker.get("files")
    if not isinstance(files, dict) or TRAINER_STATE not in files:
        return f"its completion marker {MARKER} does not list the checkpoint's files"
    if marker.get("global_step") != state.get("global_step"):
        return f"its completion marker is for step {marker.get('global_step')}, {TRAINER_STATE} for another"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} when it was saved"
    return None


def _structural_problem(folder: str) -> str | None:
    """Checks for a folder saved without a marker: every file that can be checked cheaply is whole."""
    names = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    if not any(os.path.basename(n) in WEIGHTS or n.startswith("pytorch_model_fsdp") for n in names):
        return "it has no model weights file"
    for name in names:
        problem = _file_problem(os.path.join(folder, name))
        if problem:
            return f"{name} {problem}"
    ranks = sorted(int(m.group(1)) for n in names if (m := _RNG.match(n)))
    if ranks != list(range(len(ranks))):
        missing = min(set(range(max(ranks) + 1)) - set(ranks))
        return f"rng_state_{missing}.pth is missing"
    for shard_dir in {os.path.dirname(n) for n in names if n.endswith(".distcp")}:
        if f"{shard_dir}/.metadata" not in names:
            return f"{shard_dir}/.metadata is missing (a sharded save cut short)"
    return None


def _file_problem(path: str) -> str | None:
    if path.endswith(".json"):
        value, problem = _read_json(path)
        if problem:
            return problem
        if path.endswith(".index.json"):  # sharded weights: every shard it names must be there
            missing = sorted(set(value.get("weight_map", {}).values()) - set(os.listdir(os.path.dirname(path))))
            return f"names shards that are missing: {missing}" if missing else None
    elif path.endswith(".safetensors"):
        return _safetensors_problem(path)
    elif path.endswith((".bin", ".pt", ".pth")) and not zipfile.is_zipfile(path):
        return "is truncated or not a torch.save file"  # torch.save writes a zip; its directory comes last
    return None


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size <= 0 or 8 + header_size > size:
                return "is truncated"
            header = json.loads(f.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "has a damaged header"
    return "is truncated" if 8 + header_size + end > size else None


# ---- saving so that completeness can be known ---------------------------------------------------------------------

def save_checkpoint_safely(trainer, save, model, trial) -> None:
    """Run the Trainer's `_save_checkpoint` (`save`) so that the folder counts as complete only once it is.

    Every process calls this (as it calls `_save_checkpoint`); the barriers keep them in step.
    """
    args, state, accelerator = trainer.args, trainer.state, trainer.accelerator
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    state.stateful_callbacks[DECLARATION] = {"marker": MARKER, "num_processes": accelerator.num_processes}
    if args.should_save and os.path.lexists(os.path.join(folder, MARKER)):
        os.remove(os.path.join(folder, MARKER))  # the folder is about to be overwritten: it is not complete now
    accelerator.wait_for_everyone()  # no process writes into the folder while a stale marker still vouches for it
    limit = args.save_total_limit
    args.save_total_limit = None  # the Trainer rotates before we mark; we rotate after (below)
    try:
        save(model, trial)
    finally:
        args.save_total_limit = limit
    accelerator.wait_for_everyone()  # every process's files (model shards, RNG states) are written
    if args.should_save:
        if limit and os.path.isfile(os.path.join(folder, TRAINING_ARGS)):
            torch.save(args, os.path.join(folder, TRAINING_ARGS))  # as the Trainer wrote it, with the real limit
        write_marker(folder, state.global_step, accelerator.num_processes)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)


def write_marker(folder: str, global_step: int, num_processes: int) -> None:
    """Sync every file of `folder` to disk, then write the marker listing them: the save's last act.

    Syncing first makes the marker's promise hold after a machine crash too, not only after a killed process.
    The marker is written in place, not renamed: a torn marker does not parse and the folder reads as incomplete.
    """
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = Path(path).relative_to(folder).as_posix()
            if relative == MARKER:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                files[relative] = os.fstat(fd).st_size  # fstat after open: fresh on network file systems
            finally:
                os.close(fd)
        _fsync_dir(root)
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump({"global_step": global_step, "num_processes": num_processes, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the folder's new entries durable; not supported everywhere
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- a run resumed from its final checkpoint ----------------------------------------------------------------------

def nothing_left_to_train(state) -> bool:
    """The run was resumed from a checkpoint at (or past) max_steps.

    The Trainer checks for the end only after a step, so it would train one step more than the uninterrupted run
    (transformers 5.24, plain Trainer too); MLRSTrainer and MLRSCallback then feed it no batch and stop.
    """
    return 0 < state.max_steps <= state.global_step
