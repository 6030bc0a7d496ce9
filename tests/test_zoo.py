"""The schedule zoo (recipes/zoo.py): entries are well-formed and long enough, one builds end to end in smoke mode."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from hf_mlrs import MLRSNet
from tests.test_recipes import assert_nothing_local, recipe


zoo = recipe("zoo")
TODAY_STEPS = 192  # the longest meta-training run of v0.1's text schedule (minilm2-bbc, no longer shipped), the
# length every zoo entry has to reach 20 times over


def test_entries_are_valid_long_and_cover_text_image_lm_and_multitask():
    parse_pairs = recipe("meta_train_multitask").parse_pairs
    for name, spec in zoo.ZOO.items():
        pairs = parse_pairs(",".join(spec["pairs"]))  # known tasks and models, steps and gamma given
        assert all(steps and gamma for _, _, steps, gamma in pairs), name
        total = spec["rounds"] * sum(steps for _, _, steps, _ in pairs)
        assert total >= 20 * TODAY_STEPS, (name, total)
        assert spec["summary"] and isinstance(spec["seed"], int)
    shipped = {name: {p.split(":")[0] for p in spec["pairs"]} for name, spec in zoo.ZOO.items() if spec["ship"]}
    assert {"bbc"} in shipped.values() and {"lm"} in shipped.values()
    assert {"fashion"} in shipped.values() or {"digits"} in shipped.values()
    assert shipped["multitask-default"] == {"bbc", "digits", "fashion", "lm"}
    for task in ("bbc", "digits", "fashion", "lm"):  # leave-one-task-out variants, not shipped
        variant = zoo.ZOO[f"multitask-without-{task}"]
        assert not variant["ship"] and not any(p.startswith(task + ":") for p in variant["pairs"])
    assert str(zoo.schedule_dir("text-bbc")).endswith("hf_mlrs/pretrained/text-bbc")


def test_smoke_build_writes_a_card_with_provenance_and_a_transfer_placeholder_and_resumes(tmp_path):
    schedule, records = zoo.main(["--entry", "text-bbc", "--smoke", "--output_dir", str(tmp_path)])
    folder = tmp_path / "schedule"
    loaded = MLRSNet.from_pretrained(folder)
    provenance = loaded.provenance
    assert provenance["zoo_entry"] == "text-bbc" and provenance["command"] == "python recipes/zoo.py --entry " \
        "text-bbc --smoke"
    assert provenance["learned_on"].startswith("bbc/minilm-L2; 1 round(s), 4,000 steps")
    assert provenance["steps"] == 3 and provenance["hf_mlrs_version"] and loaded.num_stages == 3
    # what a bit-for-bit rebuild also depends on, as this process ran it
    assert provenance["environment"]["torch"] == torch.__version__
    assert provenance["environment"]["threads"] == torch.get_num_threads()
    assert provenance["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    card = (folder / "README.md").read_text()
    assert "## Transfer" in card and "Not measured yet" in card and "--entries text-bbc --write-cards" in card
    assert (folder / "lr_curve.png").stat().st_size > 1000
    assert_nothing_local(folder, tmp_path)
    # The same command again finds the episode done: nothing is retrained, the same net comes out.
    again, records_again = zoo.main(["--entry", "text-bbc", "--smoke", "--output_dir", str(tmp_path)])
    assert json.dumps(records_again) == json.dumps(records)
    assert all((a == b).all() for a, b in zip(schedule.state_dict().values(), again.state_dict().values())
               if not a.isnan().any())


def test_the_same_command_meta_trains_the_same_net(tmp_path):
    # The initial net of a multi-task run was drawn from whatever the global RNG held (session 12): two runs of one
    # command gave two nets. Draw something in between, as any earlier code in the process would.
    import torch

    first, _ = zoo.main(["--entry", "multitask-without-bbc", "--smoke", "--output_dir", str(tmp_path / "a")])
    torch.rand(7)
    second, _ = zoo.main(["--entry", "multitask-without-bbc", "--smoke", "--output_dir", str(tmp_path / "b")])
    assert first.state_dict().keys() == second.state_dict().keys()
    for name, a in first.state_dict().items():
        assert torch.allclose(a, second.state_dict()[name], rtol=0, atol=0, equal_nan=True), name  # bit for bit


def test_another_draw_is_another_seed_its_own_folder_and_command(tmp_path):
    import torch

    first, _ = zoo.main(["--entry", "multitask-without-bbc", "--smoke", "--output_dir", str(tmp_path / "a")])
    drawn, _ = zoo.main(["--entry", "multitask-without-bbc", "--smoke", "--draw", "1",
                         "--output_dir", str(tmp_path / "b")])
    assert drawn.provenance["draw"] == 1 and "draw" not in first.provenance
    assert drawn.provenance["command"] == "python recipes/zoo.py --entry multitask-without-bbc --draw 1 --smoke"
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), drawn.state_dict().values()))
    assert str(zoo.schedule_dir("text-bbc", 2)).endswith("outputs/zoo/text-bbc-draw2/schedule")  # never the package


def test_bad_entries_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--draw -1"):
        zoo.main(["--entry", "text-bbc", "--draw", "-1"])
    with pytest.raises(ValueError, match="Unknown zoo entry 'txt'"):
        zoo.main(["--entry", "txt"])
    with pytest.raises(ValueError, match="--smoke needs --output_dir"):
        zoo.build("text-bbc", None, smoke=True)


def test_pool_meta_trains_the_draws_it_lacks_first(tmp_path, monkeypatch):
    built = []

    def build(name, output_dir=None, smoke=False, draw=0):
        built.append((name, draw))

    monkeypatch.setattr(zoo, "ROOT", tmp_path)  # only draw 0 built under this root (nothing else in its folder)
    (tmp_path / "outputs" / "zoo" / "multitask-without-lm").mkdir(parents=True)
    (tmp_path / "outputs" / "zoo" / "multitask-without-lm" / "episodes.json").write_text("[]")
    monkeypatch.setattr(zoo, "build", build)
    with pytest.raises(OSError):  # the stand-in built nothing to pool
        zoo.main(["--entry", "multitask-without-lm", "--pool", "3"])
    assert built == [("multitask-without-lm", 1), ("multitask-without-lm", 2)]


@pytest.fixture(scope="module")
def smoke_draws(tmp_path_factory):
    """Two smoke draws of multitask-without-bbc (one round of digits, fashion and lm runs each) and their nets."""
    root = tmp_path_factory.mktemp("draws")
    dirs = [root / "draw0", root / "draw1"]
    own = [zoo.main(["--entry", "multitask-without-bbc", "--smoke", "--output_dir", str(d)] + (["--draw", "1"] if k
                    else []))[0] for k, d in enumerate(dirs)]
    return dirs, own


def test_pooled_draws_choose_each_stage_over_all_their_last_rounds(tmp_path, smoke_draws):
    import torch
    from safetensors.torch import load_file

    from hf_mlrs.multitask import MIDPOINTS_DIR, pool_draws

    dirs, own = smoke_draws
    # One draw pooled alone is that draw's own stages: the pool is the single run's rule, over more runs.
    alone = MLRSNet.from_pretrained(dirs[1] / "schedule")
    assert len(pool_draws(alone, [dirs[1]], ["draw1"], rounds=1)[1]) == 3
    for name, a in alone.state_dict().items():  # bit for bit (the unused switch losses are NaN)
        assert torch.allclose(a, own[1].state_dict()[name], rtol=0, atol=0, equal_nan=True), name
    pooled = zoo.pool("multitask-without-bbc", 2, output_dirs=dirs, target=tmp_path / "pooled", smoke=True)
    loaded = MLRSNet.from_pretrained(tmp_path / "pooled")
    assert loaded.provenance["pooled_draws"] == 2
    assert loaded.provenance["command"] == "python recipes/zoo.py --entry multitask-without-bbc --pool 2"
    midpoints = {f"{d.name}/{e.name}": e / MIDPOINTS_DIR for d in dirs for e in sorted(d.glob("episode-*"))}
    runs = loaded.provenance["pooled_runs"]  # each output's run, with the task it was meta-training on
    assert [r.split(" ")[0] for r in runs] == [n.replace("draw0", "multitask-without-bbc").replace(
        "draw1", "multitask-without-bbc-draw1") for n in midpoints]
    assert {r.split(" ")[1].split("/")[0] for r in runs} == {"digits", "fashion", "lm"}
    for k, record in enumerate(loaded.provenance["stage_midpoints"]):
        outputs = {name: json.loads((f / f"stage-{k}.json").read_text())["output"] for name, f in midpoints.items()}
        assert sorted(record["outputs"]) == sorted(round(o, 4) for o in outputs.values())  # every run of both draws
        median = sorted(outputs, key=outputs.get)[(len(outputs) - 1) // 2]  # the lower middle of 6 runs
        chosen = load_file(str(midpoints[median] / f"stage-{k}.safetensors"))
        assert all(torch.equal(v, loaded.stages[k].state_dict()[n]) for n, v in chosen.items())
        assert record["chosen"].split(" ")[0] == median.replace("draw0", "multitask-without-bbc").replace(
            "draw1", "multitask-without-bbc-draw1")
    assert pooled.num_stages == 3 and len(midpoints) == 6
    with pytest.raises(FileNotFoundError, match="not meta-trained in"):
        zoo.pool("multitask-without-bbc", 2, output_dirs=[dirs[0], tmp_path / "nothing"], smoke=True)
    with pytest.raises(ValueError, match="one run"):
        zoo.main(["--entry", "text-bbc", "--pool", "2"])


def test_select_ships_the_whole_run_that_scores_best_on_the_entrys_own_tasks(tmp_path, smoke_draws, monkeypatch):
    """--select: every run of both draws is a candidate with all its stages from that run's midpoints (a coherent
    shape); the one with the smallest mean gap is written, bit for bit that run's nets, and its record names every
    candidate's score. The scorer is a stand-in here (the real one trains; tested in tests/test_benchmarks.py)."""
    import torch
    from safetensors.torch import load_file

    from hf_mlrs.multitask import MIDPOINTS_DIR

    sys.path.insert(0, str(zoo.ROOT / "benchmarks"))
    transfer = importlib.import_module("transfer")  # the module zoo.select imports
    dirs, _ = smoke_draws
    seen = {}

    def scores(candidates, tasks, reuse, smoke):
        seen.update(tasks=tasks, runs=[c["run"] for c in candidates])
        seen["cooldowns"], seen["starts"] = [], []
        for c in candidates:  # each candidate folder holds that run's stages, and its outputs are that run's
            net = MLRSNet.from_pretrained(c["folder"])
            assert net.provenance["stage_outputs"] == pytest.approx(c["outputs"], abs=1e-4)
            seen["cooldowns"].append(net.cooldown_fraction)  # scored as applied: without a cooldown unless asked
            seen["starts"].append(net.start_output)
        return [{"gaps": {t: float(i) for t in tasks}, "gamma": {}, "mean_gap": float((i * 7 + 2) % 5)}
                for i in range(len(candidates))]

    monkeypatch.setattr(transfer, "selection_scores", scores)
    net = zoo.select("multitask-without-bbc", 2, output_dirs=dirs, target=tmp_path / "sel" / "schedule", smoke=True)
    assert seen["tasks"] == ["digits", "fashion", "lm"] and len(seen["runs"]) == 6  # 3 runs per draw
    chosen = 4  # mean gaps 2, 4, 1, 3, 0, 2: the smallest
    episodes = [e for d in dirs for e in sorted(d.glob("episode-*"))]
    for k in range(net.num_stages):
        expected = load_file(str(episodes[chosen] / MIDPOINTS_DIR / f"stage-{k}.safetensors"))
        assert all(torch.equal(v, net.stages[k].state_dict()[n]) for n, v in expected.items())
    loaded = MLRSNet.from_pretrained(tmp_path / "sel" / "schedule")
    assert loaded.provenance["selected_run"] == seen["runs"][chosen]
    assert loaded.provenance["command"] == "python recipes/zoo.py --entry multitask-without-bbc --select 2"
    assert [s["mean_gap"] for s in loaded.provenance["selection"]] == [float((i * 7 + 2) % 5) for i in range(6)]
    assert "stage_midpoints" not in loaded.provenance
    assert loaded.cooldown_fraction == zoo.SELECTED_COOLDOWN == 0.2  # applied with the anneal it was measured with
    # it starts at the Trainer's learning_rate: its first-stage output in its own run is its start_output
    assert loaded.start_output == loaded.provenance["selection"][chosen]["outputs"][0] != 1.0
    assert seen["starts"] == [1.0] * 6  # candidates are scored at raw gammas (lr* / their first output)
    card = (tmp_path / "sel" / "schedule" / "README.md").read_text()  # every candidate in a table, the chosen in bold
    assert "| candidate run | A_t at its stage midpoints | digits | fashion | lm | mean gap |" in card
    assert f"| **{seen['runs'][chosen]}** |" in card and "| **+4.00** | **+4.00** | **+4.00** | **+0.00** |" in card
    assert sum(f"\n| {run} | " in card for run in seen["runs"]) == 5 and "| selection |" not in card
    assert seen["cooldowns"] == [0.0] * 6 and "scored_with_cooldown" not in loaded.provenance
    cooled = zoo.select("multitask-without-bbc", 2, output_dirs=dirs, target=tmp_path / "cooled" / "schedule",
                        smoke=True, score_cooldown=0.2)  # --score_cooldown: the candidates scored with it on
    assert seen["cooldowns"] == [0.2] * 6 and cooled.provenance["scored_with_cooldown"] == 0.2
    with pytest.raises(ValueError, match="--select 1: give at least 2 draws"):
        zoo.main(["--entry", "multitask-without-bbc", "--select", "1"])
    with pytest.raises(ValueError, match="one run"):
        zoo.main(["--entry", "lm-bytes", "--select", "2"])


