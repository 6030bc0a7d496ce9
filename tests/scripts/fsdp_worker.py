"""Run with `torchrun --nproc_per_node 2` (gloo, CPU; see tests/test_fsdp.py): the sharded meta step vs one process.

Accelerate does not do FSDP on CPU, so this drives the library's own MetaStep / MetaLearner / MLRSScheduler from a
hand-written loop, through a stand-in for the few Trainer attributes MetaStep reads. Per configuration:
  - a single-process reference (rank 0 only): the plain module, the whole global batch, the whole meta batch;
  - the same run with `fully_shard` on each BERT layer and the root, each rank holding half of every batch;
  - the sharded run again, checkpointed at step 10 (sharded model and optimizer through torch.distributed.checkpoint,
    the schedule's state written once by rank 0, as the Trainer does with SHARDED_STATE_DICT) and resumed.
During the sharded run every collective is counted at the dispatcher (eager c10d and functional collectives alike).
Writes rank 0's verdict as JSON to argv[1].
"""

import collections
import contextlib
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_mlrs import MLRSNet, MLRSScheduler  # noqa: E402
from hf_mlrs.config import learned_scale  # noqa: E402
from hf_mlrs.hypergrad import MetaLearner  # noqa: E402
from hf_mlrs.metastep import MetaStep  # noqa: E402
from tests.testing_utils import SEQ, VOCAB, tiny_bert  # noqa: E402


STEPS, BATCH, META_BATCH = 20, 8, 8  # per-rank batch sizes; the global batch is twice that
# float64 model: the comparison then shows the method's exactness, not float32 summation order (measured in float32:
# 20 AdamW steps differ from the one-process run by up to 6e-5 relative, from the reduce-scatter's summation order).
DTYPE = torch.float64
RTOL, ATOL = 1e-5, 1e-10
CONFIGS = {
    "adamw": dict(optimizer="adamw", lr=1e-3, gamma="fixed"),
    "sgd": dict(optimizer="sgd", lr=0.05, gamma="fixed"),
    # the learned scale: a calibration step (relative_update over shards), then 2-step windows at every step
    "adamw_learned": dict(optimizer="adamw", lr=1e-3, gamma="learned"),
}


# ---- data: batch t of the global run; rank r of n gets rows [r*B, (r+1)*B) ------------------------------------------

def batch(index: int, size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    ids[:, 1] = torch.randint(1, 10, (size,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 3}


def part(full: dict, rank: int, world: int) -> dict:
    size = len(full["labels"]) // world
    return {k: v[rank * size:(rank + 1) * size] for k, v in full.items()}


# ---- what MetaStep reads from a transformers.Trainer ----------------------------------------------------------------

class LoopAccelerator:
    def __init__(self, world: int, rank: int):
        self.num_processes, self.process_index = world, rank
        self.device = torch.device("cpu")
        self.optimizer_step_was_skipped = False

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction="mean"):  # as accelerate's reduce: a sum, divided for "mean"
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.num_processes if reduction == "mean" else tensor


class LoopTrainer:
    def __init__(self, model, world: int, rank: int):
        self.model = model
        self.accelerator = LoopAccelerator(world, rank)
        self.state = SimpleNamespace(global_step=0)
        self.control = SimpleNamespace(should_training_stop=False)

    def compute_loss_context_manager(self):
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs):
        return model(**inputs).loss


# ---- counting collectives -------------------------------------------------------------------------------------------

