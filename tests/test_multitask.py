"""Multi-task meta-training (MLRSMultiTaskTrainer): weights carry over, each episode starts its own recurrent state,
a restart mid-way continues exactly, stages come from the last round's midpoints, bad input is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_mlrs import MLRSMultiTaskTrainer, MLRSNet, MLRSTrainer
from hf_mlrs.multitask import DONE_NAME, MIDPOINTS_DIR, median_midpoints, plan_episodes, stage_midpoints
from tests.testing_utils import raise_at, tiny_args, tiny_bert, tiny_dataset


# Two "tasks" whose losses live on different scales: ln 3 and ln 5 at chance.
LABELS = {"three": 3, "five": 5}
PAIRS = [("three", "bert"), ("five", "bert")]


def make_episode(crash=None):
    def build(episode):
        spec = {"model": tiny_bert(LABELS[episode.task], seed=episode.seed),
                "train_dataset": tiny_dataset(160, LABELS[episode.task], seed=episode.seed)}
        if crash is not None and episode.index == crash[0]:
            spec["callbacks"] = [raise_at(crash[1])]
        return spec

    return build


def runner(output_dir, crash=None, rounds=2):
    torch.manual_seed(0)
    args = tiny_args(output_dir, max_steps=4, mlrs_meta_interval=2, mlrs_meta_lr=1e-2, save_strategy="steps",
                     save_steps=2, mlrs_meta_batch_size=8)
    return MLRSMultiTaskTrainer(MLRSNet(stage_starts=[0.0, 0.5]), PAIRS, make_episode(crash), args, rounds=rounds)


def carry(output_dir, index):
    return MLRSNet.from_pretrained(output_dir / f"episode-{index:04d}" / "carry")


def first_output(net):
    """A_0 of a run: the net's output on the first normalised loss (1.0) from the zero recurrent state."""
    with torch.no_grad():
        return float(net(torch.tensor([[1.0]]), None, stage=-1)[0])


