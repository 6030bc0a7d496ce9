"""Every recipe end to end with a tiny model and --max_steps 2, in-process; one under a real 2-process launch."""

import importlib.util
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from hf_mlrs import MLRSNet
from tests.test_distributed import launch_two_processes


ROOT = Path(__file__).resolve().parents[1]


def recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run(name, argv):
    module = recipe(name)
    with mock.patch.object(sys, "argv", [f"recipes/{name}.py", *argv]):  # what provenance records as the command
        return module.main(*module.make_parser().parse_args_into_dataclasses(args=argv))


def assert_nothing_local(folder, *local):
    """A saved schedule's card and config name no folder of this machine and link to no made-up repository."""
    for name in ("README.md", "config.json"):
        text = (folder / name).read_text()
        assert "github.com" not in text, name
        for path in (*map(str, local), os.getcwd(), sys.prefix):
            assert path not in text, (name, path)


FAST = ["--max_steps", "2", "--disable_tqdm", "true", "--max_eval_examples", "32"]


@pytest.mark.parametrize("task", ["bbc", "digits"])
def test_meta_train_recipe(tmp_path, task):
    metrics = run("meta_train", ["--task", task, "--model", "tiny", "--output_dir", str(tmp_path), *FAST,
                                 "--max_train_examples", "200"])
    assert metrics["world_size"] == 1 and 0 <= metrics["eval_accuracy"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == task
    schedule = MLRSNet.from_pretrained(tmp_path / "schedule")
    assert schedule.provenance["task"] == f"{task}/tiny" and schedule.provenance["steps"] == 2
    assert not os.path.isabs(schedule.provenance["model"])  # no path of this machine in a shareable card
    assert schedule.provenance["command"].endswith(f"--output_dir {tmp_path.name} " + " ".join(FAST) +
                                                   " --max_train_examples 200")
    assert_nothing_local(tmp_path / "schedule", tmp_path)
    assert (tmp_path / "schedule" / "lr_curve.png").stat().st_size > 1000


def test_transfer_recipe(tmp_path):
    MLRSNet(stage_starts=[0.0, 0.5]).save_pretrained(tmp_path / "schedule", write_card=False)
    results = run("transfer", ["--schedule", str(tmp_path / "schedule"), "--task", "digits", "--model", "tiny",
                               "--output_dir", str(tmp_path / "out"), "--logging_steps", "1", *FAST])
    assert set(results) == {"mlrs", "linear"}
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert summary["mlrs"]["lr"] != summary["linear"]["lr"]  # the callback really drove the lr
    assert (tmp_path / "out" / "comparison.png").exists()


def test_meta_train_recipe_under_two_processes(tmp_path):
    result = launch_two_processes(ROOT / "recipes" / "meta_train.py", "--task", "digits", "--model", "tiny",
                                  "--output_dir", str(tmp_path), *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["world_size"] == 2
    assert_nothing_local(tmp_path / "schedule", tmp_path)


def test_meta_train_multitask_recipe(tmp_path):
    schedule, records = run("meta_train_multitask", [
        "--pairs", "digits:tiny:3,lm:tiny:3", "--rounds", "2", "--output_dir", str(tmp_path), "--logging_steps", "1",
        "--max_train_examples", "200", "--max_eval_examples", "32", "--per_device_eval_batch_size", "32",
        "--mlrs_meta_batch_size", "8"])
    assert [(r["task"], r["steps"]) for r in records] == [("digits", 3), ("lm", 3)] * 2
    loaded = MLRSNet.from_pretrained(tmp_path / "schedule")
    assert loaded.provenance["task"] == "digits/tiny, lm/tiny" and loaded.provenance["steps"] == 12
    assert set(loaded.provenance["learned_shapes"]) == {"digits/tiny", "lm/tiny"}
    # the LM's loss (ln 256 at chance) and the digits' (ln 10) live on different scales; both feed the net ~1
    scales = {r["task"]: r["loss_scale"] for r in records}
    assert scales["lm"] > 2 * scales["digits"]
    card = (tmp_path / "schedule" / "README.md").read_text()
    assert "## Episodes" in card and "| 3 | lm/tiny | 3 |" in card
    assert_nothing_local(tmp_path / "schedule", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        run("meta_train_multitask", ["--pairs", "cifar:resnet-small", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--pairs is empty"):
        run("meta_train_multitask", ["--pairs", " ", "--output_dir", str(tmp_path / "x")])


def test_provenance_command_names_no_absolute_path(tmp_path, monkeypatch):
    shareable = recipe("meta_train").shareable
    monkeypatch.chdir(tmp_path)
    assert shareable(str(tmp_path / "outputs" / "x")) == os.path.join("outputs", "x")  # inside: relative
    assert shareable("/elsewhere/runs/x") == "x" and shareable("--output_dir=/elsewhere/x") == "--output_dir=x"
    assert shareable("outputs/x") == "outputs/x" and shareable("3e-3") == "3e-3"


def test_recipes_help_does_not_crash(capsys):
    for name in ("meta_train", "transfer", "meta_train_multitask"):
        with pytest.raises(SystemExit) as exit_info:
            recipe(name).make_parser().parse_args_into_dataclasses(args=["--help"])
        assert exit_info.value.code == 0
    assert "--mlrs_meta_interval" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
