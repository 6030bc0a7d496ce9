"""A run that SIGKILLs itself at a chosen moment; run again, it resumes as a restart script would (kill-anywhere test).

    python kill_worker.py MODE OUTPUT_DIR KILL RESULT       (under `accelerate launch` for 2 processes)

MODE is a run of tests/test_reliability.py's build(): meta, meta_ga2 (gradient accumulation 2) or transfer (Trainer +
MLRSCallback). KILL is a moment, in the order they happen:
  none             never: the run completes and writes its outcome (lrs, schedule net, model) to RESULT
  substep:K        between the two micro-batches of step K (meta_ga2)
  step:K           at the end of step K (before its save, if K is a save step)
  save:K:PHASE     inside the save of checkpoint-K: PHASE is weights (model written, nothing else), optimizer
                   (optimizer.pt half written), state (every file written, no completion marker yet) or marker
                   (the marker half written)
  end              after training, before the process exits
Each run starts the way a restart script does, from `last_complete_checkpoint(OUTPUT_DIR)` (None: from scratch);
MLRSTrainer runs pass `resume_from_checkpoint=True` instead when there is one, which must find the same checkpoint.
With several processes the whole job dies at once (every rank and the launcher), as when a node is preempted.
"""

import io
import os
import signal
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import tqdm  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_mlrs.checkpoints  # noqa: E402
from hf_mlrs import MLRSTrainer, last_complete_checkpoint  # noqa: E402
from tests.test_reliability import build, outcome  # noqa: E402


PHASES = ("weights", "optimizer", "state", "marker")
tqdm.tqdm.get_lock()  # made once, before forking: a lock a killed child made would be reported leaked at exit


def moments(mode: str, steps: int, save_every: int) -> list[str]:
    """Every kill moment of a run, in time order."""
    found = []
    for k in range(1, steps + 1):
        found += [f"substep:{k}"] if mode == "meta_ga2" else []
        found += [f"step:{k}"]
        found += [f"save:{k}:{phase}" for phase in PHASES] if k % save_every == 0 else []
    return found + ["end"]


def step_of(moment: str) -> int:
    """The optimizer step a moment belongs to (end: after every step)."""
    return sys.maxsize if moment == "end" else int(moment.split(":")[1])


class Killer(TrainerCallback):
    """Dies at `moment`; only the main process pulls the trigger, and it takes every process down with it."""

    def __init__(self, trainer, moment: str):
        self.trainer, self.kind = trainer, moment.split(":")[0]
        self.step = None if moment in ("none", "end") else int(moment.split(":")[1])
        self.phase = moment.split(":")[2] if self.kind == "save" else None
        self.pids = [os.getpid()]
        if self.kind == "save":
            self._arm_save()

    def die(self):
        if not self.trainer.accelerator.is_main_process:
            return
        sys.stdout.flush()
        for pid in self.pids[1:] + ([os.getppid()] if len(self.pids) > 1 else []):
            os.kill(pid, signal.SIGKILL)  # the other ranks, then the launcher: the whole job at once
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crashed node

    def due(self, step):
        return self.trainer.state.global_step == step

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.distributed.is_initialized():
            self.pids = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(self.pids, os.getpid())

    def on_substep_end(self, args, state, control, **kwargs):
        if self.kind == "substep" and self.due(self.step - 1):
            self.die()

    def on_step_end(self, args, state, control, **kwargs):
        if self.kind == "step" and self.due(self.step):
            self.die()

    def on_train_end(self, args, state, control, **kwargs):
        if self.kind == "end":
            self.die()

    def _arm_save(self):
        """Hooks inside the checkpoint save, so that a kill lands in that window for sure."""
        killer, trainer = self, self.trainer
        if self.phase == "weights":
            save_model = trainer.save_model

            def save_model_then_die(output_dir=None, _internal_call=False):
                save_model(output_dir, _internal_call)
                if _internal_call and killer.due(killer.step):
                    killer.die()

            trainer.save_model = save_model_then_die
        elif self.phase == "optimizer":
            save = torch.save

            def torn_save(obj, f, *args, **kwargs):
                if isinstance(f, str) and f.endswith("optimizer.pt") and killer.due(killer.step):
                    buffer = io.BytesIO()
                    save(obj, buffer, *args, **kwargs)
                    with open(f, "wb") as out:
                        out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    killer.die()
                return save(obj, f, *args, **kwargs)

            torch.save = torn_save
        else:
            write_marker = hf_mlrs.checkpoints.write_marker

            def marker_then_die(folder, *args):
                if killer.due(killer.step):
                    if killer.phase == "marker":
                        write_marker(folder, *args)
                        path = os.path.join(folder, hf_mlrs.checkpoints.MARKER)
                        os.truncate(path, os.path.getsize(path) // 2)
                    killer.die()
                write_marker(folder, *args)

            hf_mlrs.checkpoints.write_marker = marker_then_die


def run(mode: str, output_dir: str, moment: str, result: str, log: str | None = None) -> None:
    if log:  # a forked child: its output goes to its own log
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    trainer = build(mode, output_dir)
    trainer.add_callback(Killer(trainer, moment))
    resume = last_complete_checkpoint(output_dir)  # what a restart script passes: None starts from scratch
    if resume is not None and isinstance(trainer, MLRSTrainer):
        resume = True  # MLRSTrainer's own way, which must skip the same incomplete folders
    print(f"kill_worker: {mode} kill={moment} resume_from={resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    lrs, net, model = outcome(trainer)
    mine = {"lrs": lrs, "net": net, "model": model, "steps": trainer.state.global_step}
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if trainer.accelerator.is_main_process:
        torch.save(everyone, result)
    trainer.accelerator.end_training()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done (hf-notes.md)


if __name__ == "__main__":
    run(*sys.argv[1:5])
