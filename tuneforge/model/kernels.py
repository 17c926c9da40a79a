"""Autograd functions that keep for backward only what it needs and make as few passes over an
activation as they can, and the module swaps that put them into a loaded model. Each computes what the
code it replaces computes: the same forward, the same gradients (up to rounding).

What a training step of the default model kept, measured by the tensors autograd saves
(``bench/memory.py``): two thirds of it were LoRA's dropout (a float32 mask and the dropped input
for every adapted layer) and the gated MLP's three intermediate tensors. Here:

- ``lora_update``: y = result + s * B A drop(x), saving x (which the base layer reads anyway), the
  positions dropout zeroed (drawn, not a number per element; a one-byte mask where that is smaller)
  and the rank-r product A drop(x); the dropped input is rebuilt in backward.
- ``lora_linear``: the same over a plain linear base, base product and update in one function: the
  update is accumulated into the base product, and x's two gradients into one, in place.
- ``swiglu``: silu(gate) * up, saving gate and up only; silu is recomputed in backward.
- ``RMSNorm``: Llama's RMS norm, saving x and one number per position; its backward takes four passes
  over x where autograd's takes ten.
- ``head_logprobs``: the log-probabilities of chosen tokens under the output head, computed in
  chunks of positions, so that (positions, vocabulary) logits, their softmax and their gradient never
  exist whole (packed text puts a label on every position); a frozen head's backward needs no logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import SiLUActivation

from tuneforge.model import targets
from tuneforge.model.families import family_of

HEAD_CHUNK = 512  # positions per chunk of logits: 512 x 49,152 floats is 100 MB
MIN_SHARED = 4  # shorter shared prefixes are not worth a second forward call


# Dropout picks the elements it zeroes instead of drawing a number for each. On the CPU it walks the elements
# by geometric gaps: the number of elements kept before the next dropped one is Geometric(p), floor(ln u /
# ln(1 - p)) for u uniform in (0, 1), so each element is dropped with probability p, independently of every
# other (to 2^-32), and the positions come out strictly ascending from one running sum. Each u is 32 bits of
# a hash of the gap's index and the seed: two multiply-xorshift rounds (the "lowbias32" constants) of the
# index, kept from one draw to the next, then the seed mixed in and two rounds more. Ascending positions make
# zeroing them in a copy of x a sequential scatter (a random one took three times as long here). Elsewhere the
# number of draws must be known without waiting for the device: every element is hit by a Poisson(lam) number
# of uniform draws, lam = -ln(1 - p), so it is zeroed (hit at least once) with probability 1 - e^-lam = p
# (Poisson splitting): in all a Poisson(n lam) number of draws, N, drawn on the CPU. They come in ascending
# order, as the order statistics of N uniforms: the running sums of N + 1 exponential variates over their
# total, each -ln of a 53-bit uniform from two such hashes.
# At LoRA's usual rates that is a few positions per hundred elements, where a mask took a hash of every
# element and a masked pass, and backward keeps the positions (8 bytes each) instead of a mask (1 byte per
# element) while they are fewer than an eighth of the elements. The seed is one draw of torch's CPU
# generator per draw (per pool on the CPU: see POOL_SPAN), so runs stay reproducible, resume to the same
# masks, and no device is waited for. int32 arithmetic wraps; shifts are made logical.
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # as signed 32-bit integers
_SECOND = 0x5BD1E995  # the second hash's seed, against the first's
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


def dropout_draws(n: int, p: float, seed: int, device: torch.device) -> Tensor:
    """The positions (int64, ascending; on a device other than the CPU some may repeat) that dropout at rate
    ``p`` zeroes among ``n`` elements: each element is among them independently with probability ``p``, a
    function of ``seed`` and the device's type alone. On the meta device, as many as the CPU's draw expects
    (a GPU's draw repeats some: -ln(1 - p) / p as many, 2.6% more at p = 0.05)."""
    if device.type == "meta":
        return torch.empty(round(n * p), dtype=torch.int64, device=device)
    if device.type == "cpu":
        return _gap_draws(n, p, seed)
    lam = -math.log1p(-p)
    count = torch.Generator().manual_seed(seed % 2 ** 63)
    draws = int(torch.poisson(torch.tensor(n * lam, dtype=torch.float64), generator=count))
    if draws >= 2 ** 31 - 1:  # beyond the int32 hash's indices: a number per element
        return torch.rand(n, device=device).lt_(p).nonzero().squeeze(1)
    mixed = _positions(draws + 1, device)
    high, low = (_mix(mixed.bitwise_xor(s), _MIX1).mul_(_MIX2) for s in (seed, seed ^ _SECOND))
    # the high bits of each last product are the best mixed: 21 of the first and 32 of the second
    u = high.bitwise_right_shift(11).bitwise_and_(0x1FFFFF).to(torch.int64).bitwise_left_shift_(32)
    u.add_(low.to(torch.int64).bitwise_and_(0xFFFFFFFF))  # uniform in [0, 2^53), exact in float64
    sums = u.double().add_(1).mul_(2 ** -53).log_().cumsum_(0)  # running sums of -E, E exponential (u in (0, 1])
    return (sums[:-1] / sums[-1:]).mul_(n).long().clamp_(max=n - 1)  # ascending, uniform in [0, n)


def _gap_draws(n: int, p: float, seed: int, gaps: int | None = None) -> Tensor:
    """``dropout_draws`` on the CPU: the running sums of Geometric(p) gaps, strictly ascending. It hashes
    ``gaps`` gaps, by default enough to pass ``n`` but about once in 10^15 (n of them always do, each being
    at least one element), and twice as many while they fall short: gap k is a function of k and the seed
    alone, so the positions do not depend on how many were hashed."""
    if n == 0 or p == 0:
        return torch.empty(0, dtype=torch.int64)
    gaps = min(n, gaps or int(n * p + 8 * math.sqrt(n * p) + 16))
    while gaps < 2 ** 31 - 1:
        h = _mix(_mix(_positions(gaps, torch.device("cpu")).bitwise_xor(seed), _MIX1), _MIX2)
        u = h.double().add_(2 ** 31 + 0.5).mul_(2 ** -32)  # the hash moved to [0, 2^32), its cell's middle: in (0, 1)
        # each gap floor(ln u / ln(1 - p)), at most n (a tiny p's would overflow int64), plus one: the next end
        ends = u.log_().mul_(1 / math.log1p(-p)).clamp_(max=n).long().add_(1).cumsum_(0)
        if ends[-1] >= n:
            return ends[:int(torch.searchsorted(ends, n, side="right"))].sub_(1)
        gaps = min(n, 2 * gaps)
    return torch.rand(n).lt_(p).nonzero().squeeze(1)  # beyond the int32 hash's indices: a number per element


def _mask(draws: Tensor, n: int) -> Tensor:
    true = torch.ones((), dtype=torch.bool, device=draws.device)
    return torch.zeros(n, dtype=torch.bool, device=draws.device).index_put_((draws,), true)


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """A boolean tensor of ``shape``, True where dropout zeroes an element (``dropout_draws``' positions)."""
    return _mask(dropout_draws(shape.numel(), p, seed, device), shape.numel()).view(shape)


def _dropped(t: Tensor, drop: Tensor, dtype: torch.dtype, copy: bool = True) -> Tensor:
    """``t`` in ``dtype`` with the elements ``drop`` names zeroed: positions (int64), or a boolean mask.
    A copy, or ``t`` itself when ``copy`` is False (then ``t`` is contiguous)."""
    if drop.dtype == torch.bool:
        return t.to(dtype).masked_fill(drop.view(t.shape), 0) if copy else t.masked_fill_(drop.view(t.shape), 0)
    out = t.to(dtype, copy=True, memory_format=torch.contiguous_format) if copy else t
    # put_ takes flat indices of any layout; here a third quicker than index_put_, twice index_fill_
    return out.put_(drop, torch.zeros((), dtype=out.dtype, device=out.device).expand(drop.shape))


# On the CPU, where each operation's fixed cost outweighs a small layer's draw (a classification batch's shared
# prefix is a few dozen positions), the draws of many layers come from one: a pool of POOL_SPAN elements'
# positions, drawn at once with a seed of its own, which layer after layer hands out in consecutive segments.
# Every element is dropped independently of the others, so each layer's segment is distributed as a draw of its
# own would be. A pool serves while torch's CPU generator is as the pool's seed left it: any
# other draw from the generator (a seed set, a state restored, a random op) starts a new pool at the next
# layer, so the draws stay a function of the generator's state and the order of the calls. A checkpoint
# records the pool (``dropout_state``) beside the generator's state, so a resumed run goes on with it.
POOL_SPAN = 1 << 24  # elements per pool: 16.8M, about 840,000 positions (7 MB) at p = 0.05
_pools: dict[float, dict] = {}  # dropout rate -> seed, cursor, the generator's state after the seed, positions


def _pool_draws(n: int, p: float) -> Tensor:
    pool = _pools.get(p)
    if pool is None or pool["cursor"] + n > POOL_SPAN or not torch.equal(torch.get_rng_state(), pool["after"]):
        pool = _pools[p] = {"seed": draw_seed(), "cursor": 0, "after": torch.get_rng_state(), "positions": None}
    if pool["positions"] is None:  # drawn when first used (after a checkpoint's restore too)
        pool["positions"] = dropout_draws(POOL_SPAN, p, pool["seed"], torch.device("cpu"))
    start = pool["cursor"]
    lo, hi = torch.searchsorted(pool["positions"], torch.tensor([start, start + n])).tolist()
    pool["cursor"] = start + n
    return pool["positions"][lo:hi] - start


def dropout_state() -> dict[str, list[int]]:
    """The dropout pools that serve the generator's present state, as JSON: rate -> [seed, cursor]."""
    now = torch.get_rng_state()
    return {repr(p): [pool["seed"], pool["cursor"]] for p, pool in _pools.items() if torch.equal(now, pool["after"])}


def set_dropout_state(state: dict[str, list[int]]) -> None:
    """Restore ``dropout_state()``'s pools, after the generator's state they serve has been restored."""
    _pools.clear()
    now = torch.get_rng_state()
    for p, (seed, cursor) in state.items():
        _pools[float(p)] = {"seed": int(seed), "cursor": int(cursor), "after": now, "positions": None}


def _draw_drop(x: Tensor, p: float) -> Tensor | None:
    """What dropout at rate ``p`` zeroes in ``x``: None at p = 0, else the drawn positions while they are
    fewer than an eighth of x's values, else a one-byte mask (smaller then, and as quick). On the CPU a
    pool serves layers of up to an eighth of its span; elsewhere, and for larger layers, a draw of their own."""
    if p == 0:
        return None
    n = x.numel()
    if x.device.type == "cpu" and 8 * n <= POOL_SPAN:
        drop = _pool_draws(n, p)
    else:
        drop = dropout_draws(n, p, draw_seed(), x.device)
    return _mask(drop, n) if 8 * drop.numel() >= n else drop


def drawn_mask(x: Tensor, p: float) -> Tensor:
    """The boolean mask (x's shape, True where zeroed) that a LoRA layer's dropout at rate ``p`` draws for
    ``x`` from here, as ``_draw_drop`` draws it (a pool's next segment on the CPU)."""
    drop = _draw_drop(x, p)
    return (drop if drop.dtype == torch.bool else _mask(drop, x.numel())).view(x.shape)


def draw_seed() -> int:
    """A dropout mask's seed: one draw of torch's CPU generator, whatever the device."""
    return int(torch.randint(-2 ** 31, 2 ** 31 - 1, ()))


def _outer(g: Tensor, a: Tensor, scale: float) -> Tensor:
    """B's gradient, ``scale * g^T a`` for g (n, out) and a (n, r): computed as (a^T g)^T, which takes half
    the time here of g^T a (out = 1536, n = 1024, r = 16: 0.35 against 0.63 ms), then laid out as B is."""
    return (a.t() @ g).mul_(scale).t().contiguous()


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
        # result (..., out), x (..., in), A (r, in), B (out, r). Dropout's 1 / (1 - p) is applied to the
        # rank-r products, so that x itself is copied once in forward and once in backward, its dropped
        # positions zeroed in the copy.
        drop = _draw_drop(x, p)
        xs = x.to(A.dtype) if drop is None else _dropped(x, drop, A.dtype)
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
        grad_B = _outer(g, a, ctx.scale) if ctx.needs_input_grad[3] else None  # (out, r)
        ga = (g @ B).mul_(ctx.scale / (1 - ctx.p))  # (n, r), the dropout's rescaling included
        grad_A = grad_x = None
        if ctx.needs_input_grad[2]:
            xd = x.to(A.dtype) if drop is None else _dropped(x, drop, A.dtype)
            grad_A = ga.t() @ xd.reshape(-1, x.shape[-1])  # (r, in)
        if ctx.needs_input_grad[1]:
            gx = ga @ A  # (n, in), a new tensor
            if drop is not None:
                _dropped(gx, drop, gx.dtype, copy=False)
            grad_x = gx.view(x.shape).to(x.dtype)
        return grad, grad_x, grad_A, grad_B, None, None


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                p: float) -> Tensor:
        # x (..., in), weight (out, in), A (r, in), B (out, r), one dtype. The update is accumulated into
        # the base product in place, and backward accumulates x's two gradients the same way: no pass over
        # (n, out) or (n, in) beyond the matmuls' own.
        x2, drop = x.reshape(-1, x.shape[-1]), _draw_drop(x, p)
        xs = x2 if drop is None else _dropped(x2, drop, x2.dtype)
        a = xs @ A.t()  # (n, r)
        if p > 0:
            a.mul_(1 / (1 - p))
        # Not a view: a model or a hook may change the output in place (Falcon's MLP adds into it)
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        out2 = out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(x2, weight.t(), out=out2)
        else:
            torch.addmm(bias, x2, weight.t(), out=out2)
        out2.addmm_(a, B.t(), alpha=scale)
        ctx.save_for_backward(x, drop, weight, A, B, a)
        ctx.scale, ctx.p, ctx.has_bias = scale, p, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, drop, weight, A, B, a = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (n, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_B = _outer(g, a, ctx.scale) if need[4] else None
        ga = (g @ B).mul_(ctx.scale / (1 - ctx.p))  # (n, r)
        grad_A = None
        if need[3]:
            grad_A = ga.t() @ (x2 if drop is None else _dropped(x2, drop, x2.dtype))
        grad_x = None
        if need[0]:
            if drop is None:
                grad_x = (g @ weight).addmm_(ga, A)
            else:  # the update's part has the dropped positions zeroed before the base's is added
                grad_x = _dropped(ga @ A, drop, ga.dtype, copy=False).addmm_(g, weight)
            grad_x = grad_x.view(x.shape)
        grad_weight = g.t() @ x2 if need[1] else None
        grad_bias = g.sum(0) if ctx.has_bias and need[2] else None
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                p: float) -> Tensor:
    """``x W^T + b + scale * drop_p(x) A^T B^T``: a LoRA layer over a dense base in one function, all
    tensors in one dtype (under autocast, the caller casts them all to autocast's, as autocast would a
    linear layer's). Beside the base layer and ``lora_update`` it saves, per layer, the update's scaling
    and addition in forward and the addition of the two x gradients in backward: three passes over an
    activation. ``p`` is the dropout rate (0 in eval)."""
    if p == 0 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                       for t in (x, weight, bias, A, B))):
        if x.numel() == x.shape[-1]:  # one position (a decoding step)
            return lora_one_position(x, weight, bias, A, B, scale)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        return out.addmm_(x2 @ A.t(), B.t(), alpha=scale).view(*x.shape[:-1], weight.shape[0])
    return _LoRALinear.apply(x, weight, bias, A, B, scale, p)