class CountCollectives(TorchDispatchMode):
    """Every c10d op (eager: what FSDP2 and dist.* call) and functional collective (DTensor), with elements sent."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.allreduce_numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional") and "wait" not in str(func):
            name = str(func)
            self.calls[name] += 1
            if "allreduce" in name or "all_reduce" in name:
                tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
                self.allreduce_numels.append(sum(t.numel() for t in tensors))
        return func(*args, **(kwargs or {}))


def counted(fn, log: list, label: str):
    def wrapped(*args, **kwargs):
        with CountCollectives() as count:
            result = fn(*args, **kwargs)
        log.append({"what": label, "calls": dict(count.calls), "allreduce_numels": count.allreduce_numels})
        return result
    return wrapped


# ---- one run --------------------------------------------------------------------------------------------------------

def build(config: dict, sharded: bool, world: int, rank: int):
    model = tiny_bert(seed=0, dtype=DTYPE)
    if sharded:
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    params = list(model.parameters())
    if config["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.01)
    else:
        optimizer = torch.optim.SGD(params, lr=config["lr"], momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    net = MLRSNet()
    learned = config["gamma"] == "learned"
    scheduler = MLRSScheduler(optimizer, net, gamma=learned_scale(config["lr"]) if learned else config["lr"],
                              num_training_steps=STEPS, stage_by="fixed", num_labels=3)
    scheduler.meta_learner = MetaLearner(
        net, params, interval=2, meta_lr=1e-2, weight_decay=1e-4, max_steps=STEPS, horizon=2 if learned else 1,
        scale=scheduler.scale, settle_interval=1 if learned else None, stop_step=STEPS)
    trainer = LoopTrainer(model, world if sharded else 1, rank if sharded else 0)
    step = MetaStep(trainer, scheduler)
    # (the net is meta-trained: every meta step reads its whole batch, share 1)
    if sharded:  # this rank's half of the global meta batch
        step.meta_batch = lambda m, share=1.0: part(batch(m, 2 * META_BATCH, seed=2), rank, world)
    else:
        step.meta_batch = lambda m, share=1.0: batch(m, 2 * META_BATCH, seed=2)
    return SimpleNamespace(model=model, optimizer=optimizer, net=net, scheduler=scheduler, trainer=trainer, step=step)


def train(run, sharded: bool, world: int, rank: int, start: int, stop: int, log: list | None = None):
    """Steps [start, stop) as the Trainer orders them: backward, before_step (lr), step, after_step (meta), zero."""
    before, after = run.step.before_step, run.step.after_step
    if log is not None:
        before, after = counted(before, log, "before_step"), counted(after, log, "after_step")
    lrs = []
    for t in range(start, stop):
        run.trainer.state.global_step = t
        data = batch(t, 2 * BATCH, seed=1)
        loss = run.model(**(part(data, rank, world) if sharded else data)).loss
        loss.backward()
        loss = loss.detach()
        if sharded:  # the global mean loss, as StepLossMeter gives it
            dist.all_reduce(loss)
            loss = loss / world
        before(float(loss))
        run.optimizer.step()
        kind = "meta" if run.step.pending_meta else "calibration" if run.step.pending_calibration else "plain"
        after()
        if log is not None:
            log[-1]["kind"] = kind
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.meta_learner.record_stages(t + 1, run.scheduler.loss_ema)
        lrs.append(run.scheduler.get_last_lr()[0])
    return lrs


def full_model(model) -> list[torch.Tensor]:
    """Whole parameters (all ranks must call: full_tensor() all-gathers)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def summary(run, lrs) -> dict:
    scheduler = run.scheduler
    return {
        "lrs": lrs,
        "hypergrads": list(run.step.log_window["hypergrad"]),  # dL_meta/dalpha of each meta-update
        "meta_losses": list(run.step.log_window["meta_loss"]),
        "net": [v.detach().clone() for v in run.net.state_dict().values()],
        "model": full_model(run.model),
        "scale": scheduler.scale.state_dict() if scheduler.scale is not None else None,
        "meta_updates": scheduler.meta_learner.num_updates,
    }


# ---- checkpoint at step 10, resume ---------------------------------------------------------------------------------

def save(run, folder: str, rank: int) -> None:
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)
    if rank == 0:  # tiny and identical on every rank: written once
        torch.save(run.scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
    dist.barrier()


def load(run, folder: str) -> None:
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    run.scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))


# ---- comparison -----------------------------------------------------------------------------------------------------

