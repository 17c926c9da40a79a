"""Autograd functions that keep for backward only what it needs, and the module swap that puts the
gated MLP's into a loaded model. Each computes what the code it replaces computes: the same forward,
the same gradients (up to rounding).

What a training step of the default model kept, measured by the tensors autograd saves
(``bench/memory.py``): two thirds of it were LoRA's dropout (a float32 mask and the dropped input
for every adapted layer) and the gated MLP's three intermediate tensors. Here:

- ``lora_update``: y = result + s * B A drop(x), saving x (which the base layer reads anyway), a
  one-byte dropout mask (hashed from a seed, not drawn element by element) and the rank-r product
  A drop(x); the dropped input is rebuilt in backward.
- ``swiglu``: silu(gate) * up, saving gate and up only; silu is recomputed in backward.
- ``head_logprobs``: the log-probabilities of chosen tokens under the output head, computed in
  chunks of positions and recomputed in backward, so that (positions, vocabulary) logits, their
  softmax and their gradient never exist whole (packed text puts a label on every position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import SiLUActivation

from tuneforge.model import targets
from tuneforge.model.families import family_of

HEAD_CHUNK = 1024  # positions per chunk of logits: 1024 x 49,152 floats is 200 MB
MIN_SHARED = 4  # shorter shared prefixes are not worth a second forward call


# Dropout masks from a hash of (position, seed) instead of a random number per element: on the CPU, drawing
# 0.6 M Bernoulli numbers costs several times the layer's own LoRA matmuls, while a multiply-xorshift hash
# (the "lowbias32" constants) is a few integer passes. The seed is one draw of torch's generator per call, so
# runs stay reproducible and resume to the same masks. int32 arithmetic wraps; shifts are made logical.
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # as signed 32-bit integers
_mixed_positions: dict[torch.device, Tensor] = {}


def _mix(h: Tensor, k: int) -> Tensor:  # one multiply-xorshift round, in place on int32
    h.mul_(k)
    return h.bitwise_xor_(h.bitwise_right_shift(15).bitwise_and_(0x1FFFF))


def _positions(n: int, device: torch.device) -> Tensor:
    """The first hash round of 0 .. n-1, kept per device (grown when a longer one is asked for)."""
    mixed = _mixed_positions.get(device)
    if mixed is None or mixed.numel() < n:
        mixed = _mix(_mix(torch.arange(n, dtype=torch.int32, device=device), _MIX1), _MIX2)
        _mixed_positions[device] = mixed
    return mixed[:n]


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """A boolean tensor of ``shape``, True where dropout zeroes an element: each element independently with
    probability ``p`` (to 2^-32), a function of ``seed`` and its position alone."""
    h = _positions(shape.numel(), device).bitwise_xor(seed)
    h = _mix(h, _MIX1).mul_(_MIX2)  # the high bits of the last product are the best mixed: compare on them
    return (h < round(p * 2 ** 32) - 2 ** 31).view(shape)


def draw_seed() -> int:
    """A dropout mask's seed: one draw of torch's CPU generator, whatever the device."""
    return int(torch.randint(-2 ** 31, 2 ** 31 - 1, ()))


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
        # result (..., out), x (..., in), A (r, in), B (out, r). Dropout's 1 / (1 - p) is applied to the
        # rank-r products, so that x itself takes one pass (the masked copy) in forward and one in backward.
        xs = x.to(A.dtype)
        drop = None
        if p > 0:
            drop = dropout_mask(x.shape, p, draw_seed(), x.device)
            xs = xs.masked_fill(drop, 0)
        a = xs.reshape(-1, xs.shape[-1]) @ A.t()  # (n, r)
        if p > 0:
            a.mul_(1 / (1 - p))
        update = (a @ B.t()).mul_(scale).view(result.shape)  # (n, out) -> (..., out)
        ctx.save_for_backward(x, drop, A, B, a)
        ctx.scale, ctx.p = scale, p
        return result + update.to(result.dtype)  # not a view: a model may add into it in place (Falcon's MLP)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, drop, A, B, a = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(B.dtype)  # (n, out); under autocast a came out in its dtype
        a = a.to(B.dtype)
        grad_B = (g.t() @ a).mul_(ctx.scale) if ctx.needs_input_grad[3] else None  # (out, r)
        ga = (g @ B).mul_(ctx.scale / (1 - ctx.p))  # (n, r), the dropout's rescaling included
        grad_A = grad_x = None
        if ctx.needs_input_grad[2]:
            xd = x.reshape(-1, x.shape[-1]).to(A.dtype)
            if drop is not None:
                xd = xd.masked_fill(drop.reshape(xd.shape), 0)
            grad_A = ga.t() @ xd  # (r, in)
        if ctx.needs_input_grad[1]:
            gx = (ga @ A).view(x.shape)
            if drop is not None:
                gx.masked_fill_(drop, 0)
            grad_x = gx.to(x.dtype)
        return grad, grad_x, grad_A, grad_B, None, None


def lora_update(result: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
    """``result + scale * drop_p(x) @ A^T @ B^T``: LoRA's output; ``p`` is the dropout rate (0 in eval).
    With no graph to build (evaluation, generation) it is one small matmul and one fused multiply-add:
    a decoding step calls this in every adapted layer for one token, where each call's overhead counts."""
    if (p == 0 and not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                                     or result.requires_grad))
            and result.dtype == x.dtype == A.dtype == B.dtype and not torch.is_autocast_enabled(x.device.type)):
        n = result.shape[-1]
        if x.numel() == x.shape[-1]:  # one position (a decoding step): two matrix-vector products, cheaper to call
            return torch.addmv(result.reshape(n), B, torch.mv(A, x.reshape(-1)), alpha=scale).view(result.shape)
        return torch.addmm(result.reshape(-1, n), x.reshape(-1, x.shape[-1]) @ A.t(), B.t(),
                           alpha=scale).view(result.shape)
    return _LoRAUpdate.apply(result, x, A, B, scale, p)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        silu = gate * s
        grad_up = grad * silu
        grad_gate = grad * up * (s + silu * (1 - s))  # d silu / d gate = s (1 + gate (1 - s))
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return _SwiGLU.apply(gate, up)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with the same three children as the module it replaces, so the
    state dict, the adapters inside and their keys are unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def is_gated_silu(mlp: nn.Module | None) -> bool:
    """Whether ``mlp`` is down(silu(gate(x)) * up(x)) in three children, judged by type: the children are
    modules (a method may have wrapped the linear layers already), the activation a SiLU."""
    children = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    return (mlp is not None and all(isinstance(child, nn.Module) for child in children)
            and isinstance(getattr(mlp, "act_fn", None), (nn.SiLU, SiLUActivation)))


