"""Loading and pushing schedules: local folders, schedules shipped with hf_mlrs, the Hub, and the paper's files.

Every loader builds a fresh net and returns it only once every file has been read and checked, so a bad file
never leaves a half-loaded schedule behind; every error names the file or repository and what to do.

This module does not import `modeling.py` (which imports it): loaders receive the class to build, `cls`, and read
the config keys it accepts from `cls.CONFIG_KEYS`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import pretrained


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VERSION_KEY = "hf_mlrs_version"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The paper's released state dicts (meta-test/mlr_snet <epoch>.pth) -> our module names.
OFFICIAL_KEYS = {
    "layer1.fc_i2h.0": "input_branch.0",
    "layer1.fc_i2h.2": "input_branch.2",
    "layer1.fc_h2h.0": "hidden_branch.0",
    "layer1.fc_h2h.2": "hidden_branch.2",
    "layer3": "head",
}


def resolve_files(name_or_path: str | Path, **hub_kwargs) -> tuple[Path, Path, str]:
    """(config path, weights path, description) for a local folder, a shipped name or a Hub repo id."""
    source = str(name_or_path)
    folder = Path(source) if os.path.isdir(source) else pretrained.path(source)
    if folder is not None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"Schedule folder '{folder}' has no {name}. A saved schedule holds {WEIGHTS_NAME} and "
                    f"{CONFIG_NAME}, as written by MLRSNet.save_pretrained."
                )
        return folder / CONFIG_NAME, folder / WEIGHTS_NAME, f"folder '{folder}'"
    if not REPO_ID.match(source):
        raise FileNotFoundError(f"No schedule folder at '{source}' (and it is not a Hub repo id or shipped name "
                                f"{pretrained.available()}).")
    files = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            files.append(Path(hf_hub_download(repo_id=source, filename=name, **hub_kwargs)))
        except RepositoryNotFoundError as err:
            raise FileNotFoundError(
                f"Hub repo '{source}' was not found (or is private: pass token=...). Shipped schedules: "
                f"{pretrained.available()}."
            ) from err
        except RevisionNotFoundError as err:
            raise FileNotFoundError(f"Hub repo '{source}' has no revision {hub_kwargs.get('revision')!r}.") from err
        except EntryNotFoundError as err:
            raise FileNotFoundError(f"Hub repo '{source}' has no {name}: it holds no hf_mlrs schedule.") from err
        except (OSError, HTTPError) as err:
            raise OSError(f"Could not download {name} of Hub repo '{source}': {err}") from err
    return files[0], files[1], f"Hub repo '{source}'"


def read_config(path: Path, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The constructor arguments in config.json: exactly `keys` (those in `optional` may be missing: a schedule
    saved before they existed), once the hf_mlrs version is dropped."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{CONFIG_NAME} of {where} is not valid JSON ({err}); re-save the schedule.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_NAME} of {where} is not a JSON object.")
    config.pop(VERSION_KEY, None)
    missing = sorted(set(keys) - set(config) - set(optional))
    unknown = sorted(set(config) - set(keys))
    if missing or unknown:
        raise ValueError(
            f"{CONFIG_NAME} of {where} does not describe an MLRSNet: "
            + (f"missing keys {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown keys {unknown}" if unknown else "")
            + f". Expected exactly {sorted(keys)} (plus {VERSION_KEY}); it may come from another library "
            "or a newer hf_mlrs."
        )
    return config


def load_schedule(cls, name_or_path: str | Path, **hub_kwargs):
    """Build an MLRSNet from a folder, shipped name or Hub repo, strictly: every tensor present, nothing extra."""
    config_path, weights_path, where = resolve_files(name_or_path, **hub_kwargs)
    config = read_config(config_path, where, cls.CONFIG_KEYS, cls.OPTIONAL_CONFIG_KEYS)
    try:
        net = cls(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{CONFIG_NAME} of {where} has an invalid value: {err}") from err
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{WEIGHTS_NAME} of {where} is truncated or corrupted ({err}); save or download it again."
        ) from err
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{WEIGHTS_NAME} of {where} does not match its {CONFIG_NAME}: {err}") from err
    return net.eval()


def push_schedule(net, repo_id: str, *, config: dict, token: str | None = None, private: bool | None = None,
                  commit_message: str = "Upload MLR-SNet schedule (hf_mlrs)", revision: str | None = None) -> str:
    """Push weights, config, card and plot in one commit; the local files are never touched."""
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "schedule"
        net.save_pretrained(folder, config=config, repo_id=repo_id)
        try:
            repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                       revision=revision)
        except (OSError, HTTPError) as err:
            raise OSError(
                f"Push of the schedule to Hub repo '{repo_id}' failed: {err}. Nothing local was changed; "
                "save it with save_pretrained(...) and retry the push later."
            ) from err
    return str(commit)


def load_official(cls, paths: str | Path | list[str | Path]):
    """One stage per released `mlr_snet <epoch>.pth` file, applied over equal shares of training."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    states = []
    for path in paths:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Official MLR-SNet checkpoint '{path}' does not exist.") from err
        except Exception as err:  # unpickling errors come in many types; all mean the same thing here
            raise ValueError(f"'{path}' is not a readable PyTorch state dict ({err}).") from err
        states.append(_map_official(raw, path))
    hidden_size = states[0]["hidden_branch.0.weight"].shape[1]
    net = cls(
        hidden_size=hidden_size,
        input_normalization="raw",
        stage_starts=[k / len(states) for k in range(len(states))],
        provenance={"source": "official MLR-SNet release", "files": [Path(p).name for p in paths]},
    )
    for stage, state in zip(net.stages, states):
        try:
            stage.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"Official checkpoint does not fit an MLRSNet of hidden size {hidden_size}: {err}") \
                from err
    return net.eval()


def _map_official(raw: dict, path) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"'{path}' holds a {type(raw).__name__}, not a state dict.")
    mapped = {}
    for key, value in raw.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in OFFICIAL_KEYS:
            raise ValueError(
                f"'{path}' has key '{key}', which the official MLR-SNet layout (keys {sorted(OFFICIAL_KEYS)}) lacks."
            )
        mapped[f"{OFFICIAL_KEYS[prefix]}.{leaf}"] = value
    return mapped
