"""The benchmark scripts run end to end in their smoke modes (the full runs are not tests)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_smoke():
    summary = load("overhead").main(["--smoke"])
    arms = {r["arm"] for r in summary["rows"]}
    assert set(load("overhead").ARMS) <= arms and {"callback_learned", "frozen_learned_half"} <= arms
    assert all(r["step_s"] > 0 for r in summary["rows"] if "step_s" in r)


def test_overhead_worker_ends_with_its_parent(tmp_path):
    """A killed overhead.py must not leave its timing worker running: the worker watches its parent."""
    pid_file = tmp_path / "worker.pid"
    child = (f"import importlib.util, os, time; spec = importlib.util.spec_from_file_location('o', "
             f"{str(ROOT / 'benchmarks' / 'overhead.py')!r}); o = importlib.util.module_from_spec(spec); "
             f"spec.loader.exec_module(o); o.exit_with_parent(0.05); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    def alive(pid):
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


def test_quality_smoke(tmp_path):
    summary = load("quality").main(["--smoke", "--out", str(tmp_path)])
    arms = set(summary["digits"]["arms"])
    assert {"default:linear", "tuned:linear", "schedule_free", "prodigy", "mlrs_meta", "mlrs_transfer",
            "mlrs_transfer_tuned"} <= arms
    table = (tmp_path / "quality_cpu_smoke.md").read_text()
    assert table.count("| mlrs_") >= 3
    # --report trains nothing and rewrites the same tables from the runs it is given
    report = tmp_path / "report"
    again = load("quality").main(["--smoke", "--report", "--reuse", str(tmp_path / "quality_cpu_smoke.json"),
                                  "--out", str(report)])
    assert json.loads(json.dumps(again, default=str)) == json.loads(json.dumps(summary, default=str))
    runs = lambda folder: json.loads((folder / "quality_cpu_smoke.json").read_text())["runs"]  # noqa: E731
    assert runs(report) == runs(tmp_path)  # the same runs, timings included: none was trained again
    body = lambda text: text.split("Command:")[1].split("\n", 1)[1]  # noqa: E731 (the command line differs)
    assert body((report / "quality_cpu_smoke.md").read_text()) == body(table)


def test_quality_sgd_runs_every_arm_with_sgd_and_its_own_starting_lrs(tmp_path):
    quality = load("quality")
    summary = quality.main(["--smoke", "--optimizer", "sgd", "--arms",
                            "tuned,mlrs_learned:default,mlrs_frozen:default,mlrs_callback:default", "--out",
                            str(tmp_path)])
    runs = json.loads((tmp_path / "quality_cpu_sgd_smoke.json").read_text())["runs"]
    assert runs and {r["optimizer"] for r in runs} == {"SGD"}
    for family in ("mlrs_learned", "mlrs_frozen", "mlrs_callback"):
        assert {r["lr"] for r in runs if r["arm"].startswith(family)} == set(quality.SGD_LEARNED_LRS[:2])
        assert f"{family}:default" in summary["digits"]["learned"]
    assert {r["lr"] for r in runs if r["arm"].startswith("grid:")} == set(quality.SGD_GRID[:2])
    frozen = [r for r in runs if r["arm"].startswith(("mlrs_frozen", "mlrs_callback"))]
    assert all(r["gammas"][-1][1] != r["lr"] for r in frozen)  # its scale is learned, not the starting lr
    with pytest.raises(SystemExit):  # AdamW-only arms are refused, not silently run with AdamW
        quality.main(["--smoke", "--optimizer", "sgd", "--arms", "prodigy", "--out", str(tmp_path)])


def test_frozen_arm_applies_the_defaults_held_out_variant_and_names_the_command_that_makes_it(tmp_path, monkeypatch):
    quality = load("quality")
    import zoo  # recipes/zoo.py, on the path quality.py set

    from hf_mlrs import MLRSNet

    monkeypatch.setattr(zoo, "pool_dir", lambda name, count, kind: tmp_path / f"{name}-{kind}{count}" / "schedule")
    monkeypatch.setattr(quality, "HELD_OUT_NETS", tmp_path / "committed")
    with pytest.raises(FileNotFoundError, match=r"python recipes/zoo.py --entry multitask-without-fashion --select 3"):
        quality.frozen_source("fashion", "default")
    MLRSNet(hidden_size=4).save_pretrained(tmp_path / "multitask-without-fashion-select3" / "schedule")
    assert quality.frozen_source("fashion", "default").hidden_size == 4  # the variant that never saw fashion
    MLRSNet(hidden_size=6).save_pretrained(tmp_path / "committed" / "multitask-without-fashion")
    assert quality.frozen_source("fashion", "default").hidden_size == 6  # its committed copy comes first
    with pytest.raises(ValueError, match="held out. or mlrs_frozen:shipped"):
        quality.frozen_source("fashion", "text-bbc")


def test_replay_steps_through_the_given_lrs_and_the_overrides_reach_the_arguments():
    """replay_lab.py's replay arm applies exactly the sequence it is given (logged lr == applied lr), and overrides
    replace training arguments, the Trainer's and the MLRS ones alike."""
    import types

    quality = load("quality")
    options = types.SimpleNamespace(smoke=True, device="cpu")
    replay = quality.run_one("digits", "replay", 1e-3, 0, options, lr_sequence=[3e-3, 7e-4])
    assert replay["lrs"] == [[1, 3e-3], [2, 7e-4]]
    assert quality.run_one("digits", "replay", 1e-3, 0, options, lr_sequence=[3e-3, 7e-4],
                           overrides={"logging_steps": 2})["lrs"] == [[2, 7e-4]]
    learned = quality.run_one("digits", "mlrs_learned:default", 1e-3, 0, options,
                              overrides={"mlrs_scale_min": 1e-9, "mlrs_scale_max": 1e-7})
    lrs = load("replay_lab").applied_lrs(learned, learned["steps"])
    assert len(lrs) == 2 and all(0 < lr <= 1e-7 for lr in lrs)  # the learned scale kept inside the given bounds


