"""Adapters on disk in PEFT's layout, so ``peft.PeftModel.from_pretrained`` reads what tuneforge writes
and tuneforge reads what PEFT writes.

    adapter_config.json        PEFT's config keys (``peft_type``, ``r``, ``target_modules``, ...), from
                               the method's ``file_config``; methods PEFT does not have write
                               ``"peft_type": null`` and ``"method"``
    adapter_model.safetensors  the method's state dict, keys as PEFT writes them; its metadata holds
                               {"format": "pt", "tuneforge": '{"method", "fingerprint", "config"}'}

The method name, base fingerprint and whole config live in the safetensors metadata rather than in
the JSON: PEFT loads a config with an unknown key but warns that the file needs a newer PEFT, which
is not true. A feature classifier (a probe) is written in the same two files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from tuneforge.core.atomic import atomic_dir
from tuneforge.core.config import Where, build
from tuneforge.core.errors import UserError
from tuneforge.model.fingerprint import check, tensor_hash
from tuneforge.methods._shared import PEFT_PREFIX, GradientMethod, Injected, Probe, ProbeMethod
from tuneforge.methods.registry import REGISTRY, by_peft_type, get_method

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT keys that describe the file rather than the method: read past, whatever their value.
# Keys that describe the file or the base, not the method. fan_in_fan_out says the base stores its weights
# (in, out), as GPT-2's Conv1D does: tuneforge reads that from the layer's type, and load_adapter checks it.
FILE_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping", "megatron_core", "qalora_group_size", "method", "labels", "fan_in_fan_out"}


def _base_params_in(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own parameters that the adapter file holds whole (modules_to_save), by their keys."""
    found = {}
    for key in sd:
        name = key.removeprefix(PEFT_PREFIX)
        try:
            found[name] = model.get_parameter(name)
        except AttributeError:  # a tensor the method adds (lora_A, ...), not one of the base's
            pass
    return found


def write_adapter(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """The two files, written atomically into ``out_dir``: the JSON config, and the tensors with
    tuneforge's record ``info`` in their metadata."""
    # Copies on the CPU: safetensors refuses tensors that share memory (a tied head and embedding).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    info = {**info, "tensors_sha256": tensor_hash(tensors)}  # a file damaged later is refused on load
    weights = safetensors_bytes(tensors, metadata={"format": "pt", "tuneforge": json.dumps(info)})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / WEIGHTS).write_bytes(weights)
    return out_dir


