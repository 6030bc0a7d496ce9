"""Run under `accelerate launch` with 2 CPU processes (see tests/test_distributed.py).

Meta-trains a tiny BERT with MLRSTrainer over an uneven last batch and gradient accumulation (mode "callback": a plain
Trainer + MLRSCallback learning only the scale of a frozen schedule; "next_batch": the same without held-out data, from
the next step's gradient; "trainer_next_batch": MLRSTrainer's default with a frozen schedule, the same), then checks
on every rank that the lrs, the schedule net and the model are identical, and that meta steps add no gradient
all-reduce.
Writes the verdict of rank 0 as JSON to argv[1].
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import Trainer, TrainerCallback, TrainingArguments


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_mlrs import MLRSCallback, MLRSNet, MLRSTrainer  # noqa: E402
from hf_mlrs.data import split_meta_set  # noqa: E402
from tests.testing_utils import tiny_args, tiny_bert, tiny_dataset  # noqa: E402


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class CountAllReduces(TrainerCallback):
    """Counts DDP's gradient-bucket all-reduces per optimizer step through a comm hook."""

    def __init__(self, trainer):
        self.trainer, self.calls, self.per_step = trainer, 0, []

    def on_train_begin(self, args, state, control, **kwargs):
        def hook(process_group, bucket):
            self.calls += 1
            return default_hooks.allreduce_hook(process_group, bucket)

        self.trainer.model_wrapped.register_comm_hook(None, hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self.calls)
        self.calls = 0


def main(out_path, gamma):
    torch.set_num_threads(1)
    dataset = tiny_dataset(n=203)  # 203 - 20 held out: the last batch of each epoch is uneven across 2 ranks
    # learned: no meta step is left once the scale holds, or at the latest when the cooldown starts at step 7 of 14
    # (epoch 1 of 3, 6 steps each): the held-out share rejoins training from the next epoch, alike on both ranks
    learned = dict(mlrs_gamma="learned", mlrs_settle_interval=1,
                   mlrs_cooldown_fraction=0.5) if gamma in ("learned", "rewind") else {}
    if gamma == "rewind":  # growth stoppable from its 3rd update, so that it stops (and rewinds) before the cooldown,
        # after a probe longer than the default max share of a 14-step run
        learned.update(mlrs_scale_rewind=True, mlrs_scale_min_growth=3, mlrs_scale_rewind_max_share=1.0)
    common = dict(max_steps=14, per_device_train_batch_size=8, gradient_accumulation_steps=2, seed=7)
    if gamma in ("callback", "next_batch"):  # the same run shape, the net frozen, the scale learned from a held-out
        # 20 examples, or ("next_batch") from the next step's training gradient, with no held-out data
        train, meta = split_meta_set(dataset, 20 / len(dataset), 7) if gamma == "callback" else (dataset, None)
        callback = MLRSCallback(MLRSNet.from_pretrained("multitask-default"), gamma="learned", meta_dataset=meta,
                                meta_interval=2, cooldown_fraction=0.5)
        args = TrainingArguments(os.path.dirname(out_path) + "/ddp", learning_rate=1e-3, logging_steps=1,
                                 report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, **common)
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=train, callbacks=[callback])
        net, scheduler_of = callback.schedule, lambda: callback.scheduler
    elif gamma == "trainer_next_batch":  # MLRSTrainer's default with a frozen schedule: the scale from the next batch
        trainer = MLRSTrainer(
            model=tiny_bert(), schedule=MLRSNet.from_pretrained("multitask-default"), train_dataset=dataset,
            args=tiny_args(os.path.dirname(out_path) + "/ddp", mlrs_gamma="learned", mlrs_cooldown_fraction=0.5,
                           **common))
        net, scheduler_of = trainer.schedule, lambda: trainer.lr_scheduler
    else:
        trainer = MLRSTrainer(
            model=tiny_bert(),
            args=tiny_args(os.path.dirname(out_path) + "/ddp", mlrs_meta_interval=2, mlrs_meta_lr=1e-2, **common,
                           **learned),
            train_dataset=dataset,
        )
        net, scheduler_of = trainer.schedule, lambda: trainer.lr_scheduler
    counter = CountAllReduces(trainer)
    trainer.add_callback(counter)
    trainer.train()
    scheduler = scheduler_of()
    share = getattr(trainer, "_meta_share", None)

    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    mine = {
        "lrs": lrs,
        "net": digest(net.state_dict().values()),
        "model": digest(trainer.model.parameters()),
        "meta_updates": scheduler.meta_learner.num_updates,
        "gammas": [e["mlrs/gamma"] for e in trainer.state.log_history if "mlrs/gamma" in e],
        "scale": scheduler.run_state()["scale"],
        "allreduces_per_step": counter.per_step,
        "released_from": share.released_from if share is not None else None,
        "rewound_at": scheduler.rewind.step if scheduler.rewind is not None else None,
        "meta_source": scheduler.meta_learner.meta_source if scheduler.meta_learner is not None else None,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if trainer.accelerator.is_main_process:
        verdict = {
            "world_size": trainer.accelerator.num_processes,
            "identical": all(other == everyone[0] for other in everyone),
            "lr_range": [min(lrs), max(lrs)],
            **everyone[0],
        }
        with open(out_path, "w") as f:
            json.dump(verdict, f)
    trainer.accelerator.end_training()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done (hf-notes.md)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fixed")
