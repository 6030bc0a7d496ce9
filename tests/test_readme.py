"""The README's code runs as written, and it names exactly the public API."""

import re
from pathlib import Path

import hf_mlrs
from tests.testing_utils import tiny_bert, tiny_dataset


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 3
    assert all(len(block.strip().splitlines()) <= 12 for block in blocks)
    namespace = {"model": tiny_bert(), "train": tiny_dataset(n=96), "test": tiny_dataset(n=32, seed=1)}
    exec(blocks[0], namespace)  # quick start: the shipped default frozen, its lr scale learned, no lr given
    trainer = namespace["trainer"]
    assert trainer.schedule.provenance["zoo_entry"] == "multitask-default" and not trainer.meta_training
    assert not any(p.requires_grad for p in trainer.schedule.parameters())
    scale = trainer.lr_scheduler.scale  # the scale was learned: calibrated to the model, then meta-updated
    assert scale.calibrated and scale.num_updates > 0 and scale.gamma != trainer.args.learning_rate
    namespace["model"] = tiny_bert(seed=1)
    exec(blocks[1], namespace)  # meta-train, then save
    assert (tmp_path / "my-schedule" / "model.safetensors").exists()
    namespace["model"] = tiny_bert(seed=1)
    exec(blocks[2], namespace)  # transfer with MLRSCallback
    trainer = namespace["trainer"]
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, hf_mlrs.MLRSCallback))
    assert callback.scheduler.num_observed == trainer.state.global_step > 0
    assert 0 < trainer.optimizer.param_groups[0]["lr"] <= 2e-4  # gamma = args.learning_rate bounds the lr


def test_readme_names_exactly_the_public_api():
    section = README.split("## API", 1)[1].split("\n## ", 1)[0]
    # MLRS* names are claims even if wrong; other names count when hf_mlrs has them (not `hf_mlrs`, `LRScheduler`).
    named = {name for name in re.findall(r"`(\w+)`", section)
             if name.startswith("MLRS") or name == "__version__" or hasattr(hf_mlrs, name)}
    assert named == set(hf_mlrs.__all__)