def save_adapter(model: nn.Module, injected: Injected, out_dir: str | Path, base_model_name: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter ``injected`` put into ``model`` to ``out_dir`` atomically; returns the folder.
    ``tensors``: its state dict when the caller gathered it (from a sharded model)."""
    if not isinstance(injected, Injected):
        raise TypeError(f"save_adapter(model, injected, out_dir) takes the handle inject returned, not "
                        f"{type(injected).__name__}")
    method = injected.method
    if method.WHOLE_MODEL:
        method.file_config(model, injected.cfg)  # raises the method's own explanation
    sd = injected.state_dict(model) if tensors is None else tensors
    # The method's whole config too: PEFT's keys cannot hold every setting (QLoRA's block size).
    info = {"method": method.NAME, "fingerprint": injected.base, "config": dataclasses.asdict(injected.cfg)}
    return write_adapter(out_dir, {**injected.file_config(model), "base_model_name_or_path": base_model_name}, sd,
                         info)


def save_probe(method: ProbeMethod, probe: Probe, out_dir: str | Path) -> Path:
    """Write a fitted probe (a feature classifier): its config and label names in the JSON, its
    tensors in the weights file."""
    cfg = dataclasses.asdict(probe.cfg)
    config = {"peft_type": None, "method": method.NAME, **cfg, "labels": probe.labels}
    return write_adapter(out_dir, config, probe.state_dict(),
                         {"method": method.NAME, "fingerprint": probe.base, "config": cfg})


def read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not adapter_dir.exists():
            raise UserError("no such folder", str(adapter_dir),
                            fix="check the path: a run's adapter is its OUTPUT_DIR/final") from None
        raise UserError(f"no {CONFIG} here, so this is not an adapter folder", str(adapter_dir),
                        fix="give the folder that save_adapter (or PEFT's save_pretrained) wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"the file is not valid JSON ({exc})", str(path),
                        fix="restore it or save the adapter again") from None
    if not isinstance(config, dict):
        raise UserError("expected a JSON object of config keys", str(path))
    return config


def read_weights(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and tuneforge's record ({"method", "fingerprint", "config"}, empty for a PEFT-made file)."""
    path = adapter_dir / WEIGHTS
    if not path.is_file():
        hint = " (a legacy adapter_model.bin is there)" if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise UserError(f"no {WEIGHTS} here{hint}", str(adapter_dir),
                        fix="save the adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {key: f.get_tensor(key) for key in f.keys()}
            info = json.loads((f.metadata() or {}).get("tuneforge", "{}"))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise UserError(f"cannot read the adapter weights ({exc})", str(path),
                        fix="restore the file or save the adapter again") from None
    info = info if isinstance(info, dict) else {}
    if info.get("tensors_sha256") not in (None, tensor_hash(sd)):
        raise UserError("the adapter's tensors are not the ones that were saved (their hash differs): the file is "
                        "damaged", str(path), fix="restore it from a copy, or save the adapter again")
    return sd, info


def method_of(config: dict, info: dict, path: Path) -> GradientMethod | ProbeMethod:
    """The method that made an adapter: tuneforge's record, else PEFT's peft_type."""
    name = info.get("method") or config.get("method")
    if name is None:
        try:
            return by_peft_type(config.get("peft_type"))
        except UserError as exc:
            raise UserError(exc.what, str(path), exc.fix) from None
    if name not in REGISTRY or REGISTRY[name].KIND == "gradient" and REGISTRY[name].WHOLE_MODEL:
        raise UserError(f"the adapter was made with method {name!r}, which this tuneforge does not have",
                        str(path), fix="load it with the tuneforge that made it")
    method = get_method(name)
    if config.get("method", name) != name:
        raise UserError(f"method={config['method']!r} here, but the weights file records method {name!r}",
                        f"{path}: key 'method'", fix=f"restore {CONFIG}, or save the adapter again")
    if config.get("peft_type", method.PEFT_TYPE) != method.PEFT_TYPE:
        raise UserError(f"peft_type={config['peft_type']!r} here, but the adapter was made with method {name!r}, "
                        f"whose peft_type is {method.PEFT_TYPE!r}", f"{path}: key 'peft_type'",
                        fix=f"restore {CONFIG}, or save the adapter again")
    return method


def _non_finite(value, key: str) -> str | None:
    """The key path of the first NaN or infinity in a JSON value (json reads NaN, Infinity and 1e999)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for k, v in items if (found := _non_finite(v, f"{key}.{k}")) is not None), None)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_values(config: dict, record: dict | None, path: Path) -> None:
    """Refuse a NaN or infinity anywhere in the config, and a number (a rank, a scale, a count) that
    differs from the one the weights file records: a hand-edited or planted lora_alpha would silently
    rescale the adapter. (Flags may differ: a prefix trained through its projection is saved without.)"""
    for key, value in config.items():
        if (bad := _non_finite(value, key)) is not None:
            raise UserError(f"{bad} is {value if bad == key else 'a non-finite number'}, not a finite number",
                            f"{path}: key '{key}'", fix=f"restore {CONFIG}, or save the adapter again")
    for key, value in config.items():
        saved = (record or {}).get(key)
        if _number(value) and _number(saved) and value != saved:
            raise UserError(f"{key}={value!r} here, but the weights file records {key}={saved!r}, as the adapter "
                            "was trained", f"{path}: key '{key}'", fix=f"restore {CONFIG}, or save the adapter again")


def method_config(method, config: dict, path: Path):
    """The method's Config from PEFT's keys: its own keys are taken, keys that describe the file are
    skipped, and any other key must hold its neutral value (null, false, {}, []): a feature tuneforge
    does not implement (rank_pattern, fan_in_fan_out, ...) is an error, never silently dropped."""
    fields = {f.name for f in dataclasses.fields(method.Config)}
    args = {}
    for key, value in config.items():
        if key in fields:
            args[key] = value
        elif key not in FILE_KEYS and value not in (None, False, {}, [], ""):
            raise UserError(f"{key}={value!r} is a PEFT feature tuneforge does not support", str(path),
                            fix=f"use an adapter made without {key}")
    try:
        return build(method.Config, args, Where(str(path)))
    except UserError as exc:  # a Config's own checks name the key as "method.<key>", as a run config does
        if exc.where and exc.where.startswith("method."):
            raise UserError(exc.what, f"{path}: key '{exc.where.removeprefix('method.')}'", exc.fix) from None
        raise


def weightless_copy(model: nn.Module) -> nn.Module:
    """``model`` with every tensor on the meta device: its structure, at no memory."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = nn.Parameter(t.to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else t.to("meta")
    return copy.deepcopy(model, memo)


def check_sizes(model: nn.Module, method: GradientMethod, cfg, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Build the adapter on a weightless copy first, so that a config that does not fit its weights
    (``r`` of 10^8, which would allocate gigabytes before the first shape check) is refused before
    anything is allocated: the tensors it makes must have the file's shapes, and it may not add more
    parameters than the model has. A method that cannot be built on the meta device is checked only as
    its weights load."""
    skeleton = weightless_copy(model)
    base = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()])
    try:
        with torch.device("meta"):
            handle = method.inject(skeleton, method.for_loading(cfg))
            made = handle.state_dict(skeleton)
    except NotImplementedError:  # an operation with no meta form (reading a tensor's values)
        return
    fix = f"restore {CONFIG}, or save the adapter again"
    for key, tensor in made.items():
        if key in sd and tuple(sd[key].shape) != tuple(tensor.shape):
            settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            culprit = next((name for name, value in settings.items() if type(value) is int and value in tensor.shape
                            and value not in sd[key].shape), None)
            if culprit is None:  # no setting of the config explains it: the model's own sizes differ
                raise UserError(f"this model makes {key} of shape {tuple(tensor.shape)}, and the adapter holds "
                                f"{tuple(sd[key].shape)}: it was made for a model of other sizes", str(path.parent),
                                fix="load the base the adapter was trained on")
            raise UserError(f"the config ({culprit}={settings[culprit]}) makes {key} of shape {tuple(tensor.shape)}, "
                            f"but the weights file holds {tuple(sd[key].shape)}", f"{path}: key '{culprit}'", fix=fix)
    added = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()]) - base
    if added > base:
        raise UserError(f"the config would add {added:,} parameters to a model of {base:,}", str(path), fix=fix)


def load_adapter(model: nn.Module, adapter_dir: str | Path, force: bool = False) -> Injected | Probe:
    """Load the adapter in ``adapter_dir`` onto ``model``: inject its method and load its weights, and
    return the handle; a feature classifier's folder gives the classifier (the model is left as it
    is). ``force`` skips the check that ``model`` is the base the adapter was made on."""
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    sd, info = read_weights(adapter_dir)
    method = method_of(config, info, adapter_dir / CONFIG)
    if config.get("modules_to_save"):  # the modules the file holds, not PEFT's suffix matches of the names
        saved = sorted({name.rpartition(".")[0] for name in _base_params_in(model, sd)})
        config = {**config, "modules_to_save": saved or None}
    record = info.get("config") if isinstance(info.get("config"), dict) and info.get("method") == method.NAME else None
    check_values(config, record, adapter_dir / CONFIG)
    if record is not None:  # the JSON stays authoritative for PEFT's keys; the others come from the record
        config = {**{k: v for k, v in record.items() if k not in config}, **config}
    cfg = method_config(method, config, adapter_dir / CONFIG)
    base = info.get("fingerprint") if isinstance(info.get("fingerprint"), dict) else None
    if method.KIND == "probe":
        if base is not None:
            check(base, model, force, where=str(adapter_dir))
        labels = config.get("labels")
        if not isinstance(labels, list):
            raise UserError("the classifier's label names are missing", str(adapter_dir / CONFIG),
                            fix="save the classifier again")
        return method.from_state_dict(cfg, sd, [str(x) for x in labels], base)
    if base is not None:
        check(base, model, force, where=str(adapter_dir))
    # The saved weights replace whatever the method would start from, so a method that starts from
    # something it must read (a tokenizer, for text initialization) skips it: the adapter loads anywhere.
    check_sizes(model, method, cfg, sd, adapter_dir / CONFIG)
    started = method.inject(model, method.for_loading(cfg))
    layout = bool(config.get("fan_in_fan_out")), bool(started.file_config(model).get("fan_in_fan_out"))
    if layout[0] != layout[1]:  # PEFT's record of how the base stores its weights: (in, out) or (out, in)
        raise UserError(f"fan_in_fan_out={layout[0]} does not match this model, whose targeted layers store their "
                        f"weights {'(in, out)' if layout[1] else '(out, in)'}", str(adapter_dir / CONFIG),
                        fix="load the adapter onto the model it was made for")
    injected = Injected(method, cfg, started.base)  # how the adapter was made, for saving it again
    injected.load_state_dict(model, sd)
    return injected
