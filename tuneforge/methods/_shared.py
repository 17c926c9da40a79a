"""What the methods share: the protocols they implement (``GradientMethod``, whose ``inject`` returns
an ``Injected`` handle; ``ProbeMethod``, whose ``fit`` returns a ``Probe``) and the plumbing that would
otherwise be written once per method: refusing a second inject, finding the trainable tensors (one walk
over the modules a method added, ``method_parameters``), and for the methods that wrap their target
layers (LoRA, IA3, VeRA, the bottleneck adapter) finding and wrapping the targets, modules_to_save,
PEFT-keyed state dicts and config keys, folding an update into a layer (a dense layer rebuilt from a
quantized one).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.model import targets
from tuneforge.core.errors import UserError
from tuneforge.model.fingerprint import fingerprint
from tuneforge.quant.nf4 import NF4Linear

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module path in adapter_model.safetensors


class GradientMethod(Protocol):
    """A method trained by the loop. Every hook is implemented by every such method; where the math
    does not allow one (merging a soft prompt), it raises a UserError that says why."""

    NAME: str
    KIND: Literal["gradient"]
    PEFT_TYPE: str | None  # "LORA", "PROMPT_TUNING", ... or None: tuneforge's own adapter format
    WHOLE_MODEL: bool  # a run's result is the whole model (full fine-tuning), not an adapter folder
    MERGES: bool  # its change folds into the base weights (merge works), so a model file can hold it
    ADDS: str | None  # where it does not merge, what it adds instead ("adds virtual tokens before the input")
    Config: type

    def inject(self, model: nn.Module, cfg) -> Injected: ...  # freeze the base, add the method's tensors
    def trainable(self, model: nn.Module, cfg) -> dict[str, nn.Parameter]: ...  # found by type, not name
    def state_dict(self, model: nn.Module, cfg) -> dict[str, Tensor]: ...  # keys as written on disk
    def load_state_dict(self, model: nn.Module, cfg, sd: dict[str, Tensor]) -> None: ...
    def file_config(self, model: nn.Module, cfg) -> dict: ...  # adapter_config.json (PEFT's keys if PEFT has it)
    def for_loading(self, cfg): ...  # the config to inject before saved weights replace the start
    def merge(self, model: nn.Module, cfg) -> None: ...  # fold into the base weights, or a UserError
    def lora_form(self, model: nn.Module, cfg) -> dict[str, tuple[Tensor, Tensor, float]]: ...  # s B A, or UserError


class Probe(Protocol):
    """A fitted classifier on a frozen model's features."""

    cfg: Any  # the method's Config, with every choice made (the layer resolved to an index)
    labels: list[str]  # label names by class index
    base: dict | None  # fingerprint of the model the features came from

    def scores(self, features: np.ndarray) -> np.ndarray: ...  # (n, hidden) -> (n, n_labels) logits
    def parameter_count(self) -> int: ...
    def report(self) -> dict: ...  # the choices the fit made, for the run's summary
    def state_dict(self) -> dict[str, Tensor]: ...


class ProbeMethod(Protocol):
    """A method that fits on features of the frozen model instead of training through it."""

    NAME: str
    KIND: Literal["probe"]
    PEFT_TYPE: None
    Config: type

    def layers(self, model: nn.Module, cfg) -> list[int]: ...  # hidden states fit() needs
    def token_ids(self, tokenizer, texts: list[str], cfg) -> list[list[int]]: ...
    def extract(self, model: nn.Module, ids: list[list[int]], layers: list[int], cfg, pad_id: int
                ) -> np.ndarray: ...  # (len(layers), n, hidden)
    def fit(self, features: np.ndarray, layers: list[int], labels, cfg, label_names: list[str],
            base: dict | None) -> Probe: ...
    def from_state_dict(self, cfg, sd: dict[str, Tensor], labels: list[str], base: dict | None) -> Probe: ...


