"""Checkpoints: trainable tensors, optimizer state, schedule, RNG states and data position, in
safetensors and JSON only. Nothing is unpickled, so a checkpoint made by someone else cannot run
code; a checkpoint an older tuneforge pickled (``optimizer.pt``) is refused with a clear line.

    checkpoints/step-0000042/
        trainable.safetensors   the trained tensors, by name
        optimizer.safetensors   each tensor's optimizer state, "<name>/exp_avg", "<name>/exp_avg_sq", ...
        rng.safetensors         torch's CPU generator state (and each CUDA device's)
        state.json              progress (step, epoch, batch, ...), the optimizer's hyperparameters by
                                group (tensors by name), the schedule, the loss scaler, python's and
                                numpy's generator states

A checkpoint exists under its final name only once complete (``atomic_dir``): a crash, a kill or a
full disk leaves the previous one intact.
"""

from __future__ import annotations

import errno
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
STATE = "state.json"
PICKLED = "optimizer.pt"  # what checkpoints of tuneforge 0.1.0 held, pickled


def rng_state() -> dict:
    """Every random generator a step draws from: python's, numpy's, torch's CPU one and each CUDA device's."""
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


def _rng_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of an ``rng_state()``."""
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], **{f"cuda/{i}": s for i, s in enumerate(state.get("cuda", []))}}
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _rng_join(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    version, words, gauss = saved["python"]
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    state = {"python": (version, tuple(words), gauss),
             "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": tensors["torch"]}
    cuda = sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' writer reports a full disk in its own error type: it becomes the OSError it is."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    except OSError:
        raise
    except Exception as exc:  # safetensors' SafetensorError wraps the system's error in its message
        text = str(exc)
        code = errno.ENOSPC if "StorageFull" in text or "No space" in text else \
            errno.EFBIG if "FileTooLarge" in text or "too large" in text else errno.EIO
        raise OSError(code, text) from exc


def _optimizer_split(optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of the optimizer's state, every tensor keyed by its parameter's name."""
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{order[index]}/{key}"] = value
            else:
                scalars[f"{order[index]}/{key}"] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def _optimizer_join(optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    groups = []
    for group in saved["groups"]:
        group = {**group, "params": [index[n] for n in group["params"]]}
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, scheduler, progress: dict,
         keep: int, rng: dict | None = None, scaler=None) -> Path:
    """Write checkpoint ``step``; ``rng`` is the generators' state to record (default: now). Then
    keep only the newest ``keep``."""
    path = Path(folder) / f"{PREFIX}{step:07d}"
    names = {id(p): name for name, p in params.items()}
    opt_tensors, opt_json = _optimizer_split(optimizer, names)
    rng_tensors, rng_json = _rng_split(rng or rng_state())
    state = {"progress": {"step": step, **progress}, "optimizer": opt_json, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_json}
    with atomic_dir(path) as tmp:
        _save_tensors(params, tmp / "trainable.safetensors")
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        _save_tensors(rng_tensors, tmp / "rng.safetensors")
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint being written has a temporary name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and ((p / STATE).is_file() or (p / PICKLED).is_file()))


def load(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, scaler=None) -> dict:
    """Restore a checkpoint into ``params``, ``optimizer``, ``scheduler`` (and ``scaler``) and the random
    generators; return its progress."""
    if not (path / STATE).is_file():
        raise UserError("this checkpoint was written by an older tuneforge, as a pickle, which tuneforge no "
                        "longer loads (unpickling a file can run code)", str(path),
                        fix="start the run again in a new train.output_dir")
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        tensors = load_file(path / "trainable.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        rng_tensors = load_file(path / "rng.safetensors")
    except Exception as exc:  # json's and safetensors' errors for a damaged file
        raise UserError(f"the checkpoint cannot be read ({exc})", str(path),
                        fix="delete this checkpoint folder to resume from the one before it") from None
    if tensors.keys() != params.keys():
        raise UserError("the checkpoint's tensors do not match this run's trainable parameters", str(path),
                        fix="resume with the run's own config, or start in a new output_dir")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise UserError(f"the checkpoint's {name} has shape {tuple(tensors[name].shape)}, this run's "
                                f"{tuple(p.shape)}", str(path), fix="resume with the run's own config")
            p.copy_(tensors[name])
    names = {id(p): name for name, p in params.items()}
    optimizer.load_state_dict(_optimizer_join(optimizer, names, opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(_rng_join(rng_tensors, state["rng"]))
    return state["progress"]
