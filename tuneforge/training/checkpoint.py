"""Checkpoints: trainable tensors, optimizer state, schedule, RNG states and data position, in
safetensors and JSON only. Nothing is unpickled, so a checkpoint made by someone else cannot run
code; a checkpoint an older tuneforge pickled (``optimizer.pt``) is refused with a clear line.

    checkpoints/step-0000042/
        trainable.safetensors   the trained tensors, by name
        optimizer.safetensors   each tensor's optimizer state, "<name>/exp_avg", "<name>/exp_avg_sq", ...
        rng.safetensors         torch's CPU generator state (and each CUDA device's)
        state.json              progress (step, epoch, batch, ...), the optimizer's hyperparameters by
                                group (tensors by name), the schedule, the loss scaler, python's and
                                numpy's generator states, the dropout pools torch's serves, the sha256
                                of each tensor file's tensors, and
                                the run's record (its resolved config and the hashes of its data files)

A checkpoint exists under its final name only once complete (``atomic_dir``): a crash, a kill or a
full disk leaves the previous one intact. A checkpoint whose tensors were damaged after saving is
refused (their hash is not the recorded one). The run's record comes from the output folder's
manifest (``training/output.py`` writes it when a run takes the folder); each checkpoint carries its
own copy, so a resume is checked against what the checkpoint was made under, whatever became of
``config.yaml`` since.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuneforge.core.atomic import atomic_dir
from tuneforge.core.errors import UserError
from tuneforge.model import kernels
from tuneforge.model.fingerprint import tensor_hash

PREFIX = "step-"
STATE = "state.json"
PICKLED = "optimizer.pt"  # what checkpoints of tuneforge 0.1.0 held, pickled
MANIFEST = ".tuneforge.json"  # in the output folder, beside checkpoints/: what tuneforge wrote there, the run's record
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
REQUIRED = ("progress", "optimizer", "scheduler", "rng")  # what state.json must hold


def rng_state() -> dict:
    """Every random generator a step draws from: python's, numpy's, torch's CPU one and each CUDA device's,
    and the dropout pools that torch's CPU one serves (``model.kernels``)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "dropout": kernels.dropout_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    kernels.set_dropout_state(state.get("dropout", {}))  # a checkpoint from before the pools: none
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of an ``rng_state()``."""
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], **{f"cuda/{i}": s for i, s in enumerate(state.get("cuda", []))}}
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                     "dropout": state.get("dropout", {})}


def _rng_join(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    version, words, gauss = saved["python"]
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    state = {"python": (version, tuple(words), gauss),
             "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": tensors["torch"],
             "dropout": saved.get("dropout", {})}
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


def named_optimizer(optimizer, params: dict[str, torch.nn.Parameter]) -> dict:
    """``optimizer.state_dict()`` keyed by parameter name instead of position: the form
    torch.distributed.checkpoint's full optimizer state has, which a sharded run saves."""
    order = [{id(p): name for name, p in params.items()}[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    return {"state": {order[i]: per_param for i, per_param in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}


def indexed_optimizer(optimizer, params: dict[str, torch.nn.Parameter], named: dict) -> dict:
    """The inverse of ``named_optimizer``: what ``optimizer.load_state_dict`` takes."""
    names = {id(p): name for name, p in params.items()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {"state": {index[name]: per_param for name, per_param in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in live_runtime(optimizer, named["param_groups"])]}


# How the optimizer's update runs (torch's fused kernel, one operation over many tensors, or one tensor at a
# time), not what it computes. ``load_state_dict`` takes them from the saved groups with the rest, so a
# checkpoint written by an earlier tuneforge (before the CPU's update was fused) or on another device would
# resume with that kernel; the live optimizer's choice is kept instead.
RUNTIME_KEYS = ("foreach", "fused", "capturable", "differentiable")


def live_runtime(optimizer, groups: list[dict]) -> list[dict]:
    """Saved parameter ``groups`` with the ``RUNTIME_KEYS`` of ``optimizer``'s own groups, group by group."""
    return [{**g, **{k: live[k] for k in RUNTIME_KEYS if k in live}} for g, live in zip(groups, optimizer.param_groups)]


def _optimizer_split(named: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of a ``named_optimizer`` state: tensors as "<name>/<key>"."""
    tensors, scalars = {}, {}
    for name, per_param in named["state"].items():
        for key, value in per_param.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{name}/{key}"] = value
    return tensors, {"groups": named["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g for g in saved["groups"]]
    return {"state": state, "param_groups": groups}


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: dict, scheduler, progress: dict,
         keep: int, rng: dict | None, scaler) -> Path:
    """Write checkpoint ``step``: the trainable ``tensors`` (whole) and the ``named_optimizer`` state;
    ``rng`` is the generators' state to record (default: now). Then keep only the newest ``keep``."""
    path = Path(folder) / f"{PREFIX}{step:07d}"
    opt_tensors, opt_json = _optimizer_split(optimizer)
    rng_tensors, rng_json = _rng_split(rng or rng_state())
    files = dict(zip(TENSOR_FILES, (tensors, opt_tensors, rng_tensors)))
    state = {"progress": {"step": step, **progress}, "optimizer": opt_json, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng_json,
             "sha256": {name: tensor_hash(sd) for name, sd in files.items()}, "run": _record(Path(folder))}
    with atomic_dir(path) as tmp:
        for name, sd in files.items():
            _save_tensors(sd, tmp / name)
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _record(folder: Path) -> dict | None:
    """The run's record in the manifest beside checkpoint ``folder`` (None if there is none)."""
    try:
        manifest = json.loads((folder.parent / MANIFEST).read_text(encoding="utf-8"))
        return {"config": manifest["config"], "data": manifest["data"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def state_of(path: Path) -> dict:
    """Checkpoint ``path``'s state.json, or {} for a pickled or unreadable one (loading it says which)."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _instead(path: Path) -> str:
    """What to do about a checkpoint that cannot be used: resume from the one before it, if one is kept."""
    earlier = [p for p in complete(path.parent) if p.name < path.name]
    if earlier:
        return f"move this folder out of {path.parent.name}/ and resume from {earlier[-1].name}, the one before it"
    return "no earlier checkpoint is kept: start the run again with --overwrite (it moves this one aside)"


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint being written has a temporary name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and ((p / STATE).is_file() or (p / PICKLED).is_file()))


@dataclass
class Saved:
    """A checkpoint as read: whole tensors by name, the ``named_optimizer`` state, and the rest."""
    path: Path
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    progress: dict


def read(path: Path, names, shapes: dict[str, tuple] | None = None) -> Saved:
    """Checkpoint ``path``, checked against the run's trainable ``names`` (and their ``shapes``)."""
    if not (path / STATE).is_file():
        raise UserError("this checkpoint was written by an older tuneforge, as a pickle, which tuneforge no "
                        "longer loads (unpickling a file can run code)", str(path),
                        fix="start the run again in a new train.output_dir")
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        files = {name: load_file(path / name) for name in TENSOR_FILES}
    except Exception as exc:  # json's and safetensors' errors for a damaged file
        raise UserError(f"the checkpoint cannot be read ({exc})", str(path), fix=_instead(path)) from None
    missing = [key for key in REQUIRED if key not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise UserError(f"the checkpoint's state.json lacks {', '.join(missing)}", str(path / STATE),
                        fix=_instead(path))
    recorded = state.get("sha256") if isinstance(state.get("sha256"), dict) else {}
    damaged = [name for name, sd in files.items() if recorded.get(name) not in (None, tensor_hash(sd))]
    if damaged:
        raise UserError(f"the checkpoint's tensors are not the ones that were saved ({', '.join(damaged)}: the hash "
                        "differs), so the file is damaged", str(path), fix=_instead(path))
    tensors = files["trainable.safetensors"]
    if tensors.keys() != set(names):
        raise UserError("the checkpoint's tensors do not match this run's trainable parameters", str(path),
                        fix="resume with the run's own config, or start in a new output_dir")
    for name, shape in (shapes or {}).items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"the checkpoint's {name} has shape {tuple(tensors[name].shape)}, this run's "
                            f"{tuple(shape)}", str(path), fix="resume with the run's own config")
    try:
        return Saved(path, tensors, _optimizer_join(files["optimizer.safetensors"], state["optimizer"]),
                     state["scheduler"], state.get("scaler"), _rng_join(files["rng.safetensors"], state["rng"]),
                     state["progress"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the checkpoint's state.json is malformed ({type(exc).__name__}: {exc})", str(path / STATE),
                        fix=_instead(path)) from None


def restore(saved: Saved, params: dict[str, torch.nn.Parameter], optimizer, scheduler, scaler=None) -> dict:
    """Put ``saved`` into ``params`` (on one process), the optimizer, the schedule, the scaler and the
    random generators; return its progress."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved.tensors[name])
    optimizer.load_state_dict(indexed_optimizer(optimizer, params, saved.optimizer))
    return restore_rest(saved, scheduler, scaler)


def restore_rest(saved: Saved, scheduler, scaler=None) -> dict:
    """The schedule, the scaler and the generators of ``saved`` (a sharded run loads the tensors itself)."""
    scheduler.load_state_dict(saved.scheduler)
    if saved.scaler and scaler is not None:  # an fp16 run's (a disabled scaler's state is empty)
        scaler.load_state_dict(saved.scaler)
    set_rng_state(saved.rng)
    return saved.progress
