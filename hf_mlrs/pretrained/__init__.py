"""Schedules shipped inside hf_mlrs, loadable offline by short name: `MLRSNet.from_pretrained("<name>")`.

Each is a folder written by `MLRSNet.save_pretrained`; its README.md (model card) gives the recipe command that
regenerates it.
"""

from __future__ import annotations

from pathlib import Path


HERE = Path(__file__).parent


def available() -> list[str]:
    """Short names of the shipped schedules."""
    return sorted(p.name for p in HERE.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path | None:
    """The folder of shipped schedule `name`, or None."""
    folder = HERE / name
    return folder if "/" not in name and (folder / "config.json").is_file() else None


def name_of(folder: str | Path) -> str | None:
    """The short name shipped folder `folder` loads by, or None for any other folder."""
    folder = Path(folder).resolve()
    return folder.name if folder.parent == HERE.resolve() else None