def lora_one_position(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``W x + b + s B A x`` for one position with no graph (a decoding step): three matrix-vector
    products. A decoding step runs every adapted layer for one token: this is the base layer's product and
    the update's two, with no module call and no reshaping of a batch between them. What is left is reading
    A and B from memory: one product over the A's of q, k and v stacked (and of gate and up) was tried and
    measured slower (``bench/generate.py``: unmerged LoRA 0.82x the base's tokens per second, 0.89x without
    it), as a 48 x 576 matrix-vector product took as long as three 16 x 576 ones (3.7 against 3 x 1.5 us)
    and the bookkeeping of which layer had seen which input cost more than the calls it saved."""
    v = x.reshape(-1)
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
    return y.addmv_(B, torch.mv(A, v), alpha=scale).view(*x.shape[:-1], weight.shape[0])


def lora_update(result: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float) -> Tensor:
    """``result + scale * drop_p(x) @ A^T @ B^T``: LoRA's output; ``p`` is the dropout rate (0 in eval).
    With no graph to build (evaluation, generation) it is one small matmul and one fused multiply-add, or
    two matrix-vector products for one position: a decoding step over a base that is not a plain linear
    layer (a 4-bit one); over a plain one, ``lora_one_position`` does the whole layer."""
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
        gate, up = ctx.saved_tensors  # silu(gate) is recomputed, not kept: four passes, one fused
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, F.silu(gate).mul_(grad)


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


# The RMS norms whose forward is Llama's, w * (x / rms(x)) with the norm in float32 and the weight applied
# in the input's dtype (``tests/test_kernels.py`` checks each against its class). Gemma's (1 + w) and OLMo 2's
# weight-then-cast differ, and keep their own.
LLAMA_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                             "Qwen3MoeRMSNorm", "SmolLM3RMSNorm", "Phi3RMSNorm"})


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()  # x itself when it is float32
        rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # y = w * x r, r = (mean(x^2) + eps)^-1/2: dx = r (g w) - x r^3 mean(g w x), dw = sum(g x r)
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * (xf * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        gw = (grad * weight).float()
        c = rstd.pow(3).mul_(torch.linalg.vecdot(gw, xf).unsqueeze(-1)).mul_(-1 / x.shape[-1])
        return gw.mul_(rstd).addcmul_(xf, c).to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Llama's RMS norm in one function: its forward's arithmetic in the same order (the same outputs), with
    backward in four passes over x where autograd takes ten. Holds the norm's own ``weight``, so the state
    dict and its keys are unchanged."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def use_lean_norms(model: nn.Module) -> int:
    """Put an ``RMSNorm`` in place of each of Llama's RMS norms (``LLAMA_RMS_NORMS``, by class: a family's
    norm may live in attention too, Qwen 3's per-head ones); returns how many. Other norms stay."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if (type(child).__name__ in LLAMA_RMS_NORMS and hasattr(child, "variance_epsilon")
                    and isinstance(getattr(child, "weight", None), nn.Parameter)):
                setattr(parent, name, RMSNorm(child))
                swapped += 1
    return swapped


