"""Crash-safe resume (issue: a kill at any moment, including mid-checkpoint, resumes exactly).

The kill-anywhere tests SIGKILL a training run at seeded random moments (about half of them inside a checkpoint save,
hit for sure through hooks in the save: see tests/scripts/kill_worker.py), restart it as a restart script would, and
compare the finished run bitwise with the uninterrupted one (lrs, schedule net, model). The suite runs 6 kills in one
process and 1 with 2 processes; HF_MLRS_FULL_KILL_TEST=1 runs the full variant (>= 20 kills in one process, 3 with 2
processes) and prints its counts (benchmarks/RESULTS.md, section 6).
"""

import json
import multiprocessing
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_mlrs import MLRSTrainer, checkpoints, last_complete_checkpoint
from hf_mlrs.checkpoints import MARKER, checkpoint_problem
from tests.scripts import kill_worker
from tests.test_distributed import launch_two_processes
from tests.test_reliability import SAVE_EVERY, STEPS, build, outcome
from tests.testing_utils import tiny_args, tiny_bert, tiny_dataset


ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("HF_MLRS_FULL_KILL_TEST") == "1"


# ---- which checkpoint is complete ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A meta-training run and a plain-Trainer run (no hf_mlrs: no markers), 12 steps, a checkpoint every 4."""
    base = tmp_path_factory.mktemp("runs")
    build("meta", str(base / "meta")).train()
    args = TrainingArguments(str(base / "plain"), report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                             max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, learning_rate=1e-3)
    Trainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(n=64)).train()
    return base


