"""Two real CPU processes under `accelerate launch` (gloo): every rank must make the same decisions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def launch_two_processes(script: Path, *script_args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`--multi_gpu` with ACCELERATE_USE_CPU=1 starts 2 CPU processes; `--cpu --num_processes 2` would start one."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *script_args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("gamma", ["fixed", "learned", "rewind", "callback", "next_batch", "trainer_next_batch"])
def test_two_processes_keep_identical_lrs_nets_and_models(tmp_path, gamma):
    out = tmp_path / "verdict.json"
    result = launch_two_processes(ROOT / "tests" / "scripts" / "ddp_worker.py", str(out), gamma)
    assert result.returncode == 0, result.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict["world_size"] == 2
    assert verdict["identical"], verdict
    assert len(verdict["lrs"]) == 14
    if gamma == "fixed":
        assert verdict["meta_updates"] == 7
    else:  # the learned scale: the same on both ranks (in "identical"), calibrated, then grown or tracked
        assert verdict["scale"]["calibrated"] and verdict["scale"]["num_updates"] >= 4
        assert len(set(verdict["gammas"])) > 3
        assert verdict["meta_source"] == ("next_batch" if gamma.endswith("next_batch") else "held_out")
        if gamma not in ("callback", "next_batch", "trainer_next_batch"):  # (a callback cannot return its
            # meta_dataset to training; the next batch holds nothing out)
            assert verdict["released_from"] in (1, 2)  # the held-out share trained in epoch 2 at least, on both ranks
        # with the rewind: both ranks put their starting weights back after the same step (in "identical")
        assert (verdict["rewound_at"] is not None) == (gamma == "rewind"), verdict["rewound_at"]
    assert verdict["lr_range"][1] > verdict["lr_range"][0]  # the lr moved, so identical lrs mean something
    # Meta steps (every 2nd) cost no extra gradient all-reduce: only the scalars of the hypergradient travel.
    per_step = verdict["allreduces_per_step"]
    assert per_step[0] > 0 and len(set(per_step)) == 1, per_step