@dataclass(frozen=True)
class Injected:
    """A gradient method in a model: which method, with which config, put into which base (its
    fingerprint before the method changed it; None for a weightless model)."""

    method: GradientMethod
    cfg: Any
    base: dict | None = None

    @property
    def name(self) -> str:
        return self.method.NAME

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return self.method.trainable(model, self.cfg)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return self.method.state_dict(model, self.cfg)

    def load_state_dict(self, model: nn.Module, sd: dict[str, Tensor]) -> None:
        self.method.load_state_dict(model, self.cfg, sd)

    def file_config(self, model: nn.Module) -> dict:
        return self.method.file_config(model, self.cfg)

    def merge(self, model: nn.Module) -> None:
        self.method.merge(model, self.cfg)

    def lora_form(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
        return self.method.lora_form(model, self.cfg)

    def disabled(self, model: nn.Module):
        """A context in which ``model`` computes as its base did (the method switched off)."""
        if self.method.WHOLE_MODEL:
            raise UserError(f"{self.name} changes the base's own weights: there is no switch that gives the base "
                            "back", fix="keep the base's outputs from before training instead")
        return disabled(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """``model`` as its base for the block: every module a method added steps aside (a wrapper runs its
    base layer alone; virtual tokens are not added). DPO's and KTO's reference, at no second copy."""
    added = [m for m in model.modules() if isinstance(m, MethodModule)]
    for m in added:
        m.enabled = False
    try:
        yield
    finally:
        for m in added:
            m.enabled = True


def no_lora_form(why: str) -> None:
    """``lora_form`` of a method whose update is no low-rank B A: ``why`` says what it is instead."""
    raise UserError(f"{why}, not a low-rank update B A")


def injected(module_name: str, cfg, base: dict | None) -> Injected:
    """The handle a method's ``inject`` returns: ``injected(__name__, cfg, base)``."""
    return Injected(sys.modules[module_name], cfg, base)


class MethodModule:
    """Marks a module a method puts into a model (mixed into its nn.Module), so that a second
    inject finds the first by the model's structure, and says what in it trains."""

    enabled = True  # False: the module steps aside, as if the method were not there (``disabled``)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """What the method trains in this module, by key under the module's path: every parameter but
        those of the layer it wraps (``base_layer``). A module whose keys differ says so itself."""
        base = getattr(self, "base_layer", None)
        frozen = {id(p) for p in base.parameters()} if base is not None else set()
        return {key: p for key, p in self.named_parameters() if id(p) not in frozen}


def before_inject(model: nn.Module, quantized_too: bool = False) -> dict | None:
    """What every inject does first: refuse a model that holds a method already (``quantized_too``:
    or quantized layers, whose 4-bit codes cannot train, nor be quantized again), and take the base's
    fingerprint while it is still the base (None on the meta device, where there are no weights)."""
    refuse_second_inject(model, quantized_too)
    return None if any(p.is_meta for p in model.parameters()) else fingerprint(model)


def refuse_second_inject(model: nn.Module, quantized_too: bool = False) -> None:
    kinds = (MethodModule, NF4Linear) if quantized_too else (MethodModule,)
    for path, module in model.named_modules():
        if isinstance(module, kinds):
            what = "quantized layers" if isinstance(module, NF4Linear) else "a method"
            raise RuntimeError(f"{what} already injected into this model ({type(module).__name__} at "
                               f"{path or 'the model'}); load a fresh model to inject another")


def modules_of(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """Every module of type ``kind`` in ``model``, by path: how a method finds its own layers."""
    return {path: m for path, m in model.named_modules() if isinstance(m, kind)}


def method_parameters(model: nn.Module, kinds: tuple[type, ...]) -> dict[str, nn.Parameter]:
    """What a method trains in the modules it added, found by type in one walk over the model: each module
    of ``kinds`` gives its ``adapter_params()`` under its path. The modules of the first kind come first, then
    the next kind's, each in model order: the names and order checkpoints and optimizer states are kept in."""
    found: list[dict[str, nn.Parameter]] = [{} for _ in kinds]
    for path, module in model.named_modules():
        kind = next((i for i, k in enumerate(kinds) if isinstance(module, k)), None)
        if kind is not None:
            found[kind].update({f"{path}.{key}" if path else key: p for key, p in module.adapter_params().items()})
    return {name: p for bucket in found for name, p in bucket.items()}


def device_of(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()])).device


def lora_pair(n_in: int, rank: int, n_out: int, cfg, device: torch.device) -> tuple[nn.Linear, nn.Linear]:
    """LoRA's A (rank x n_in) and B (n_out x rank) as PEFT starts them: A kaiming-uniform (``gaussian``: std
    1 / r), B zero (``init_lora_weights: false`` keeps nn.Linear's random B). Drawn by torch's CPU generator and
    moved to ``device``, as PEFT draws them: one seed, one adapter on any device (a meta model draws nothing)."""
    drawn_on = device if device.type == "meta" else torch.device("cpu")
    A = nn.Linear(n_in, rank, bias=False, device=drawn_on)
    B = nn.Linear(rank, n_out, bias=False, device=drawn_on)
    if cfg.init_lora_weights == "gaussian":
        nn.init.normal_(A.weight, std=1 / cfg.r)
    if cfg.init_lora_weights:
        nn.init.zeros_(B.weight)
    return A.to(device), B.to(device)


