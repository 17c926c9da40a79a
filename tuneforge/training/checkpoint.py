"""Checkpoints: trainable tensors, optimizer, schedule, RNG states and data position.

Each checkpoint is a directory ``checkpoints/step-NNNNNNN`` written through ``atomic_dir``, so it
exists under its final name only once it is complete: a crash leaves the previous one intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuneforge.atomic import atomic_dir
from tuneforge.errors import UserError

PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
         progress: dict, keep: int) -> Path:
    path = Path(folder) / f"{PREFIX}{step:07d}"
    with atomic_dir(path) as tmp:
        save_file({name: p.detach().contiguous().cpu() for name, p in params.items()}, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}, indent=1))
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories start with a dot and are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "progress.json").is_file())


def load(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict:
    """Restore a checkpoint into ``params``, ``optimizer`` and ``scheduler``; return its progress."""
    tensors = load_file(path / "trainable.safetensors")
    if tensors.keys() != params.keys():
        raise UserError("the checkpoint's tensors do not match this run's trainable parameters", str(path),
                        fix="resume with the same config, or start in a new output_dir")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "progress.json").read_text())