def use_lean_mlps(model: nn.Module) -> int:
    """Put a GatedMLP where each block's gated SiLU MLP was, in the families whose MLP is one
    (``Family.gated_mlp``); returns how many. Any other model keeps its own MLPs."""
    if not family_of(model).gated_mlp:
        return 0
    swapped = 0
    for block in targets.blocks(model):
        if is_gated_silu(getattr(block, "mlp", None)):
            block.mlp = GatedMLP(block.mlp)
            swapped += 1
    return swapped


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        # hidden (n, h), weight (vocab, h), targets (n, k) token ids -> (n, k) log-probabilities
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk], weight, bias).float()  # (c, vocab)
            lse[start:start + chunk] = torch.logsumexp(logits, dim=-1)
            out[start:start + chunk] = logits.gather(1, targets[start:start + chunk]) - lse[start:start + chunk, None]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            g = grad[start:start + ctx.chunk].float()  # (c, k)
            # d logp(t) / d logits = onehot(t) - softmax: summed over the k targets, each weighted by its grad
            glogits = torch.exp(F.linear(h, weight, bias).float() - lse[start:start + ctx.chunk, None])
            glogits.mul_(-g.sum(1, keepdim=True)).scatter_add_(1, targets[start:start + ctx.chunk], g)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = (glogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += glogits.t() @ h.float()
            if grad_bias is not None:
                grad_bias += glogits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def head_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int = HEAD_CHUNK) -> Tensor:
    """(n, k) log-probabilities of ``targets`` (n, k) under ``head`` (an nn.Linear over the vocabulary)
    for ``hidden`` (n, h), without (n, vocab) logits alive at once."""
    return _HeadLogprobs.apply(hidden, head.weight, head.bias, targets, chunk)


def shared_prefix(input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> int:
    """How many leading tokens every row shares, none of them predicting a target (0 when fewer than
    MIN_SHARED, or one row)."""
    if input_ids.shape[0] < 2:
        return 0
    shortest = int(attention_mask.sum(1).min())
    same = (input_ids[:, :shortest] == input_ids[:1, :shortest]).all(0)  # (shortest,)
    n = int(same.long().cumprod(0).sum())
    kept = keep.any(0).nonzero()
    if len(kept):
        n = min(n, int(kept[0]))
    n = min(n, shortest - 1)  # every row keeps a token of its own
    return n if n >= MIN_SHARED else 0