def test_an_entry_shipped_as_a_selection_regenerates_from_its_one_command(monkeypatch):
    """An entry with `select=K`: `--entry NAME` selects over draws 0..K-1 into the package, with that command as
    its provenance, and its draw 0 (a candidate) meta-trains beside its episodes, never into the package."""
    monkeypatch.setitem(zoo.ZOO, "selected-entry", dict(zoo.ZOO["multitask-default"], select=3))
    calls = []
    monkeypatch.setattr(zoo, "select", lambda *a, **kw: calls.append((a, kw)))
    zoo.main(["--entry", "selected-entry"])
    assert calls == [(("selected-entry", 3), {"target": zoo.schedule_dir("selected-entry"),
                                               "command": "python recipes/zoo.py --entry selected-entry"})]
    assert str(zoo.schedule_dir("selected-entry")).endswith("hf_mlrs/pretrained/selected-entry")
    assert str(zoo.draw_schedule_dir("selected-entry")).endswith("outputs/zoo/selected-entry/schedule")
    assert zoo.draw_schedule_dir("multitask-without-bbc") == zoo.schedule_dir("multitask-without-bbc")
    assert all(not zoo.entry(f"multitask-without-{t}")["select"] for t in ("bbc", "digits", "fashion", "lm"))
    # The candidates scored on the way never land in the package (only shipped schedules live there).
    assert zoo.candidates_dir("selected-entry", 3, zoo.schedule_dir("selected-entry")) == \
        zoo.ROOT / "outputs" / "zoo" / "selected-entry-select3" / "candidates"
    assert zoo.candidates_dir("x", 3, Path("/tmp/sel/schedule")) == Path("/tmp/sel/candidates")
