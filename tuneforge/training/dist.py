"""torch.distributed for a run, as torchrun starts it: one process per device, on one node or many.

- ``from_env`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
  starts the process group: gloo on CPU, nccl on CUDA, each process on its local device.
  The run driver imports this module only then; one process runs as ``Local`` (``runtime.py``), whose
  questions ``Distributed`` answers across processes.
- ``wrap``: an adapter method trains under DistributedDataParallel, which buckets only the tensors
  that train; full fine-tuning (or ``train.fsdp``) shards every block, then the root, with FSDP2
  (``fully_shard``, on a device mesh of the ranks: a CPU mesh under gloo).
- The loop asks it for the sums it needs across ranks (loss, tokens, a non-finite or stop flag).
- Saving gathers whole tensors (``full_params``, ``whole``): an adapter or model written from N
  ranks is complete, every shard in place.

Only rank 0 writes files; every rank reads the same data in the same order and takes its share of
each step's micro-batches (``Distributed.mine``), so a step sees the same global batch as one process with
``grad_accum`` times as many micro-batches. What crosses between ranks is tensors and UTF-8 text
(JSON), never a pickle.

A rank that dies (killed, crashed, out of memory) fails its peers' next collective: each peer stops with
one line (``RunStopped``, exit 3), and the launcher's line names the rank that died first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tuneforge.core.errors import RunStopped, UserError
from tuneforge.model import targets
from tuneforge.model.devices import resolve_device
from tuneforge.training import checkpoint
from tuneforge.training.runtime import Local

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
# The model's buffers (rotary frequencies) never change: DDP need not send them before each forward
# (the keyword's name since torch 2.13; the older one before)
_DDP_KEYWORDS = inspect.signature(DistributedDataParallel).parameters
NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in _DDP_KEYWORDS else "broadcast_buffers": False}
# What gloo and NCCL say when the other end of a collective is gone or never answers
_LOST = re.compile(r"gloo|nccl|connection|broken pipe|timed? ?out|socket|peer", re.I)
Fn = TypeVar("Fn", bound=Callable)


@contextlib.contextmanager
def _peers_lost() -> Iterator[None]:
    """A collective that fails because another process is gone, as one line instead of the backend's
    traceback of some forty lines: the backend's first sentence, and what is kept."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError is one too
        if not (isinstance(exc, dist.DistError) or _LOST.search(str(exc))):
            raise
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        said = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # without gloo's [source:line]
        raise RunStopped(f"another process of the run stopped or cannot be reached ({said})",
                         fix="its own error or the launcher's line says which and why; the checkpoints written "
                             "before are kept for --resume") from exc