# The wrap-the-targets methods: each target layer is replaced by the method's module holding it as
# ``base_layer``. Their modules give ``adapter_params()`` (what trains) and ``folded()`` (the plain layer
# with the update in its weight, for merge).

WRAPPABLE = (*targets.LINEAR, NF4Linear)  # the layer types they attach to (QLoRA: quantize first, then LoRA)


def find_targets(model: nn.Module, names, modules_to_save: list[str] | None, what: str,
                 beside: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """The linear layers ``names`` selects (``targets.find``; ``[]``: none, where a Config allows it: LoRA on
    the experts alone) and the paths of ``modules_to_save``, none inside or around a target or a path of
    ``beside``: a UserError, with nothing changed, if either is wrong. ``what`` names the method in errors."""
    wrapped = [] if names == [] else targets.find(model, names, types=WRAPPABLE)
    return wrapped, saved_modules(model, modules_to_save, [*wrapped, *beside], what)


def wrap(model: nn.Module, paths: list[str], make: Callable[[str, nn.Module], nn.Module],
         saved: list[str] = ()) -> None:
    """Freeze the whole model, put ``make(path, layer)`` where each targeted layer was, and unfreeze the
    ``saved`` modules (modules_to_save), which train whole."""
    model.requires_grad_(False)
    for path in paths:
        targets.swap(model, path, lambda old: make(path, old))
    for path in saved:
        model.get_submodule(path).requires_grad_(True)


def saved_paths(model: nn.Module, cfg) -> list[str]:
    """The paths of the modules ``cfg.modules_to_save`` names, once they are in place."""
    return targets.find(model, cfg.modules_to_save, types=(nn.Module,), key="modules_to_save") \
        if cfg.modules_to_save else []


def wrapper_hooks(kinds: tuple[type, ...], fix: str) -> tuple[Callable, Callable, Callable]:
    """(trainable, state_dict, load_state_dict) of a method that wraps its targets in modules of ``kinds``
    and may train whole modules (``cfg.modules_to_save``): its file holds exactly those tensors, PEFT's
    keys; ``fix`` says which config keys to check when a file does not fit."""
    def trainable(model: nn.Module, cfg) -> dict[str, nn.Parameter]:
        return {**method_parameters(model, kinds), **saved_parameters(model, saved_paths(model, cfg))}

    return (trainable, *prefixed_hooks(trainable, fix))


def peft_keys(peft_type: str, model: nn.Module, kind: type, cfg) -> dict:
    """The adapter_config.json keys PEFT writes for every wrap-the-targets method. target_modules lists the
    leaf names of the wrapped layers when they select exactly those layers, else their full paths;
    modules_to_save lists full paths, since PEFT matches those as bare suffixes ("norm" takes
    "input_layernorm"); fan_in_fan_out says the bases store their weights (in, out), as GPT-2's Conv1D does."""
    layers = modules_of(model, kind)
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "target_modules": leaf_names(model, list(layers)),
            "fan_in_fan_out": any(stored_in_out(layer.base_layer) for layer in layers.values()),
            "modules_to_save": saved_paths(model, cfg) or None, "inference_mode": True}


@torch.no_grad()
def merge_wrapped(model: nn.Module, kind: type) -> None:
    """Put the plain layer back where each module of ``kind`` is, its update folded into the weights."""
    for path, layer in modules_of(model, kind).items():
        targets.swap(model, path, lambda _: layer.folded())


@torch.no_grad()
def fold(layer: nn.Module, weight: Tensor) -> nn.Module:
    """``layer`` holding ``weight`` (out, in): written into it, or, for a quantized layer, which cannot hold
    it, a dense copy."""
    if isinstance(layer, NF4Linear):
        return dense_copy(layer, weight)
    write_weight(layer, weight)
    return layer


def saved_modules(model: nn.Module, names: list[str] | None, wrapped: list[str], what: str) -> list[str]:
    """The paths of ``modules_to_save``: whole modules trained and saved beside ``wrapped``, none inside
    or around a wrapped layer (``what`` names the method in the error)."""
    saved = targets.find(model, names, types=(nn.Module,), key="modules_to_save") if names else []
    for s in saved:
        if clash := [w for w in wrapped if w == s or w.startswith(s + ".") or s.startswith(w + ".")]:
            raise UserError(f"modules_to_save entry {s!r} overlaps the {what} targets {clash[:3]}", "modules_to_save",
                            fix="save a module that no target lies in, or drop it from target_modules")
    return saved


def saved_parameters(model: nn.Module, paths: list[str]) -> dict[str, nn.Parameter]:
    return {f"{path}.{key}": p for path in paths for key, p in model.get_submodule(path).named_parameters()}