def test_weights_and_meta_optimizer_carry_over_each_episode_learns_from_its_own_state_stages_are_snapshots(tmp_path):
    trainer = runner(tmp_path)
    net = trainer.train()
    assert [(r["task"], r["round"]) for r in trainer.records] == [("three", 0), ("five", 0), ("three", 1),
                                                                 ("five", 1)]
    nets = [runner(tmp_path).schedule] + [carry(tmp_path, k) for k in range(4)]
    for before, after, record in zip(nets, nets[1:], trainer.records):
        assert record["meta_updates"] == 2
        assert not torch.equal(before.stages[-1].head.weight, after.stages[-1].head.weight)  # it learned
        # The episode started from the previous episode's net, from the zero state (its own recurrent state).
        assert record["shape"][0][1] == pytest.approx(first_output(before), rel=1e-6)
    # Adam's moments carry over too: its step count runs on across episodes (2 meta-updates each).
    steps = [float(torch.load(tmp_path / f"episode-{k:04d}" / "carry" / "meta_optimizer.pt")["state"][0]["step"])
             for k in range(4)]
    assert steps == [2.0, 4.0, 6.0, 8.0]
    # Stages come from the last round: the live net at the middle of each stage's part of every run (steps 1 and 3 of
    # 4 for two halves), the one whose A_t there was the median over the round (the lower of two). Step 1 precedes
    # the run's first meta-update (step 2), so the stage-0 midpoint of an episode is the net it started from.
    assert stage_midpoints([0.0, 0.5], 4) == [1, 3] and stage_midpoints([0.0, 1 / 3, 2 / 3], 300) == [50, 150, 250]
    folders = {i: tmp_path / f"episode-{i:04d}" / MIDPOINTS_DIR for i in (2, 3)}
    assert not (tmp_path / "episode-0001" / MIDPOINTS_DIR).exists()  # the first round takes none
    assert torch.equal(load_file(str(folders[3] / "stage-0.safetensors"))["head.weight"],
                       nets[3].stages[-1].head.weight)
    for k, step in enumerate([1, 3]):
        records = {i: json.loads((folders[i] / f"stage-{k}.json").read_text()) for i in (2, 3)}
        for i in (2, 3):  # the recorded A_t is the one the run logged at that step
            logged = dict((round(f * 4), o) for f, o in trainer.records[i]["shape"])
            assert records[i] == {"step": step, "output": pytest.approx(logged[step], rel=1e-6)}
        lower = min((2, 3), key=lambda i: records[i]["output"])
        chosen = load_file(str(folders[lower] / f"stage-{k}.safetensors"))
        for name, value in net.stages[k].state_dict().items():
            assert torch.equal(value, chosen[name])
        assert net.provenance["stage_midpoints"][k]["chosen"] == f"episode-{lower:04d}"
    # Independently: step 1 runs the net the episode started from, from the zero state, on the input 1.0.
    stage0 = json.loads((folders[3] / "stage-0.json").read_text())["output"]
    assert stage0 == pytest.approx(first_output(nets[3]), rel=1e-6)
    assert net.provenance["stages_from"].startswith("the last round's 2 runs") and net.provenance["steps"] == 16
    assert net.provenance["pairs"] == ["five/bert", "three/bert"] and len(net.provenance["episode_records"]) == 4
    assert 0 < float(net.stage_switch_losses[1]) < 2  # the mean over the last round's episodes
    # Loss scales differ by task (ln 3 vs ln 5 at chance); the normalised input starts at 1 on both.
    scales = {r["task"]: r["loss_scale"] for r in trainer.records if r["round"] == 0}
    assert scales["five"] > scales["three"] * 1.2
    assert all(r["input_range"][1] == pytest.approx(1.0, abs=0.3) for r in trainer.records)
    # No checkpoint of a finished episode is left; every episode has its record.
    assert not list(tmp_path.glob("episode-*/checkpoint-*"))
    assert json.loads((tmp_path / "episode-0003" / DONE_NAME).read_text())["task"] == "five"
    # A run whose last round took no midpoints (an older hf_mlrs) is refused with the fix, not assembled wrongly.
    (tmp_path / "episode-0003" / MIDPOINTS_DIR / "stage-1.json").unlink()
    with pytest.raises(ValueError, match="Delete the last round's episode-NNNN folders and rerun"):
        runner(tmp_path).train()


def test_median_midpoints_picks_the_middle_net_by_its_output(tmp_path):
    from safetensors.torch import save_file

    folders = []
    for i, output in enumerate([0.2, 0.9, 0.5]):
        folder = tmp_path / f"episode-{i:04d}" / MIDPOINTS_DIR
        folder.mkdir(parents=True)
        save_file({"w": torch.full((2,), float(i))}, str(folder / "stage-0.safetensors"))
        (folder / "stage-0.json").write_text(json.dumps({"step": 5, "output": output}))
        folders.append(folder)
    stages, chosen = median_midpoints(folders, 1)
    assert torch.equal(stages[0]["w"], torch.full((2,), 2.0))
    assert chosen == [{"outputs": [0.2, 0.9, 0.5], "chosen": "episode-0002"}]
    assert median_midpoints(folders[:2], 1)[1][0]["chosen"] == "episode-0000"  # the lower of two


def test_a_plan_of_one_run_takes_the_papers_snapshots_inside_the_run(tmp_path):
    """One episode is the paper's regime: stage 0 is the net after the first meta-update, stage 1 the net at half of
    the run, the last stage the final net (with snapshots only between episodes, all three would be the final net)."""
    torch.manual_seed(0)
    initial = MLRSNet(stage_starts=[0.0, 1 / 3, 2 / 3])
    args = tiny_args(tmp_path, max_steps=8, mlrs_meta_interval=2, mlrs_meta_lr=1e-2, mlrs_meta_batch_size=8)
    start = initial.stages[-1].head.weight.clone()
    net = MLRSMultiTaskTrainer(initial, PAIRS[:1], make_episode(), args, rounds=1).train()
    heads = [stage.head.weight for stage in net.stages]
    assert not torch.equal(heads[0], start)  # taken after the first meta-update, not before
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    assert torch.equal(heads[2], carry(tmp_path, 0).stages[-1].head.weight)
    assert net.provenance["stages_from"] == "inside the run"
    # Stage 1 is the live net at half of the run: the same run stopped at step 4 ends with exactly that net.
    torch.manual_seed(0)
    half = MLRSMultiTaskTrainer(MLRSNet(stage_starts=[0.0, 1 / 3, 2 / 3]), PAIRS[:1], make_episode(),
                                tiny_args(tmp_path / "half", max_steps=4, mlrs_meta_interval=2, mlrs_meta_lr=1e-2,
                                          mlrs_meta_batch_size=8), rounds=1).train()
    assert torch.equal(heads[1], half.stages[-1].head.weight)