def copy_run(finished_runs, name, tmp_path) -> Path:
    return Path(shutil.copytree(finished_runs / name, tmp_path / name))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def tear(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {  # what a kill (or a full disk) leaves, and the reason the folder must be skipped for
    "no trainer_state": (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "torn trainer_state": (lambda f: tear(f / "trainer_state.json"), "trainer_state.json cannot be read"),
    "no marker": (lambda f: (f / MARKER).unlink(), "no completion marker"),
    "torn marker": (lambda f: tear(f / MARKER), "completion marker .* cannot be read"),
    "torn optimizer": (lambda f: tear(f / "optimizer.pt"), "optimizer.pt has .* bytes"),
    "no schedule": (lambda f: shutil.rmtree(f / "mlrs_schedule"), "mlrs_schedule/.* is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_incomplete_checkpoint_is_skipped_with_a_warning_and_kept(finished_runs, tmp_path, damage):
    run = copy_run(finished_runs, "meta", tmp_path)
    assert last_complete_checkpoint(run) == str(run / "checkpoint-12")
    damage_it, reason = DAMAGE[damage]
    damage_it(run / "checkpoint-12")
    before = listing(run)
    with pytest.warns(UserWarning, match=rf"skipped incomplete checkpoint\(s\): checkpoint-12 \(.*{reason}"):
        assert last_complete_checkpoint(run) == str(run / "checkpoint-8")
    assert listing(run) == before  # nothing deleted


def test_checkpoints_without_hf_mlrs_are_checked_by_their_files(finished_runs, tmp_path):
    run = copy_run(finished_runs, "plain", tmp_path)
    assert not list(run.rglob(MARKER))
    assert last_complete_checkpoint(run) == str(run / "checkpoint-12")  # accepted: all files whole
    tear(run / "checkpoint-12" / "model.safetensors")
    assert checkpoint_problem(run / "checkpoint-12") == "model.safetensors is truncated"
    tear(run / "checkpoint-8" / "rng_state.pth")
    assert checkpoint_problem(run / "checkpoint-8") == "rng_state.pth is truncated or not a torch.save file"
    shutil.copy(run / "checkpoint-4" / "rng_state.pth", run / "checkpoint-4" / "rng_state_1.pth")  # rank 0's lost
    assert checkpoint_problem(run / "checkpoint-4") == "rng_state_0.pth is missing"
    with pytest.warns(UserWarning, match="no complete checkpoint left: starting from scratch"):
        assert last_complete_checkpoint(run) is None
    assert last_complete_checkpoint(tmp_path / "never-created") is None  # a restart script's first start


def test_a_sharded_save_without_hf_mlrs_needs_its_metadata(tmp_path):
    """FSDP writes each rank's shard, then .metadata once all are written (torch.distributed.checkpoint)."""
    folder = tmp_path / "checkpoint-3"
    (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
    assert checkpoint_problem(folder) == "pytorch_model_fsdp_0/.metadata is missing (a sharded save cut short)"
    (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"index")
    assert checkpoint_problem(folder) is None


def test_resume_true_needs_a_complete_checkpoint(finished_runs, tmp_path):
    run = copy_run(finished_runs, "meta", tmp_path)
    for step in (4, 8, 12):
        (run / f"checkpoint-{step}" / "trainer_state.json").unlink()
    trainer = build("meta", str(run))
    with pytest.raises(ValueError, match="no complete checkpoint in .* checkpoint-12 .* Nothing was deleted"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="No valid checkpoint found"):  # none at all: as the Trainer
        build("meta", str(tmp_path / "empty")).train(resume_from_checkpoint=True)


def test_rotation_waits_for_the_marker(tmp_path, monkeypatch):
    """save_total_limit=1: the Trainer deletes the previous checkpoint before the new one is marked; hf_mlrs after."""
    trainer = MLRSTrainer(model=tiny_bert(), train_dataset=tiny_dataset(n=64), args=tiny_args(
        tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1, mlrs_meta_batch_size=4))
    write_marker, complete_before_marker = checkpoints.write_marker, []

    def look_then_mark(folder, *args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            complete_before_marker.append(last_complete_checkpoint(tmp_path))
        write_marker(folder, *args)

    monkeypatch.setattr(checkpoints, "write_marker", look_then_mark)
    trainer.train()
    # Until the new checkpoint is marked, the previous one is there, complete; then it goes.
    assert complete_before_marker == [None, str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert checkpoint_problem(tmp_path / "checkpoint-6") is None
    saved = torch.load(tmp_path / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert saved.save_total_limit == 1  # the args on disk are the run's, not the ones used during the save


@pytest.mark.parametrize("mode", ["meta", "transfer"])
def test_resuming_the_final_checkpoint_trains_no_extra_step(tmp_path, mode):
    """transformers 5.24 resumed at max_steps takes one more step (plain Trainer too); MLRSTrainer/MLRSCallback not."""
    full = build(mode, str(tmp_path))
    full.train()
    expected = outcome(full)
    state_before = (tmp_path / "checkpoint-12" / "trainer_state.json").read_text()
    resumed = build(mode, str(tmp_path))
    result = resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-12"))
    assert result.global_step == resumed.state.global_step == STEPS
    lrs, net, model = outcome(resumed)
    assert lrs == expected[0] and len(lrs) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(net, expected[1]))
    assert all(torch.equal(a, b) for a, b in zip(model, expected[2]))
    assert (tmp_path / "checkpoint-12" / "trainer_state.json").read_text() == state_before  # not saved again


# ---- kill anywhere ------------------------------------------------------------------------------------------------

class KillCampaign:
    """Kill, restart, kill again, ... then let the run finish; count what happened."""

    def __init__(self, run, seed: int, mode: str, tmp_path: Path):
        self.run, self.rng, self.mode, self.tmp = run, random.Random(seed), mode, tmp_path
        self.kills, self.problems, self.sequences, self.exact = [], [], 0, 0

    def reference(self):
        code, result = self.run(self.mode, self.tmp / "reference", "none")
        assert code == 0, f"the uninterrupted run failed ({code})"
        return result

    def sequence(self, expected, max_kills: int, first_in_save: bool):
        """A run killed up to max_kills times at random moments after its resume point, then finished."""
        self.sequences += 1
        out = self.tmp / f"run{self.sequences}"
        all_moments = kill_worker.moments(self.mode, STEPS, SAVE_EVERY)
        for k in range(max_kills):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resume = last_complete_checkpoint(out)
            resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0
            reachable = [m for m in all_moments if kill_worker.step_of(m) > resumed_step]
            in_save = [m for m in reachable if m.startswith("save")]
            moment = self.rng.choice(in_save if in_save and (k == 0 and first_in_save or self.rng.random() < 0.5)
                                     else reachable)
            code, _ = self.run(self.mode, out, moment)
            if code != -9:
                self.problems.append(f"{self.mode} {out.name} kill at {moment}: exit code {code}, not killed")
                return
            self.kills.append((self.mode, moment, resumed_step))
            if moment == "end":
                break
        code, result = self.run(self.mode, out, "none")
        if code != 0:
            self.problems.append(f"{self.mode} {out.name}: the restarted run crashed (exit code {code})")
            return
        mismatch = compare(result, expected)
        if mismatch:
            self.problems.append(f"{self.mode} {out.name} after kills {self.kills}: {mismatch}")
        else:
            self.exact += 1


def compare(result, expected) -> str | None:
    if len(result) != len(expected):
        return f"{len(result)} processes, {len(expected)} expected"
    for rank, (got, want) in enumerate(zip(result, expected)):
        if got["steps"] != want["steps"] or got["lrs"] != want["lrs"]:
            return f"rank {rank}: {got['steps']} steps and lrs {got['lrs']}, expected {want['lrs']}"
        for part in ("net", "model"):
            if not all(torch.equal(a, b) for a, b in zip(got[part], want[part])):
                return f"rank {rank}: the {part} differs"
    if len(set(expected[0]["lrs"])) <= 3:
        return "the lr hardly moved: equal lrs would say little"
    return None


def summary(campaigns) -> dict:
    kills = [k for c in campaigns for k in c.kills]
    return {"kills": len(kills), "mid_save_kills": sum(m.startswith("save") for _, m, _ in kills),
            "kills_of_runs_started_from_scratch": sum(r == 0 for _, _, r in kills),
            "resumed_runs": sum(c.sequences for c in campaigns), "exact": sum(c.exact for c in campaigns),
            "problems": [p for c in campaigns for p in c.problems],
            "moments": [f"{mode} {m} (resumed from step {r})" for mode, m, r in kills]}


@pytest.fixture
def forked_run(tmp_path):
    """Runs kill_worker.run in a child forked from a server that imported everything once (a fresh interpreter per
    run would spend ~12 s of this 2-core machine importing torch and transformers, the run itself ~1 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.scripts.kill_worker"])
    logs = tmp_path / "logs"
    logs.mkdir()

    def run(mode, out, moment):
        number = len(list(logs.iterdir()))
        result = tmp_path / f"result-{number}.pt"
        log = logs / f"{number:03d}-{mode}-{out.name}-{moment.replace(':', '_')}.log"
        child = context.Process(target=kill_worker.run, args=(mode, str(out), moment, str(result), str(log)))
        child.start()
        child.join(timeout=300)
        if child.is_alive():
            child.kill()
            child.join()
        if child.exitcode not in (0, -9):
            print(log.read_text()[-3000:])
        return child.exitcode, (torch.load(result, weights_only=False) if child.exitcode == 0 else None)

    return run


def test_kill_anywhere_resumes_exactly(tmp_path, forked_run):
    """Default: 2 kills per mode, the first inside a save. Full: >= 24 kills across the modes."""
    campaigns = []
    for seed, mode in enumerate(("meta", "meta_ga2", "transfer")):
        campaign = KillCampaign(forked_run, seed, mode, tmp_path / mode)
        expected = campaign.reference()
        for _ in range(3 if FULL else 1):
            campaign.sequence(expected, max_kills=3 if FULL else 2, first_in_save=not FULL)
        campaigns.append(campaign)
    counts = summary(campaigns)
    print("kill-anywhere:", json.dumps(counts, indent=1))
    assert not counts["problems"], counts["problems"]
    assert counts["exact"] == counts["resumed_runs"]
    assert counts["kills"] >= (20 if FULL else 6) and counts["mid_save_kills"] >= (5 if FULL else 3)


def launched_run(tmp_path):
    """kill_worker.py as 2 processes under accelerate launch (gloo)."""

    def run(mode, out, moment):
        result = tmp_path / f"result-{out.name}-{moment.replace(':', '_')}.pt"
        launch = launch_two_processes(ROOT / "tests" / "scripts" / "kill_worker.py", mode, str(out), moment,
                                      str(result))
        code = launch.returncode
        if code not in (0, -9):
            print(launch.stdout[-2000:], launch.stderr[-3000:])
        return code, (torch.load(result, weights_only=False) if code == 0 else None)

    return run


def test_kill_anywhere_two_processes(tmp_path):
    """Both processes and the launcher die at once (a preempted node), once inside a save (full: 3 kills)."""
    campaign = KillCampaign(launched_run(tmp_path), 7, "meta", tmp_path)
    expected = campaign.reference()
    assert len(expected) == 2 and expected[0]["lrs"] == expected[1]["lrs"]
    campaign.sequence(expected, max_kills=3 if FULL else 1, first_in_save=True)
    counts = summary([campaign])
    print("kill-anywhere, 2 processes:", json.dumps(counts, indent=1))
    assert not counts["problems"], counts["problems"]
    assert counts["exact"] == 1 and counts["mid_save_kills"] >= 1


def test_two_processes_resume_mid_epoch_with_the_meta_share_sampler(tmp_path):
    """A learned gamma draws the training order with the held-out share's sampler. Killed after step 9 and resumed
    from checkpoint-8, in the middle of epoch 1 (7 steps per epoch), 2 processes must finish exactly as a run never
    killed: the resumed epoch's order is that epoch's, although its loader skips batches."""
    run = launched_run(tmp_path)
    code, expected = run("learned", tmp_path / "reference", "none")
    assert code == 0
    code, _ = run("learned", tmp_path / "killed", "step:9")
    assert code == -9
    code, resumed = run("learned", tmp_path / "killed", "none")
    assert code == 0 and len(resumed) == len(expected) == 2
    for got, want in zip(resumed, expected):
        assert got["lrs"] == want["lrs"] and got["steps"] == want["steps"] == STEPS
        assert all(torch.equal(a, b) for a, b in zip(got["net"], want["net"]))
        assert all(torch.equal(a, b) for a, b in zip(got["model"], want["model"]))