def leaf_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names when they select exactly ``paths``, else the full paths: what target_modules must say
    in adapter_config.json so that PEFT wraps the same layers whatever pattern chose them."""
    if not paths:
        return []
    leaves = sorted({path.rsplit(".", 1)[-1] for path in paths})
    return leaves if set(targets.find(model, leaves, types=(nn.Module,))) == set(paths) else list(paths)


def prefixed_hooks(trainable: Callable, fix: str) -> tuple[Callable, Callable]:
    """(state_dict, load_state_dict) for a method whose file holds exactly its trainable tensors under
    PEFT's keys; ``fix`` says which config keys to check when a file does not fit."""
    return file_hooks(lambda model, cfg: {PEFT_PREFIX + key: p for key, p in trainable(model, cfg).items()}, fix)


def file_hooks(tensors: Callable, fix: str) -> tuple[Callable, Callable]:
    """(state_dict, load_state_dict) for a method whose file holds exactly ``tensors(model, cfg)``, a dict
    from the key on disk to the tensor in the model; loading checks every key and shape (``fix``: what to
    check when a file does not fit)."""
    def state_dict(model: nn.Module, cfg) -> dict[str, Tensor]:
        return {key: t.detach() for key, t in tensors(model, cfg).items()}

    def load_state_dict(model: nn.Module, cfg, sd: dict[str, Tensor]) -> None:
        load_exact(tensors(model, cfg), sd, fix)

    return state_dict, load_state_dict


def same_config(cfg):
    """``for_loading`` of a method whose start reads nothing but its config: the config itself."""
    return cfg


def check_state(shapes: dict[str, tuple], sd: dict[str, Tensor], fix: str) -> None:
    """``sd`` holds exactly the keys of ``shapes``, each of that shape, or a UserError names one that does not."""
    missing, unexpected = sorted(shapes.keys() - sd.keys()), sorted(sd.keys() - shapes.keys())
    if missing or unexpected:
        what = f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise UserError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected)", fix=fix)
    for key, shape in shapes.items():
        if tuple(shape) != tuple(sd[key].shape):
            raise UserError(f"tensor {key!r} has shape {tuple(sd[key].shape)}, the model expects {tuple(shape)}",
                            fix=fix)


@torch.no_grad()
def load_exact(params: dict[str, Tensor], sd: dict[str, Tensor], fix: str) -> None:
    """Copy ``sd`` into ``params``, key for key: the same keys and shapes, or a UserError."""
    check_state({key: p.shape for key, p in params.items()}, sd, fix)
    for key, p in params.items():
        p.copy_(sd[key])


def stored_in_out(layer: nn.Module) -> bool:
    """Whether a linear-like layer stores its weight (in, out), PEFT's fan_in_fan_out: GPT-2's Conv1D, or
    a layer quantized from one."""
    return isinstance(layer, Conv1D) or getattr(layer, "fan_in_fan_out", False)


def in_out(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear-like layer: nn.Linear, GPT-2's Conv1D, or a quantized one."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def base_weight(layer: nn.Module) -> Tensor:
    """(out, in): a linear layer's weight, rebuilt from its codes when it is quantized; a Conv1D's,
    which is stored (in, out), transposed."""
    if isinstance(layer, NF4Linear):
        return layer.dequantize()
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


@torch.no_grad()
def write_weight(layer: nn.Module, weight: Tensor) -> None:
    """Set a linear-like layer's weight to ``weight`` (out, in), in the layout the layer stores."""
    layer.weight.copy_(weight.t() if isinstance(layer, Conv1D) else weight)


@torch.no_grad()
def dense_copy(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A frozen linear layer with ``weight`` (out, in) and ``layer``'s bias: how a merge replaces a
    quantized layer, which cannot hold merged weights. A quantized Conv1D becomes a Conv1D again, so the
    merged model's state dict is the family's own."""
    dtype = layer.weight_dtype if isinstance(layer, NF4Linear) else layer.weight.dtype
    n_in, n_out = in_out(layer)
    if stored_in_out(layer):
        plain = Conv1D(n_out, n_in).to(device=weight.device, dtype=dtype)
        if layer.bias is None:
            plain.bias = None
    else:
        plain = nn.Linear(n_in, n_out, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    write_weight(plain, weight)
    if layer.bias is not None:
        plain.bias.copy_(layer.bias)
    return plain.requires_grad_(False)


def parameter_count(model: nn.Module) -> int:
    """Weights in the model, counting a quantized layer's weight by its shape: a 4-bit weight is
    still a weight (its packed codes are buffers, not parameters)."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return sum(p.numel() for p in model.parameters()) + quantized
