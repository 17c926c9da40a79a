"""Where a run's processes are and what crosses between them: a runtime every run has.

``Local(device)`` is one process. When torchrun started several, the run driver makes a
``Distributed`` instead (``training/dist.py``, which alone imports torch.distributed, and only then:
its FSDP and checkpoint modules cost over a second at import). Both answer the same questions, so
the loop and the run driver never ask which they have:

- who this process is (``rank``, ``world``, ``main``) and which of a step's micro-batches it takes;
- sums, maxima and flags over every process (one process: the value itself), rank 0's text;
- ``agree``: every process learns whether rank 0 failed, and stops with rank 0's line;
- the model the loop calls (``wrap``: DDP or FSDP2; one process: the model itself), ``no_sync``;
- what a checkpoint holds (``checkpoint_state``, ``restore``): whole tensors, gathered from shards.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

from tuneforge.training import checkpoint

T = TypeVar("T")


@dataclass(frozen=True)
class Local:
    """One process on ``device``: every collective is the identity."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    stops_alone: bool = True  # a process may stop mid-step: no other waits for its gradients
    immediate_signals: bool = True  # a signal may cut work short (several processes stop at a step's end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        return True

    def sum(self, *values: float) -> list[float]:
        return list(values)

    def max(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def all(self, flag: bool) -> bool:
        return bool(flag)

    def gather_text(self, text: str) -> list[str]:
        return [text]

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def wrap(self, model: nn.Module, shard: bool) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def sharded(self, model: nn.Module) -> bool:
        return False

    def no_sync(self, model: nn.Module, last: bool):
        return contextlib.nullcontext()

    def communicating(self, model: nn.Module):
        """A region where ``model``'s forward passes communicate (a sharded model's evaluation), where a
        lost peer is one line: nothing to watch in one process."""
        return contextlib.nullcontext()

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def value(self, t: torch.Tensor) -> float:
        return t.item()

    def whole(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def full_model(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return None  # the model saves its own state

    def reseed(self, seed: int, step: int) -> None:
        """One process draws from the generators a checkpoint records: nothing to seed per step."""

    def checkpoint_state(self, model: nn.Module, params: dict[str, nn.Parameter], optimizer) -> tuple[dict, dict]:
        """(the trainable tensors, the optimizer's state by name) for a checkpoint."""
        return params, checkpoint.named_optimizer(optimizer, params)

    def restore(self, model: nn.Module, saved: checkpoint.Saved, params, optimizer, scheduler, scaler) -> dict:
        """Put a checkpoint back; its progress."""
        return checkpoint.restore(saved, params, optimizer, scheduler, scaler)

    def say(self, *args) -> None:
        """Print on rank 0 only (every process would say the same)."""
        if self.main:
            print(*args, file=sys.stderr)

    def first(self, work: Callable[[], T]) -> T | None:
        """``work`` on rank 0, the others waiting to hear whether it failed; they stop with its line."""
        result, error = None, None
        if self.main:
            try:
                result = work()
            except Exception as exc:
                error = exc
        self.agree(error)
        return result

    def describe(self, shard: bool, batch_size: int, grad_accum: int) -> str | None:
        """The line a run prints about its processes: none for one."""
        return None

    def close(self) -> None:
        """End what this runtime started."""
