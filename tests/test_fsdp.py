"""Meta-training under FSDP2: two CPU processes over gloo, `fully_shard` on a tiny BERT, against one process.

Accelerate does not do FSDP on CPU (it falls back to plain multi-CPU data parallel), so the worker drives MetaStep
from a hand-written loop (tests/scripts/fsdp_worker.py); the Trainer path runs in benchmarks/fsdp_gpu.py on GPUs.
One launch (about 30 s on 2 cores) serves every test below.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_mlrs import MLRSTrainer
from tests.testing_utils import tiny_args, tiny_bert


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["adamw", "sgd", "adamw_learned"]


@pytest.fixture(scope="module")
def verdict(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "verdict.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "scripts" / "fsdp_worker.py"), str(out)]
    # Its own session: on a timeout the workers are killed with torchrun, not left holding the 2 cores.
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    assert process.returncode == 0 and out.exists(), stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_sharded_meta_training_equals_one_process(verdict, config):
    """20 steps, a meta-update every 2nd step (every step with the learned scale's settle interval): lrs, the
    hypergradients, the schedule net and the gathered model equal the one-process run of the same global batch."""
    assert verdict["world_size"] == 2
    entry = verdict["configs"][config]
    assert all(entry["close"].values()), (entry["close"], entry["max_rel"])  # rtol 1e-5 (float64 model)
    assert entry["meta_updates"][0] == entry["meta_updates"][1] >= 10
    assert entry["lr_range"][1] > entry["lr_range"][0]  # the lr moved, so equal lrs mean something
    if config == "adamw_learned":
        assert entry["scale"]["calibrated"] == [True, True]  # the calibration's relative_update summed over shards


@pytest.mark.parametrize("config", CONFIGS)
def test_meta_step_adds_only_the_scalar_all_reduce(verdict, config):
    """Per step, the collectives of MetaStep: a meta step = those of one plain sharded forward/backward + one
    all-reduce of 2 scalars (meta loss, dot); a calibration step = one all-reduce of 3 scalars; any other step none."""
    entry = verdict["configs"][config]
    plain = entry["plain_backward"]
    assert plain.get("c10d._allgather_base_.default", 0) > 0 and plain.get("c10d._reduce_scatter_base_.default", 0) > 0
    kinds = [c["kind"] for c in entry["collectives"] if c["what"] == "after_step"]
    assert kinds.count("meta") >= 10
    for call in entry["collectives"]:
        if call["what"] == "before_step" or call["kind"] == "plain":
            assert call["calls"] == {}, call
        elif call["kind"] == "meta":
            assert call["calls"] == {**plain, "c10d.allreduce_.default": 1}, call
            assert call["allreduce_numels"] == [2], call
        else:  # calibration
            assert call["calls"] == {"c10d.allreduce_.default": 1} and call["allreduce_numels"] == [3], call
    # one shard-sized buffer: delta holds this rank's shards only (about half of the 20k parameters)
    assert entry["delta_numel"] < 0.6 * entry["param_numel"]


def test_sharded_checkpoint_resumes_exactly(verdict):
    """Model and optimizer through torch.distributed.checkpoint, the schedule's state written once by rank 0 and
    loaded on every rank: the resumed run equals the uninterrupted one bit for bit."""
    entry = verdict["configs"]["adamw"]
    assert entry["resume_exact"] == {"lrs": True, "net": True, "model": True}
    assert entry["scheduler_files"] == ["scheduler.pt"]


# ---- the Trainer's guard, without a GPU --------------------------------------------------------------------------

def accelerator_in(mode, **plugin):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(**plugin) if plugin else None)
    return SimpleNamespace(distributed_type=getattr(DistributedType, mode), state=state)


def test_fsdp2_is_accepted_fsdp1_and_deepspeed_refused(tmp_path, dataset, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from hf_mlrs.trainer import meta_training_problem

    assert meta_training_problem(accelerator_in("FSDP", fsdp_version=2)) is None
    assert meta_training_problem(accelerator_in("MULTI_GPU")) is None
    assert "fsdp_version: 2" in meta_training_problem(accelerator_in("FSDP", fsdp_version=1))
    assert "DeepSpeed" in meta_training_problem(accelerator_in("DEEPSPEED"))
    # Through MLRSTrainer (a real FSDP2 Trainer needs GPUs: benchmarks/fsdp_gpu.py): FSDP1 refused, naming the fix.
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="cannot meta-train under FSDP .*FSDP1 .*fsdp_version: 2"):
        MLRSTrainer(model=tiny_bert(), args=tiny_args(tmp_path), train_dataset=dataset)


def test_shard_group_only_for_fsdp2_parameters(verdict):
    import torch

    from hf_mlrs.hypergrad import sharding_group

    assert sharding_group([torch.nn.Parameter(torch.zeros(2))]) is None  # one process, DDP: nothing to sum
    assert verdict["mixed_refused"]  # some parameters sharded, some not: refused with a clear error