def max_rel(a: list, b: list) -> float:
    """max |a - b| / max(|b|, 1e-3) over all entries (the floor keeps near-zero entries from dominating)."""
    worst = 0.0
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        finite = torch.isfinite(y)
        rel = ((x - y).abs() / y.abs().clamp_min(1e-3))[finite]
        worst = max(worst, float(rel.max()) if rel.numel() else 0.0)
    return worst


def same(a: list, b: list, rtol: float, atol: float) -> bool:
    """Entry-wise allclose of two lists of tensors (or numbers); NaN equals NaN (the net's unset switch losses)."""
    return len(a) == len(b) and all(
        torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64),
                       rtol=rtol, atol=atol, equal_nan=True) for x, y in zip(a, b))


def compare(got: dict, want: dict) -> dict:
    keys = ("lrs", "hypergrads", "meta_losses", "net", "model")
    close = {key: same(got[key], want[key], rtol=RTOL, atol=ATOL) for key in keys}
    scale = None
    if want["scale"] is not None:
        scale = {k: (got["scale"][k], want["scale"][k]) for k in ("log_gamma", "num_updates", "calibrated")}
        close["scale"] = math.isclose(got["scale"]["log_gamma"], want["scale"]["log_gamma"], rel_tol=1e-5)
    return {"close": close, "max_rel": {key: max_rel(got[key], want[key]) for key in keys},
            "scale": scale, "meta_updates": [got["meta_updates"], want["meta_updates"]],
            "lr_range": [min(want["lrs"]), max(want["lrs"])]}


def mixed_sharding_refused(world: int, rank: int) -> bool:
    """Sharded and plain parameters in one optimizer: the shard sums would count the plain ones once per rank."""
    from hf_mlrs.hypergrad import sharding_group

    model = tiny_bert(seed=0, dtype=DTYPE)
    fully_shard(model.bert.encoder.layer[0])
    try:
        sharding_group(list(model.parameters()))
    except ValueError as error:
        return "some of the optimizer's parameters are FSDP2 shards" in str(error)
    return False


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(os.path.dirname(out_path), "checkpoint-10")
    verdict = {"world_size": world, "configs": {}}
    for name, config in CONFIGS.items():
        began = time.time()
        reference = None
        if rank == 0:
            run = build(config, sharded=False, world=world, rank=rank)
            reference = summary(run, train(run, False, world, rank, 0, STEPS))
        log = []
        run = build(config, sharded=True, world=world, rank=rank)
        sharded = summary(run, train(run, True, world, rank, 0, STEPS, log))
        # one plain forward/backward of a meta batch: the collectives any sharded backward needs
        with CountCollectives() as plain:
            run.model(**part(batch(0, 2 * META_BATCH, seed=2), rank, world)).loss.backward()
        run.optimizer.zero_grad(set_to_none=True)
        entry = {"collectives": log, "plain_backward": dict(plain.calls),
                 "delta_numel": sum(d.numel() for d in run.scheduler.meta_learner.delta),
                 "param_numel": sum(p.numel() for p in run.model.parameters())}
        if name == "adamw":  # kill-and-resume at step 10 through a sharded checkpoint
            first = build(config, sharded=True, world=world, rank=rank)
            lrs = train(first, True, world, rank, 0, 10)
            save(first, folder, rank)
            second = build(config, sharded=True, world=world, rank=rank)
            load(second, folder)
            resumed = summary(second, lrs + train(second, True, world, rank, 10, STEPS))
            entry["resume_exact"] = {key: same(resumed[key], sharded[key], rtol=0.0, atol=0.0)
                                     for key in ("lrs", "net", "model")}
            entry["scheduler_files"] = sorted(n for n in os.listdir(folder) if n.startswith("scheduler"))
        if rank == 0:
            entry.update(compare(sharded, reference))
            entry["seconds"] = round(time.time() - began, 1)
        verdict["configs"][name] = entry
    verdict["mixed_refused"] = mixed_sharding_refused(world, rank)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(verdict, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done (hf-notes.md)


if __name__ == "__main__":
    main(sys.argv[1])