def _collective(method: Fn) -> Fn:
    """``method`` with a lost peer reported as one line (``_peers_lost``)."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _peers_lost():
            return method(*args, **kwargs)
    return wrapped


@dataclass(frozen=True)
class Distributed(Local):
    """``Local``'s questions, answered across torchrun's processes."""

    owned: bool = False  # this run started the process group (and ends it)
    stops_alone: bool = False  # the others would wait for this process's gradients
    immediate_signals: bool = False  # every process stops at the same step boundary

    def mine(self, index: int) -> bool:
        """Whether this rank takes the step's ``index``-th micro-batch (of grad_accum x world)."""
        return index % self.world == self.rank

    @_collective
    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    @_collective
    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def any(self, flag: bool) -> bool:
        return self.max(float(flag)) > 0

    @_collective
    def share(self, text: str) -> str:
        """Rank 0's ``text`` on every rank."""
        data = torch.tensor(list(text.encode()) if self.main else [], dtype=torch.uint8)
        size = self._broadcast(torch.tensor([data.numel()], dtype=torch.int64))
        data = self._broadcast(data if self.main else torch.empty(int(size.item()), dtype=torch.uint8))
        return bytes(data.tolist()).decode()

    @_collective
    def gather_text(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order."""
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return [bytes(o[:int(s.item())].tolist()).decode() for o, s in zip(out, sizes)]

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.broadcast(t, src=0)
        return t.cpu()

    def agree(self, error: BaseException | None) -> None:
        """Every rank learns whether rank 0 failed (its output folder, say) and stops with rank 0's line."""
        line = self.share("" if error is None or not self.main else
                          (error.line() if isinstance(error, UserError) else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if line:
            raise UserError(f"process 0 stopped: {line}")

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    @_collective
    def wrap(self, model: nn.Module, shard: bool) -> nn.Module:
        """The module the loop calls: ``model`` under DDP, or ``model`` itself once FSDP2 shards it in
        place (every decoder block, then the root)."""
        if shard:
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in targets.blocks(model):
                fully_shard(block, mesh=mesh)
            # The root keeps its tensors gathered between forward and backward: the output head's weight
            # (tied to the embeddings) is read again in the head's backward (kernels.head_logprobs).
            fully_shard(model, mesh=mesh, reshard_after_forward=False)
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       **NO_BUFFER_SYNC)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside DDP's wrapper (an FSDP2 model is its own module)."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def sharded(self, model: nn.Module) -> bool:
        return isinstance(self.unwrap(model), FSDPModule)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """DDP's all-reduce only on a step's last micro-batch; FSDP2 reduces as it goes. Either communicates
        in the forward and backward passes run inside, so a lost peer there is one line too."""
        with _peers_lost(), (model.no_sync() if isinstance(model, DistributedDataParallel) and not last
                            else contextlib.nullcontext()):
            yield

    def communicating(self, model: nn.Module):
        """An evaluation of a sharded model gathers each block's weights in its forward: a lost peer
        there is one line too. Other models do not communicate in forward: their errors are their own."""
        return _peers_lost() if self.sharded(model) else contextlib.nullcontext()

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``t``: its shard of a DTensor, else ``t`` itself."""
        return t.to_local() if isinstance(t, DTensor) else t

    def value(self, t: torch.Tensor) -> float:
        """A reduced scalar (the norm of sharded gradients is a DTensor) as a number."""
        return (t.full_tensor() if isinstance(t, DTensor) else t).item()

    @_collective
    def whole(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with every DTensor gathered whole (a collective: every rank calls it, in one order)."""
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}

    @_collective
    def full_model(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """A sharded model's whole state on rank 0's CPU ({} elsewhere), one name per tensor (a tied head
        is its embedding, as one process saves it): a collective. None for a model that is not sharded."""
        if not self.sharded(model):
            return None
        model = self.unwrap(model)
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        return {k: v for k, v in get_model_state_dict(model, options=FULL).items() if k not in tied}

    def reseed(self, seed: int, step: int) -> None:
        """Each process's dropout draws, a function of the step: a resumed run draws the same."""
        torch.manual_seed((seed * 1_000_003 + step) * 1009 + self.rank)

    @_collective
    def checkpoint_state(self, model: nn.Module, params: dict[str, nn.Parameter], optimizer) -> tuple[dict, dict]:
        """(the trainable tensors, the optimizer's state by name) whole on rank 0: a sharded model's
        gathered from every shard (a collective; {} elsewhere)."""
        if not self.sharded(model):
            return params, checkpoint.named_optimizer(optimizer, params) if self.main else None
        state = get_model_state_dict(self.unwrap(model), options=FULL)
        tensors = {k: state[k] for k in params} if state else {}
        return tensors, get_optimizer_state_dict(self.unwrap(model), optimizer, options=FULL)

    @_collective
    def restore(self, model: nn.Module, saved: checkpoint.Saved, params, optimizer, scheduler, scaler) -> dict:
        """Every process reads the whole tensors; a sharded model's keeps its shard."""
        if not self.sharded(model):
            return checkpoint.restore(saved, params, optimizer, scheduler, scaler)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.unwrap(model), saved.tensors, options=options)
        groups = checkpoint.live_runtime(optimizer, saved.optimizer["param_groups"])
        set_optimizer_state_dict(self.unwrap(model), optimizer, {**saved.optimizer, "param_groups": groups},
                                 options=options)
        return checkpoint.restore_rest(saved, scheduler, scaler)

    def describe(self, shard: bool, batch_size: int, grad_accum: int) -> str:
        return (f"{self.world} processes ({'nccl' if self.device.type == 'cuda' else 'gloo'}, "
                f"{'FSDP2' if shard else 'DDP'}): global batch {batch_size * grad_accum * self.world} = batch_size "
                f"{batch_size} x grad_accum {grad_accum} x {self.world} processes")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            # What may still hold the group (a DDP model and its reducer sit in reference cycles) goes now, while
            # torch is whole: left to the interpreter's exit, a process sometimes aborted there ("terminate
            # called without an active exception", about 4 runs in 100 of a tests/test_distributed.py case)
            gc.collect()
            with contextlib.suppress(RuntimeError):  # a group whose peers are gone: the run's own error says so
                dist.destroy_process_group()


def from_env(device: str, timeout_s: float) -> Distributed:
    """The process group torchrun's environment describes (``run.runtime_from_env`` calls this only
    for several processes). A collective that waits longer than ``timeout_s`` (a rank died or hangs) ends
    the run with an error."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, any_index=True)  # each process takes the GPU of its LOCAL_RANK
    if where.type == "cuda":
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    elif where.type != "cpu":
        raise UserError(f"torch.distributed runs on CPU (gloo) or CUDA (nccl), not {where.type}", "train.device",
                        fix="set train.device to cpu or cuda")
    owned = not dist.is_initialized()
    if owned:
        _join("nccl" if where.type == "cuda" else "gloo", where, timeout_s)
    return Distributed(where, dist.get_rank(), dist.get_world_size(), local,
                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")), owned=owned)


def _join(backend: str, device: torch.device, timeout_s: float) -> None:
    """``init_process_group``, which waits in C++ until every process has joined; no signal handler runs
    there, so a SIGTERM (torchrun stopping the run because another process ended before it joined) would
    wait out the whole timeout, and torchrun kills the process after 30 s. The wait happens in a thread,
    and this one, which takes the signals, waits for it in short interruptible steps."""
    failed: list[Exception] = []

    def join() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is the thread's own
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # raised again in the main thread
            failed.append(exc)

    joining = threading.Thread(target=join, name="tuneforge-join", daemon=True)
    joining.start()
    while joining.is_alive():
        joining.join(0.05)
    if failed:
        with _peers_lost():
            raise failed[0]