def test_fsdp_gpu_script_plans_its_launches_without_a_gpu(capsys):
    summary = load("fsdp_gpu").main(["--print-commands", "--num_processes", "2"])
    labels = [label for label, _ in summary["commands"]]
    assert labels == ["reference", "fsdp", "resumed", "time_plain", "time_meta_1", "time_meta_10"]
    fsdp = dict(summary["commands"])["fsdp"]
    assert "fsdp.yaml" in " ".join(fsdp) and fsdp[fsdp.index("--num_processes") + 1] == "2"


def test_transfer_smoke_measures_every_arm_fills_the_card_and_plans_without_schedules(tmp_path, capsys):
    from hf_mlrs import MLRSNet
    from hf_mlrs.cli import summary_line

    result = load("transfer").main(["--smoke", "--out", str(tmp_path), "--write-cards"])
    (row,) = result["rows"]
    assert [c.get("budget") for c in row["cells"]] == [None, 1 / 3, 3]
    assert set(row["cells"][0]["arms"]) == {"builtin:linear", "builtin:constant", "zoo", "learned"}
    assert row["cells"][0]["relation"] == "held-out task, cross-modality"  # learned on text, applied to images
    assert set(result["targets"]) >= {"ahead of the tuned constant on every cell", "worst learned-scale gap"}
    assert "| target | met |" in (tmp_path / "transfer_cpu_smoke.md").read_text()
    card = MLRSNet.from_pretrained(tmp_path / "smoke_schedule")
    assert "| smoke | digits/tiny |" in card.provenance["transfer"]["table"]
    assert "| smoke | digits/tiny |" in (tmp_path / "smoke_schedule" / "README.md").read_text()
    assert "transfer: held-out tasks: worst gap" in summary_line("smoke", card.provenance)
    capsys.readouterr()
    load("transfer").main(["--plan", "--entries", "text-bbc,image-fashion", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "image-fashion (image-fashion): bbc/minilm-L2 [held-out task, cross-modality]" in out
    assert "bbc/minilm-L6 [held-out size]" in out
    assert not (tmp_path / "transfer_cpu.log").exists()  # a plan trains nothing and leaves the results' log alone
    again = load("transfer").main(["--smoke", "--out", str(tmp_path)])  # results accumulate: nothing is rerun
    assert "score=" not in capsys.readouterr().out  # the same schedule (same weights): its runs are reused
    assert [c.get("budget") for c in again["rows"][0]["cells"]] == [None, 1 / 3, 3]
    assert again["rows"][0]["cells"][0]["arms"] == row["cells"][0]["arms"]
    load("transfer").main(["--smoke", "--out", str(tmp_path), "--remeasure", "learned", "--no-budgets"])
    rerun = [line for line in capsys.readouterr().out.splitlines() if "score=" in line]
    assert rerun and all(" learned:" in line for line in rerun)  # only the learned arm, once per run
    assert len(rerun) == len(set(rerun))


def test_transfer_averages_a_cell_over_meta_training_draws_and_names_the_missing_ones(tmp_path, monkeypatch):
    transfer = load("transfer")

    def cell(zoo, learned, lr, label):  # accuracy scores; the built-ins are the same runs for every draw
        return {"task": "digits", "model": "tiny", "steps": 2, "label": label, "best_builtin": "builtin:linear",
                "arms": {"builtin:linear": {"lr": 1e-3, "score": 0.9}, "builtin:constant": {"lr": 1e-3, "score": 0.8},
                         "zoo": {"lr": lr, "score": zoo}, "learned": {"lr": None, "score": learned,
                                                                      "gamma_end": [lr]}}}

    merged = transfer.over_draws([cell(0.85, 0.88, 1e-2, "a@1"), cell(0.91, 0.86, 3e-3, "a-draw1@2")])
    gaps = transfer.gaps(merged)
    assert merged["arms"]["zoo"] == {"lr": [1e-2, 3e-3], "score": pytest.approx(0.88)}
    assert gaps["zoo"] == pytest.approx(2.0) and gaps["learned"] == pytest.approx(3.0)
    assert gaps["zoo_vs_constant"] == pytest.approx(-8.0)
    assert [d["gaps"]["zoo"] for d in merged["draws"]] == [pytest.approx(5.0), pytest.approx(-1.0)]
    line = transfer.row_line("multitask-default", {**merged, "relation": "held-out task", "gaps": gaps,
                                                   "schedule": "multitask-without-digits"})
    assert "(as multitask-without-digits), 2 draws |" in line
    assert "(lr 0.01, 0.003) | +2.00 [+5.00, -1.00] |" in line
    assert transfer.over_draws([cell(0.85, 0.88, 1e-2, "a@1")])["arms"]["zoo"]["lr"] == 1e-2  # one draw: unchanged
    monkeypatch.setattr(importlib.import_module("zoo"), "ROOT", tmp_path)  # no draw built under this root
    with pytest.raises(FileNotFoundError, match="python recipes/zoo.py --entry multitask-without-bbc --draw 2"):
        transfer.draw_folders("multitask-without-bbc", tmp_path, 3)
    with pytest.raises(ValueError, match="not a zoo entry"):
        transfer.draw_folders("smoke", tmp_path, 2)


def test_transfer_draws_of_the_default_needs_only_the_variants_whose_cells_are_asked_for(tmp_path, monkeypatch):
    transfer = load("transfer")
    monkeypatch.setattr(importlib.import_module("zoo"), "ROOT", tmp_path)  # no draw built under this root
    with pytest.raises(FileNotFoundError) as missing:
        transfer.main(["--entries", "multitask-default", "--draws", "3", "--cells", "lm/gpt2-small", "--plan",
                       "--out", str(tmp_path)])
    assert "--entry multitask-without-lm --draw 1" in str(missing.value)
    assert "without-bbc" not in str(missing.value)  # the other variants' draws are not needed for the LM's cell


def test_transfer_measures_a_pooled_variant_on_its_own_held_out_task_and_names_a_missing_pool(tmp_path, monkeypatch):
    transfer = load("transfer")
    zoo = importlib.import_module("zoo")
    monkeypatch.setattr(zoo, "ROOT", tmp_path)  # no pool built under this root
    with pytest.raises(FileNotFoundError, match="python recipes/zoo.py --entry multitask-without-lm --pool 3"):
        transfer.pooled(transfer.entries_to_measure(["multitask-default"], as_shipped=False), 3)
    with pytest.raises(FileNotFoundError, match="1 pooled schedule"):  # only the variants whose cells are asked for
        transfer.main(["--entries", "multitask-default", "--pool", "3", "--cells", "lm/gpt2-small", "--plan",
                       "--out", str(tmp_path)])
    for task in ("bbc", "digits", "fashion", "lm"):  # built: each variant's pool replaces it, under its row
        (zoo.pool_dir(f"multitask-without-{task}", 3)).mkdir(parents=True)
        (zoo.pool_dir(f"multitask-without-{task}", 3) / "config.json").write_text("{}")
    rows = transfer.pooled(transfer.entries_to_measure(["multitask-default"], as_shipped=False), 3)
    assert rows[3] == ("multitask-default", "multitask-without-lm-pool3", zoo.pool_dir("multitask-without-lm", 3))
    from hf_mlrs import MLRSNet

    net = MLRSNet(provenance={"pairs": ["bbc/minilm-L2", "digits/resnet-small", "fashion/resnet-small"]})
    cells = transfer.cells_of("multitask-default", "multitask-without-lm-pool3", net, False)
    assert cells and {task for task, _, _ in cells} == {"lm"}  # its held-out task only, at every size
    with pytest.raises(SystemExit):
        transfer.main(["--entries", "multitask-default", "--pool", "3", "--write-cards", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="python recipes/zoo.py --entry multitask-without-lm --select 3"):
        transfer.pooled(transfer.entries_to_measure(["multitask-default"], as_shipped=False), 3, "select")
    assert transfer.held_out_task("multitask-without-lm-select3") == "lm"
    # A default shipped as a selection is measured through variants selected the same way, without --select
    monkeypatch.setitem(zoo.ZOO, "multitask-default", dict(zoo.ZOO["multitask-default"], select=3))
    assert transfer.entries_to_measure(["multitask-default"])[3] == (
        "multitask-default", "multitask-without-lm-select3", zoo.pool_dir("multitask-without-lm", 3, "select"))
    with pytest.raises(FileNotFoundError, match=r"--entry multitask-without-lm --select 3$"):  # --select 3 on it:
        transfer.pooled(transfer.entries_to_measure(["multitask-default"]), 3, "select")  # the same, not twice


def test_horizon_probe_measures_consistent_slopes():
    """The probe's two slopes are the derivatives at the two ends of the window's line: the trapezoid rule with them,
    (s0 + s1) / 2, matches the loss change L(w_t) - L(w_{t-k}) far better than either end alone (a swapped end, a
    wrong sign or a stale snapshot makes it no better than one end)."""
    probe = load("horizon_probe")
    result = probe.run("digits", 1e-2, model="tiny", max_steps=24, every=8)
    windows = [(p, p[str(k)]) for p in result["probes"] for k in (1, 4) if str(k) in p]
    assert len(windows) >= 4
    for p, w in windows:
        change = p["meta_loss"] - w["loss_start"]
        one_end = min(abs(change - w["s0"]), abs(change - w["s1"]))
        assert abs(change - (w["s0"] + w["s1"]) / 2) <= 0.35 * one_end, (p["step"], change, w)
    assert probe.summarise(result)  # the summary lines render


def test_zoo_shapes_tells_a_net_that_reads_the_loss_from_one_that_does_not_and_writes_the_card(tmp_path):
    """A net whose input weights are zero cannot react to the loss; one with a strong input weight must; the
    reaction is measured from the probes, so swapping or ignoring a probe curve fails one of the two."""
    import torch

    from hf_mlrs import MLRSNet

    shapes = load("zoo_shapes")
    torch.manual_seed(0)
    inert, reactive = MLRSNet(stage_starts=[0, 0.5]), MLRSNet(stage_starts=[0, 0.5])
    with torch.no_grad():
        for stage in inert.stages:
            stage.input_branch[0].weight.zero_()
        for stage in reactive.stages:
            stage.input_branch[0].weight.fill_(3.0)
            stage.input_branch[2].weight.mul_(30.0)
    inert.save_pretrained(tmp_path / "inert")
    reactive.save_pretrained(tmp_path / "reactive")
    results = shapes.main(["--schedules", f"{tmp_path / 'inert'},{tmp_path / 'reactive'}", "--steps", "40",
                           "--out", str(tmp_path), "--write-cards"])
    assert "barely reacts to the loss" in shapes.describe(results[str(tmp_path / "inert")])
    assert "It reacts to the loss" in shapes.describe(results[str(tmp_path / "reactive")])
    card = (tmp_path / "reactive" / "README.md").read_text()
    assert "## What it learned" in card and "| applied |" in card
    assert (tmp_path / "zoo_shapes.png").exists()


def test_transfer_shapes_reads_each_draws_lr_from_its_tuned_run():
    transfer = load("transfer")
    lrs = [[1, 0.5], [3, 0.5], [6, 0.25], [9, 0.05], [12, 0.05]]  # logged lrs of a 12-step run at gamma 1.0
    run = {"task": "digits", "model": "tiny", "steps": 12, "arm": "zoo:a-draw1@2", "lr": 1.0, "seed": 0, "lrs": lrs}
    other = {**run, "lr": 0.1, "lrs": [[s, 9.0] for s, _ in lrs]}  # the same net at a gamma not chosen
    cell = {"task": "digits", "model": "tiny", "steps": 12, "label": None, "gaps": {"zoo": 1.5},
            "draws": [{"label": "a-draw1@2", "zoo": {"lr": 1.0}, "gaps": {"zoo": -0.5}}]}
    table = transfer.applied_shapes({"rows": [{"row": "a", "cells": [cell]}], "runs": [other, run]})
    assert table.splitlines()[-1] == "| a | digits/tiny | a-draw1@2 | 0.5, 0.25, 0.05 | 1 | -0.50 |"


def test_selection_scores_each_candidate_at_the_tuned_start_of_its_shape(tmp_path):
    """recipes/zoo.py --select's scorer, on tiny models: each candidate runs at the ladder values around the best
    tuned built-in's peak lr divided by the candidate's first-stage output, and its gap is to that built-in's seed-0
    score, in the benchmark's units (accuracy points here)."""
    import torch

    from hf_mlrs import MLRSNet

    sys.path.insert(0, str(ROOT / "benchmarks"))
    transfer = importlib.import_module("transfer")  # the module recipes/zoo.py --select imports
    assert transfer.ladder_around(3.3e-3) == pytest.approx([3e-3, 1e-2])
    assert transfer.ladder_around(1e-3) == pytest.approx([1e-3])
    assert transfer.ladder_around(2e-5) == pytest.approx([1e-5, 3e-5])
    torch.manual_seed(0)
    MLRSNet(stage_starts=[0, 1 / 3, 2 / 3]).save_pretrained(tmp_path / "net")
    candidates = [{"run": "a", "folder": tmp_path / "net", "outputs": [1.0, 0.5, 0.1]},
                  {"run": "b", "folder": tmp_path / "net", "outputs": [0.01, 0.01, 0.01]}]
    lines = []
    scores = transfer.selection_scores(candidates, ["digits"], None, smoke=True, log=lines.append)
    runs = {}
    for line in lines:  # "<task>/<model> steps=N <arm> lr=X seed=S score=Y (Ts)"
        parts = line.split()
        runs[(parts[2], float(parts[3][3:]))] = float(parts[5][6:])
    builtins = {key: score for key, score in runs.items() if key[0].startswith("builtin:")}
    (best_arm, best_lr), best = max(builtins.items(), key=lambda kv: kv[1])
    for candidate, scored in zip(candidates, scores):
        tried = {lr: s for (arm, lr), s in runs.items() if arm == f"zoo:{candidate['run']}"}
        assert sorted(tried) == pytest.approx(transfer.ladder_around(best_lr / candidate["outputs"][0]))
        chosen = next(s for lr, s in tried.items() if lr == pytest.approx(scored["gamma"]["digits"], rel=1e-5))
        assert chosen == max(tried.values())  # the better of its two gammas
        assert scored["gaps"]["digits"] == pytest.approx((best - chosen) * 100, abs=0.011)  # log: 4 decimals
        assert scored["mean_gap"] == scored["gaps"]["digits"]


def test_transfer_cooldown_applies_the_anneal_to_the_tuned_gamma_arm_in_its_own_results(tmp_path):
    """--cooldown F: the zoo arm runs with MLRSCallback(cooldown_fraction=F) under its own run label (never matched
    with runs without it), and the shipped results cannot be overwritten by it."""
    transfer = load("transfer")
    result = transfer.main(["--smoke", "--out", str(tmp_path), "--no-budgets", "--cooldown", "0.5"])
    (cell,) = result["rows"][0]["cells"]
    assert cell["label"].endswith("+cooldown0.5")
    runs = json.loads((tmp_path / "transfer_cpu_smoke.json").read_text())["runs"]
    zoo_runs = [r for r in runs if r["arm"].startswith("zoo:")]
    assert zoo_runs and all(r["arm"].endswith("+cooldown0.5") for r in zoo_runs)
    learned = [r for r in runs if r["arm"].startswith("learned:")]  # its own cooldown: the label without --cooldown's
    assert learned and not any("+cooldown" in r["arm"] for r in learned)
    for r in zoo_runs:  # 2 steps, cooldown of 1: the last step at half the net's lr, below the first step's
        lrs = [lr for _, lr in r["lrs"]]
        assert lrs[-1] < lrs[0]
    shipped = transfer.HERE / "results"
    before = sorted((p, p.stat().st_mtime_ns) for p in shipped.rglob("*"))
    with pytest.raises(SystemExit):
        transfer.main(["--smoke", "--cooldown", "0.5"])  # the default --out: refused, before anything is written
    assert sorted((p, p.stat().st_mtime_ns) for p in shipped.rglob("*")) == before


def test_transfer_reuses_no_lm_run_and_measures_the_lm_on_more_seeds(tmp_path):
    """The LM at its tuned lr is chaotic (a seed moves by up to 2% between environments): its built-ins are rerun next
    to the schedule on 10 seeds, never taken from quality.py's results; an accuracy cell reproduces and is reused."""
    transfer = load("transfer")
    run = {"model": None, "steps": 5, "lr": 1e-3, "seed": 0}
    results = tmp_path / "quality.json"
    results.write_text(json.dumps({"runs": [{**run, "task": "bbc", "arm": "tuned:constant"},
                                            {**run, "task": "lm", "arm": "tuned:constant"}]}))
    runs = transfer.Runs(type("Options", (), {"smoke": False})(), log=print)
    runs.reuse(str(results))
    assert {key[0] for key in runs.done} == {"bbc"}
    assert transfer.SEEDS_OF_CELL.get(("lm", "gpt2-small"), transfer.SEEDS) == 10
    assert transfer.SEEDS_OF_CELL.get(("bbc", "minilm-L2"), transfer.SEEDS) == 3