def use_lean_modules(model: nn.Module) -> int:
    """Every module swap the model's family allows (``use_lean_mlps``, ``use_lean_norms``); returns how many."""
    return use_lean_mlps(model) + use_lean_norms(model)


def autocast_weight(weight: Tensor) -> Tensor:
    """``weight`` as autocast casts it for a matmul here: in autocast's dtype where autocast is on for its
    device and it is a floating type autocast casts (not float64), else itself. The head's products of one
    call share this one cast, where autocast casts a frozen weight anew at each product (it keeps the casts
    of trainable weights alone). Nothing is kept past the call: a weight that trains changes at each step
    (and a fused optimizer's update does not move its version counter), and a kept copy would hold memory
    the estimate does not count."""
    device = weight.device.type
    if not torch.is_autocast_enabled(device):
        return weight
    dtype = torch.get_autocast_dtype(device)
    if not weight.is_floating_point() or weight.dtype in (dtype, torch.float64):
        return weight
    return weight.detach().to(dtype)


class _HeadLogprobs(torch.autograd.Function):
    """Forward turns each chunk's logits into log-probabilities in one pass (where the head trains, into their
    log-sum-exp, kept for backward, and the targets' logits less it). Where only the hidden states
    need a gradient (the head is frozen), it also keeps each position's expected output embedding under its
    softmax, softmax @ W (a hidden state's size): since d logp(t) / d hidden = W[t] - softmax @ W, backward
    then needs no logits at all, and the step runs the head's matmul twice (as the plain computation does)
    instead of three times. Where the head trains, backward recomputes each chunk's logits for its gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                backward: str) -> Tensor:
        # hidden (n, h), weight (vocab, h), targets (n, k) token ids -> (n, k) log-probabilities;
        # backward: "expect" (the head frozen), "recompute" (the head trains) or "none" (no graph)
        n = hidden.shape[0]
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device) if backward == "recompute" else None
        expected = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if backward == "expect" else None
        w = autocast_weight(weight)  # the head as autocast computes with it, cast once for every chunk
        for start in range(0, n, chunk):
            end = start + chunk
            logits = F.linear(hidden[start:end], w, bias).float()  # (c, vocab)
            if lse is not None:  # backward recomputes the logits: only their log-sum-exp is kept
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                out[start:end] = logits.gather(1, targets[start:end]) - lse[start:end, None]
                continue
            logp = torch.log_softmax(logits, dim=-1)
            out[start:end] = logp.gather(1, targets[start:end])
            del logits
            if expected is not None:
                expected[start:end] = logp.exp_().to(w.dtype) @ w
        ctx.chunk, ctx.expect, ctx.dtype = chunk, backward == "expect", hidden.dtype
        if backward != "none":
            ctx.save_for_backward(*((weight, targets, expected) if ctx.expect else (hidden, weight, bias, targets, lse)))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.float()  # (n, k)
        if ctx.expect:  # sum_j g_j (W[t_j] - softmax @ W)
            weight, targets, expected = ctx.saved_tensors
            grad_hidden = torch.bmm(g[:, None, :], weight[targets].float())[:, 0] - g.sum(1, keepdim=True) * expected
            return grad_hidden.to(ctx.dtype), None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h, gc = hidden[start:end], g[start:end]
            # d logp(t) / d logits = onehot(t) - softmax: summed over the k targets, each weighted by its grad
            glogits = torch.exp(F.linear(h, weight, bias).float() - lse[start:end, None])
            glogits.mul_(-gc.sum(1, keepdim=True)).scatter_add_(1, targets[start:end], gc)
            if grad_hidden is not None:
                grad_hidden[start:end] = (glogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += glogits.t() @ h.float()
            if grad_bias is not None:
                grad_bias += glogits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def head_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int = HEAD_CHUNK) -> Tensor:
    """(n, k) log-probabilities of ``targets`` (n, k) under ``head`` (an nn.Linear over the vocabulary)
    for ``hidden`` (n, h), without (n, vocab) logits alive at once."""
    head_trains = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    graph = torch.is_grad_enabled() and (hidden.requires_grad or head_trains)
    backward = ("recompute" if head_trains else "expect") if graph else "none"
    return _HeadLogprobs.apply(hidden, head.weight, head.bias, targets, chunk, backward)


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
