"""MLRSNet: the paper's cell, its state, saving, strict loading, and the official checkpoint layout."""

import json
import math
import os
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from hf_mlrs import MLRSNet, MLRSScheduler


class OfficialCell(nn.Module):
    """An independent re-implementation of the released checkpoints' net, with their key names (mlrsnet.md s.1)."""

    def __init__(self, hidden=50):
        super().__init__()
        self.layer1 = nn.Module()
        self.layer1.fc_i2h = nn.Sequential(nn.Linear(1, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 4 * hidden))
        self.layer1.fc_h2h = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                           nn.Linear(hidden // 2, 4 * hidden))
        self.layer3 = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, x, h, c):
        gates = self.layer1.fc_i2h(x) + self.layer1.fc_h2h(h)
        n = self.hidden
        i, f, g, o = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:3 * n], gates[:, 3 * n:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.sigmoid(self.layer3(h)), h, c


def test_parameter_count_matches_the_paper():
    assert sum(p.numel() for p in MLRSNet().stages[0].parameters()) == 11_776


def test_output_in_unit_interval_and_state_carries():
    net = MLRSNet(output_bias_init=1.0)
    out, state = net(torch.tensor([[2.3]]))
    assert 0 < out.item() < 1 and abs(out.item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.1
    out2, state2 = net(torch.tensor([[2.3]]), state)
    assert not torch.equal(state[1], state2[1])  # c_t depends on c_{t-1}


@pytest.mark.parametrize("num_files", [1, 3])
def test_official_checkpoint_loads_and_matches_an_independent_cell(tmp_path, num_files):
    torch.manual_seed(0)
    cells, paths = [OfficialCell() for _ in range(num_files)], []
    for k, cell in enumerate(cells):
        paths.append(tmp_path / f"mlr_snet {[1, 100, 200][k]}.pth")
        torch.save(cell.state_dict(), paths[-1])
    net = MLRSNet.from_official_checkpoint(paths if num_files > 1 else paths[0])
    assert net.num_stages == num_files and net.input_normalization == "raw"
    assert net.stage_starts == [k / num_files for k in range(num_files)]
    losses = [2.3, 1.9, 1.2, 0.8, 0.4, 0.05, 0.001, 4.6]
    for k, cell in enumerate(cells):
        h = c = torch.zeros(1, 50)
        state = None
        for loss in losses:
            x = torch.tensor([[loss]])
            expected, h, c = cell(x, h, c)
            got, state = net(x, state, stage=k)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_official_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MLRSNet.from_official_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"layer1.fc_x2y.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="fc_x2y"):
        MLRSNet.from_official_checkpoint(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        MLRSNet.from_official_checkpoint(tmp_path / "junk.pth")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = MLRSNet(hidden_size=8, stage_starts=[0.0, 0.4], provenance={"task": "x", "steps": 3},
                  cooldown_fraction=0.2, start_output=0.25)
    net.stage_switch_losses[1] = 0.5
    net.save_pretrained(tmp_path / "s")
    loaded = MLRSNet.from_pretrained(tmp_path / "s")
    assert loaded.config() == net.config()
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["hf_mlrs_version"]
    assert "Over the last 20% of training the lr anneals" in (tmp_path / "s" / "README.md").read_text()


def test_saved_card_links_only_to_what_exists_and_names_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = MLRSNet(hidden_size=8, provenance={"task": "x", "model": "org/model"})
    net.save_pretrained(tmp_path / "s", repo_id="me/schedule")
    card = (tmp_path / "s" / "README.md").read_text()
    assert "https://arxiv.org/abs/2007.14546" in card and 'from_pretrained("me/schedule")' in card
    assert re.findall(r"https?://[^\s)\]]+", card) == ["https://arxiv.org/abs/2007.14546"]  # no other link
    for local in (str(tmp_path), os.getcwd(), sys.prefix):  # the folder saved to, the working dir, the venv
        assert local not in card
    net.save_pretrained(tmp_path / "t")  # not pushed: a placeholder, not the folder's path
    assert 'from_pretrained("path/to/this/folder")' in (tmp_path / "t" / "README.md").read_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 1}, "hidden_size"),
        ({"input_normalization": "zscore"}, "input_normalization"),
        ({"stage_starts": [0.5]}, "stage_starts must begin with 0.0"),
        ({"stage_starts": [0.0, 0.6, 0.3]}, "increasing"),
        ({"stage_starts": [0.0, 1.0]}, "increasing fractions"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLRSNet(**kwargs)


# ---- bad files: one clear error naming the file, nothing half-loaded --------------------------------------------


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    MLRSNet(hidden_size=8).save_pretrained(tmp_path / "s", write_card=False)
    return tmp_path / "s"


def test_truncated_weights(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors of folder .* truncated or corrupted"):
        MLRSNet.from_pretrained(saved)


def test_corrupted_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        MLRSNet.from_pretrained(saved)


def test_mismatched_shapes(saved):
    state = load_file(saved / "model.safetensors")
    state["stages.0.head.weight"] = torch.zeros(1, 9)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match="(?s)does not match its config.json.*head.weight"):
        MLRSNet.from_pretrained(saved)


def test_missing_tensor(saved):
    state = load_file(saved / "model.safetensors")
    del state["stages.0.head.bias"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ValueError, match="(?s)Missing key.*head.bias"):
        MLRSNet.from_pretrained(saved)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("hidden_size"), r"missing keys \['hidden_size'\]"),
    (lambda c: c.update(colour="blue"), r"unknown keys \['colour'\]"),
    (lambda c: c.update(hidden_size=-3), "invalid value"),
    (lambda c: c.update(cooldown_fraction=1.0), "(?s)invalid value.*cooldown_fraction must be a share"),
    (lambda c: c.update(start_output=0.0), r"(?s)invalid value.*start_output must be the net's first output"),
    (lambda c: c.update(start_output=1.5), r"(?s)invalid value.*start_output must be the net's first output"),
])
def test_bad_config(saved, edit, match):
    config = json.loads((saved / "config.json").read_text())
    edit(config)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        MLRSNet.from_pretrained(saved)