def test_episodes_with_a_learned_scale_meta_train_the_net_to_the_cooldown(tmp_path):
    """mlrs_scale_hold defaults to holding when a net is meta-trained (MLRSTrainer's no-lr path); an episode's job
    is the net, so it keeps meta-updating after the scale settles (hold off), unless its own args say otherwise."""
    holds = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            holds.append(lr_scheduler.meta_learner.hold)

    def build(episode):
        return {"model": tiny_bert(3, seed=episode.seed), "train_dataset": tiny_dataset(160, 3, seed=episode.seed),
                "callbacks": [Probe()], "args": {"mlrs_scale_hold": True} if episode.index == 1 else {}}

    args = tiny_args(tmp_path, max_steps=2, mlrs_gamma="learned", mlrs_meta_batch_size=8)
    MLRSMultiTaskTrainer(MLRSNet(stage_starts=[0.0, 0.5]), PAIRS, build, args).train()
    assert holds == [False, False, True, True]


@pytest.mark.parametrize("crash_step", [3, 4])
def test_restart_midway_through_the_episode_list_continues_exactly(tmp_path, crash_step):
    """Episode 2 (last round) dies after step 3 (before its step-3 midpoint is written) or step 4 (after it, before
    checkpoint-4): either way the resumed run keeps the step-1 midpoint, redoes step 3's, and ends bitwise equal."""
    reference = runner(tmp_path / "straight").train()
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner(tmp_path / "killed", crash=(2, crash_step)).train()
    assert (tmp_path / "killed" / "episode-0002" / "checkpoint-2").is_dir()
    written = (tmp_path / "killed" / "episode-0002" / MIDPOINTS_DIR / "stage-1.json").is_file()
    assert written == (crash_step == 4)
    restarted = runner(tmp_path / "killed")
    resumed = restarted.train()
    torch.testing.assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0, equal_nan=True)
    assert resumed.provenance["stage_midpoints"] == reference.provenance["stage_midpoints"]
    straight = runner(tmp_path / "straight")
    straight.train()  # everything done: reads the records back, trains nothing
    def same(records):  # JSON, so that NaN (no switch loss for stage 0) compares equal to NaN
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in records], sort_keys=True)

    assert same(restarted.records) == same(straight.records)


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no \\(task, model\\) pairs"):
        plan_episodes([], rounds=1)
    with pytest.raises(ValueError, match="rounds=0"):
        plan_episodes(PAIRS, rounds=0)
    args = tiny_args(tmp_path, max_steps=2)
    bad = MLRSMultiTaskTrainer(MLRSNet(), PAIRS, lambda e: {"model": tiny_bert(), "trainset": None}, args)
    with pytest.raises(ValueError, match="must return 'model' and 'train_dataset'"):
        bad.train()
    runner(tmp_path / "run", rounds=1).train()
    other = MLRSMultiTaskTrainer(MLRSNet(), list(reversed(PAIRS)), make_episode(), tiny_args(tmp_path / "run"))
    with pytest.raises(ValueError, match="Use a new output_dir"):
        other.train()
    with pytest.raises(ValueError, match="continue_meta_training=True needs the net"):
        MLRSTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), continue_meta_training=True)
    with pytest.raises(ValueError, match="only used with continue_meta_training"):
        MLRSTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), schedule=MLRSNet(),
                    meta_optimizer_state={})
