"""Devices and dtypes by name: ``auto`` is CUDA when there is one, and float32 on a CPU (no fast
half-precision units there) or bfloat16 on CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tuneforge.core.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto", visible: bool = True, any_index: bool = False) -> torch.device:
    """``device`` by name (``auto``: CUDA when torch sees a GPU, else the CPU). A CUDA device torch cannot see
    is refused in one line unless ``visible`` is False (an estimate for another machine); ``any_index``: the
    index is chosen elsewhere (torchrun's LOCAL_RANK), so only whether torch sees a GPU at all is checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N") from exc
    if where.type == "cuda" and visible:  # asked for by name: say so before a model is read, not in torch's traceback
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            why = "no CUDA device is visible" if torch.version.cuda else "this torch was built without CUDA"
            raise UserError(f"device {device!r}: {why}", fix="use auto or cpu, or run where torch sees a GPU")
        if where.index is not None and where.index >= count and not any_index:
            raise UserError(f"device {device!r}: torch sees {count} CUDA device{'s' * (count > 1)}",
                            fix=f"use cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}, or auto")
    return where


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", fix=f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere. A CPU with bf16
    matrix units (AMX) multiplies bf16 several times faster than fp32, but bf16 changes the numbers a
    forward pass computes, so there it is asked for by name (``bench/precision.py`` measures it)."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in under ``precision``, in training and in evaluation alike:
    none in fp32, else autocast to its dtype."""
    name = resolve_precision(precision, device)
    return contextlib.nullcontext() if name == "fp32" else torch.autocast(device.type, dtype=DTYPES[name])


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on ``device`` may still take: on a GPU its free memory; on the CPU what the kernel
    calls available, within this process's cgroup limit if it has one, plus what the process holds
    already (its estimate counts that too). None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
        own = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit, used = (open(f"/sys/fs/cgroup/memory.{k}").read().strip() for k in ("max", "current"))
        if limit != "max":
            available = min(available, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return available + own