def test_a_schedule_saved_before_the_optional_keys_existed_loads_with_their_defaults(saved):
    """cooldown_fraction and start_output are the optional keys: configs written by hf_mlrs <= 0.1 (on the Hub too)
    still load, with no cooldown and gamma = learning_rate."""
    config = json.loads((saved / "config.json").read_text())
    config.update(cooldown_fraction=0.3, start_output=0.4)
    (saved / "config.json").write_text(json.dumps(config))
    loaded = MLRSNet.from_pretrained(saved)
    assert (loaded.cooldown_fraction, loaded.start_output) == (0.3, 0.4)
    del config["cooldown_fraction"], config["start_output"]
    (saved / "config.json").write_text(json.dumps(config))
    loaded = MLRSNet.from_pretrained(saved)
    assert (loaded.cooldown_fraction, loaded.start_output) == (0.0, 1.0)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{hidden_size: 8")
    with pytest.raises(ValueError, match="config.json of folder .* not valid JSON"):
        MLRSNet.from_pretrained(saved)


def test_missing_files(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        MLRSNet.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="No schedule folder"):
        MLRSNet.from_pretrained(str(tmp_path / "nowhere" / "deeper" / "x"))


def test_failed_save_keeps_the_previous_schedule(saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    net = MLRSNet(hidden_size=8, provenance={"not json": object()})
    with pytest.raises(TypeError):
        net.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".s.")]  # no temporary folder left behind


# ---- property: any input gives a finite lr within the bounds -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(loss=st.floats(allow_nan=True, allow_infinity=True, width=32),
       bounds=st.tuples(st.floats(0, 1e-2), st.floats(0, 1e-2)).map(sorted))
def test_any_loss_gives_a_finite_lr_within_bounds(loss, bounds):
    low, high = bounds
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = MLRSScheduler(optimizer, MLRSNet(), gamma=3e-3, min_lr=low, max_lr=high)
    before = {k: v.clone() for k, v in scheduler.schedule.state_dict().items()}
    for value in (1.0, loss, loss):  # a finite first step, then the tested value twice
        lr = scheduler.observe(value)
        assert math.isfinite(lr) and low <= lr <= high
        assert optimizer.param_groups[0]["lr"] == lr == scheduler.get_last_lr()[0]
    for key, value in scheduler.schedule.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


def test_shipped_schedules_load_offline_by_short_name():
    from hf_mlrs import pretrained

    names = pretrained.available()
    assert {"text-bbc", "image-fashion", "lm-bytes", "multitask-default"} <= set(names)  # the zoo
    assert not {"minilm2-bbc", "resnet-small-digits"} & set(names)  # v0.1's two, behind the zoo: removed
    for name in names:
        net = MLRSNet.from_pretrained(name)
        assert net.num_stages == 3 and net.provenance["steps"] > 0
        assert net.provenance["mode"] in ("meta-training", "multi-task meta-training")  # zoo entries: the latter
        assert net.provenance["command"].startswith(("accelerate launch recipes/meta_train.py",
                                                     f"python recipes/zoo.py --entry {name}"))
        card = (pretrained.path(name) / "README.md").read_text()
        assert "library_name: hf_mlrs" in card and net.provenance["command"] in card
        assert f'from_pretrained("{name}")' in card and "github.com" not in card
        assert not any(os.path.isabs(str(v)) for v in net.provenance.values())  # e.g. the model: a name, no path
