"""MLRSNet: the LSTM that reads the training loss and outputs the learning rate.

Shu, Zhu, Zhao, Xu, Meng, "MLR-SNet: Transferable LR Schedules for Heterogeneous Tasks", IEEE TPAMI 2022
(arXiv:2007.14546). The cell is the one of the paper's released checkpoints:

    z_t   = B_in(x_t) + B_h(h_{t-1})            B(.) = Linear -> ReLU -> Linear  (width hidden_size // 2)
    i, f, g, o = split(z_t, 4)                  standard PyTorch gate order
    c_t   = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t   = sigmoid(o) * tanh(c_t)
    A_t   = sigmoid(W h_t + b)                  in (0, 1); the learning rate is gamma * A_t

11,776 parameters at hidden size 50. Nothing here needs transformers: the net works in any torch loop. Reading and
writing files is delegated to `hub.py` (loading, pushing) and `card.py` (model card, lr plot), which never import
this module, so the dependency runs one way: modeling -> hub, card.

A saved schedule may carry several *stages*: snapshots of the net taken during meta-training, applied over
consecutive parts of a new run (the paper's epoch-1/100/200 nets over the first, middle and last third).
Stage `k` starts at the fraction `stage_starts[k]` of training; `stage_switch_losses[k]` is the (normalised)
training loss the meta-training run had when stage `k` began, used by the horizon-free "loss" mode.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .card import PAPER_URL, write_card_and_plot
from .hub import CONFIG_NAME, VERSION_KEY, load_official, load_schedule, push_schedule


INPUT_NORMALIZATIONS = ("raw", "log_num_labels", "initial_loss")

State = tuple[torch.Tensor, torch.Tensor]


class MLRSNetCell(nn.Module):
    """One LSTM cell with ReLU-MLP pre-processing of the input and of the hidden state, plus the sigmoid head."""

    def __init__(self, hidden_size: int, output_bias_init: float):
        super().__init__()
        width = hidden_size // 2
        self.hidden_size = hidden_size
        self.input_branch = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, 4 * hidden_size))
        self.hidden_branch = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 4 * hidden_size))
        self.head = nn.Linear(hidden_size, 1)
        # The official code draws the branch weights from U(-0.1, 0.1); biases keep PyTorch's default.
        for branch in (self.input_branch, self.hidden_branch):
            for layer in branch:
                if isinstance(layer, nn.Linear):
                    nn.init.uniform_(layer.weight, -0.1, 0.1)
        # The released runs started near sigmoid(1) = 0.73: the output bias sets where the schedule starts.
        nn.init.constant_(self.head.bias, output_bias_init)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h, c = state
        i, f, g, o = (self.input_branch(x) + self.hidden_branch(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.sigmoid(self.head(h)), (h, c)


class MLRSNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf_mlrs",
    tags=["hf_mlrs", "mlr-snet", "learning-rate-schedule", "meta-learning"],
    paper_url=PAPER_URL,
    license="apache-2.0",
):
    """The MLR-SNet schedule network, with optional stage snapshots.

    Args:
        hidden_size (`int`, *optional*, defaults to `50`):
            LSTM hidden size H (paper: 50). The pre-processing MLPs are H // 2 wide.
        output_bias_init (`float`, *optional*, defaults to `1.0`):
            Initial bias of the sigmoid head: the schedule starts at about `gamma * sigmoid(output_bias_init)`.
        input_normalization (`str`, *optional*, defaults to `"initial_loss"`):
            What the net reads: `"raw"` (the training loss, as in the paper's image experiments),
            `"log_num_labels"` (loss / ln(num_labels), as the paper's language model: about 1 at chance level), or
            `"initial_loss"` (loss / the first step's loss: about 1 at the start of any task).
        stage_starts (`list[float]`, *optional*, defaults to `[0.0]`):
            Fraction of training at which each stage begins; one entry per stage, first entry 0.
        provenance (`dict`, *optional*):
            How the schedule was meta-trained (task, model, optimizer, steps, gamma rule, metrics); shown in the model
            card and by `hf-mlrs info`.
        cooldown_fraction (`float`, *optional*, defaults to `0.0`):
            The final linear cooldown the schedule is meant to be applied with, as a share of training: the default
            of `MLRSCallback(cooldown_fraction=...)` and of a frozen `MLRSTrainer(schedule=...)` run. A zoo entry
            records the one its transfer was measured with (benchmarks/RESULTS.md, section 8).
        start_output (`float`, *optional*, defaults to `1.0`):
            The net's output A_t at the start of the run it was learned from (a selected zoo entry: at the middle of
            its first stage). Applied frozen at the Trainer's `learning_rate`, the schedule's gamma is
            `learning_rate / start_output`, so `learning_rate` is the lr the schedule starts at: what a built-in
            schedule's lr is (its peak), tuned on the same grid. 1 keeps gamma = `learning_rate` (the lr never
            exceeds it). A shape that starts at 0.2 of gamma was otherwise capped at 0.2 x the grid's top
            (benchmarks/RESULTS.md, section 8, session 21).
    """

    # The constructor arguments, exactly what config.json holds (plus the hf_mlrs version); loading checks them.
    CONFIG_KEYS = ("hidden_size", "output_bias_init", "input_normalization", "stage_starts", "provenance",
                   "cooldown_fraction", "start_output")
    # Keys a schedule saved by an older hf_mlrs may lack: the constructor's default applies.
    OPTIONAL_CONFIG_KEYS = ("cooldown_fraction", "start_output")

    def __init__(
        self,
        hidden_size: int = 50,
        output_bias_init: float = 1.0,
        input_normalization: str = "initial_loss",
        stage_starts: list[float] | None = None,
        provenance: dict | None = None,
        cooldown_fraction: float = 0.0,
        start_output: float = 1.0,
    ):
        super().__init__()
        stage_starts = [0.0] if stage_starts is None else [float(s) for s in stage_starts]
        _validate_config(hidden_size, input_normalization, stage_starts)
        if not (isinstance(cooldown_fraction, (int, float)) and 0.0 <= cooldown_fraction < 1.0):
            raise ValueError(f"MLRSNet: cooldown_fraction must be a share of training in [0, 1), got "
                             f"{cooldown_fraction!r}; use e.g. 0.2 (the last 20% of the run) or 0 (none).")
        self.cooldown_fraction = float(cooldown_fraction)
        if not (isinstance(start_output, (int, float)) and 0.0 < start_output <= 1.0):
            raise ValueError(f"MLRSNet: start_output must be the net's first output A_t, in (0, 1], got "
                             f"{start_output!r}; use 1 to apply the schedule at gamma = learning_rate.")
        self.start_output = float(start_output)
        self.hidden_size = hidden_size
        self.output_bias_init = float(output_bias_init)
        self.input_normalization = input_normalization
        self.stage_starts = stage_starts
        self.provenance = dict(provenance or {})
        self.stages = nn.ModuleList(MLRSNetCell(hidden_size, output_bias_init) for _ in stage_starts)
        # Every stage starts as a copy of the same net: snapshots overwrite stages 0..n-2 during meta-training.
        for stage in self.stages[:-1]:
            stage.load_state_dict(self.stages[-1].state_dict())
        self.register_buffer("stage_switch_losses", torch.full((len(stage_starts),), float("nan")))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def config(self) -> dict:
        """The JSON-able constructor arguments: what `config.json` holds."""
        return {key: getattr(self, key) for key in self.CONFIG_KEYS}

    def gamma_for(self, learning_rate: float) -> float:
        """The lr scale gamma at which this schedule, applied frozen, starts at `learning_rate` (see `start_output`):
        the default gamma of MLRSCallback and of a frozen MLRSTrainer."""
        return learning_rate / self.start_output

    def init_state(self, device: torch.device | str | None = None) -> State:
        """The zero recurrent state (h_0, c_0) the paper starts from."""
        weight = self.stages[0].head.weight
        zeros = torch.zeros(1, self.hidden_size, device=device if device is not None else weight.device,
                            dtype=weight.dtype)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: State | None = None, stage: int = -1) -> tuple[torch.Tensor, State]:
        """One step of stage `stage` on the (normalised) loss `x`; returns (A_t in (0, 1), new state)."""
        weight = self.stages[0].head.weight
        x = torch.as_tensor(x, dtype=weight.dtype, device=weight.device).reshape(1, 1)
        return self.stages[stage](x, state if state is not None else self.init_state(x.device))

    # ---- saving and loading -----------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        write_card: bool = True,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        **push_kwargs,
    ) -> str | None:
        """Write `model.safetensors` and `config.json` (and with `write_card`, `README.md` and `lr_curve.png`).

        Files are first written to a temporary folder next to `save_directory` and then moved in one by one, so a
        failure (disk full, provenance that is not JSON) never leaves a half-written file or damages one saved
        before. With `push_to_hub=True` the schedule is then pushed to `repo_id` (default: the folder's name).
        """
        save_directory = Path(save_directory)
        save_directory.parent.mkdir(parents=True, exist_ok=True)
        config = {**(self.config() if config is None else config), VERSION_KEY: _version()}
        json.dumps(config)  # fail before touching anything if provenance is not JSON-able
        with tempfile.TemporaryDirectory(dir=save_directory.parent, prefix=f".{save_directory.name}.") as tmp:
            self._save_pretrained(Path(tmp))  # model.safetensors, from PyTorchModelHubMixin
            (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            if write_card:
                write_card_and_plot(self, Path(tmp), repo_id)
            save_directory.mkdir(exist_ok=True)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), save_directory / name)
        if push_to_hub:
            return self.push_to_hub(repo_id or save_directory.name, **push_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, config: dict | None = None, **kwargs) -> str:
        """Push weights, config, model card and lr plot to `repo_id` on the Hub (one commit)."""
        return push_schedule(self, repo_id, config=self.config() if config is None else config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> MLRSNet:
        """Load a schedule from a local folder, a Hub repo id, or a schedule shipped with hf_mlrs (see
        `hf_mlrs.pretrained`). Loading is strict: a missing, unexpected or mis-shaped tensor is an error."""
        return load_schedule(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_official_checkpoint(cls, path: str | Path | list[str | Path]) -> MLRSNet:
        """Load the paper's released `mlr_snet <epoch>.pth` file(s).

        One path gives a one-stage net; several paths (e.g. the epoch 1, 100 and 200 files) give one stage each,
        applied over equal parts of training as the official meta-test does. The official nets read the raw loss.
        """
        return load_official(cls, path)


def _version() -> str:
    from . import __version__

    return __version__


def _validate_config(hidden_size: int, input_normalization: str, stage_starts: list[float]) -> None:
    if not isinstance(hidden_size, int) or hidden_size < 2:
        raise ValueError(f"MLRSNet: hidden_size must be an integer >= 2, got {hidden_size!r}.")
    if input_normalization not in INPUT_NORMALIZATIONS:
        raise ValueError(
            f"MLRSNet: input_normalization={input_normalization!r} is not one of {INPUT_NORMALIZATIONS}."
        )
    if not stage_starts or stage_starts[0] != 0.0:
        raise ValueError(f"MLRSNet: stage_starts must begin with 0.0, got {stage_starts!r}.")
    if any(not (0.0 <= b < 1.0) or not math.isfinite(b) for b in stage_starts) or stage_starts != sorted(
        set(stage_starts)
    ):
        raise ValueError(f"MLRSNet: stage_starts must be increasing fractions in [0, 1), got {stage_starts!r}.")
