"""4-bit NormalFloat (NF4) weight quantization with optional double quantization (QLoRA).

A weight is cut into blocks of ``block_size`` consecutive elements (of the flattened
tensor); each block is divided by its absolute maximum and every value is rounded to the
nearest of the 16 NF4 levels. Two 4-bit codes share one byte. With double quantization the
per-block absmax values are themselves stored in 8 bits, which brings the cost of the
scales from 32/64 = 0.5 down to about 0.127 bits per weight.

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

# The NF4 levels as published with QLoRA (and used by bitsandbytes). They are quantiles of
# N(0, 1) scaled to [-1, 1], built asymmetrically so that 0 is exactly representable.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# Rounding to the nearest level is a bucket search against the midpoints between levels.
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2

DQ_BLOCK = 256  # absmax values per second-level scale when double quantizing
_DQ_MAX = 127  # symmetric int8 range [-127, 127], stored shifted by +127 as uint8 [0, 254]


@functools.lru_cache(maxsize=None)
def _on(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # Cached so a forward pass on a GPU does not copy the tables host-to-device each time.
    return NF4_CODE.to(device), _NF4_MIDPOINTS.to(device), _NF4_PAIRS.to(device)


@dataclass(frozen=True)
class NF4State:
    """Everything needed to rebuild a weight of ``numel`` elements; ``n_blocks = ceil(numel / block_size)``.

    - ``packed``: uint8, shape ``(n_blocks * block_size // 2,)``; code of element ``2i`` in the
      high nibble, of element ``2i + 1`` in the low nibble (the padded tail is code 7, i.e. 0.0).
    - ``absmax``: without double quantization float32, shape ``(n_blocks,)``, the block absmax.
      With it uint8, shape ``(n_blocks,)``: a symmetric linear 8-bit code ``q`` of
      ``absmax - absmax_offset``, decoded as ``(q - 127) / 127 * absmax_scale[block // 256]``.
    - ``absmax_scale``: float32, shape ``(ceil(n_blocks / 256),)``, the absmax of
      ``absmax - absmax_offset`` in each group of 256 blocks; ``None`` without double quantization.
    - ``absmax_offset``: float32, shape ``()``, the mean of all block absmax values; ``None`` likewise.
    - ``shape``, ``dtype``: those of the original weight; ``block_size``: elements per block.
    """

    packed: Tensor
    absmax: Tensor
    absmax_scale: Tensor | None
    absmax_offset: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_size: int

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of storage for the codes and all scales (metadata not counted)."""
        tensors = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15], shape (2n,) -> uint8 bytes, shape (n,); first code in the high nibble."""
    pairs = codes.view(-1, 2)  # (n, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of ``pack_nibbles``: uint8 bytes, shape (n,) -> uint8 codes, shape (2n,)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)  # (n, 2) -> (2n,)


# Every byte's two values, (256, 2), in unpack_nibbles' order: dequantization is one lookup per byte.
_NF4_PAIRS = NF4_CODE[unpack_nibbles(torch.arange(256, dtype=torch.uint8)).long()].view(256, 2)


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize ``weight`` (any shape, floating point) to NF4 with one absmax per block."""
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes floating-point tensors, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    _, midpoints, _ = _on(weight.device)

    flat = weight.detach().reshape(-1).float()
    flat = F.pad(flat, (0, -flat.numel() % block_size))  # zeros: they change no absmax
    blocks = flat.view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # An all-zero block has absmax 0; any positive divisor maps it to code 7 (exactly 0.0).
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    packed = pack_nibbles(torch.bucketize(normed, midpoints).to(torch.uint8).view(-1))

    absmax_scale = absmax_offset = None
    if double_quant:
        absmax, absmax_scale, absmax_offset = _quantize_absmax(absmax)
    return NF4State(packed, absmax, absmax_scale, absmax_offset, weight.shape, weight.dtype, block_size)


def _quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Absmax values are all positive and cluster around their mean; centring them first lets
    # the 8-bit code spend its range on the spread rather than on the common offset.
    offset = absmax.mean()
    centred = absmax - offset
    groups = F.pad(centred, (0, -centred.numel() % DQ_BLOCK)).view(-1, DQ_BLOCK)  # (n_groups, 256)
    scale = groups.abs().amax(dim=1)  # (n_groups,)
    per_block = scale.clamp_min(torch.finfo(torch.float32).tiny).repeat_interleave(DQ_BLOCK)
    q = torch.round(centred / per_block[: centred.numel()] * _DQ_MAX)
    return (q + _DQ_MAX).to(torch.uint8), scale, offset


def _dequantize_absmax(state: NF4State) -> Tensor:
    if not state.double_quant:
        return state.absmax.float()
    n_blocks = state.absmax.numel()
    per_block = state.absmax_scale.float().repeat_interleave(DQ_BLOCK)[:n_blocks]  # (n_blocks,)
    q = state.absmax.float() - _DQ_MAX
    return q / _DQ_MAX * per_block + state.absmax_offset.float()


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild the weight in its original shape, as ``dtype`` (default: the original dtype)."""
    _, _, pairs = _on(state.packed.device)
    # One row lookup per byte gives both of its values (index_select: about twice as fast on a CPU as
    # indexing the 16 codes with unpacked nibbles, and several times faster than pairs[idx]).
    values = pairs.index_select(0, state.packed.long()).view(-1, state.block_size)  # (n_bytes, 2) -> (n_blocks, bs)
    values.mul_(_dequantize_absmax(state).unsqueeze(1))  # values is a fresh tensor: scaled in place
    return values.view(-1)[: state.numel].view(state.shape).to(dtype or state.dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T + b with W rebuilt from NF4 in both passes.

    Only the packed state is kept for backward: keeping W (or its dequantized copy) alive
    between forward and backward would give back the memory NF4 exists to save.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, state: NF4State, dtype: torch.dtype) -> Tensor:
        ctx.state, ctx.dtype, ctx.x_dtype = state, dtype, x.dtype
        weight = dequantize_nf4(state, dtype)  # (out, in)
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_nf4(ctx.state, ctx.dtype)  # (out, in)
            grad_x = (grad_out.to(ctx.dtype) @ weight).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)  # (out,)
        return grad_x, grad_bias, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight lives only as NF4 codes and scales (buffers).

    ``compute_dtype`` is the dtype W is rebuilt in and the matmul runs in; ``None`` uses
    the dtype of each input. The bias, if any, is a parameter with ``requires_grad=False``.
    ``module.half()`` would also cast the float32 scales; dequantization reads them as float32
    again, so it still works, at the cost of fp16 precision in the scales.
    """

    def __init__(self, state: NF4State, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight state, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.block_size, self.weight_dtype, self.compute_dtype = state.block_size, state.dtype, compute_dtype
        self.fan_in_fan_out = False  # quantized from a layer that stores its weight (in, out): GPT-2's Conv1D
        self.register_buffer("packed", state.packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_scale", state.absmax_scale)
        self.register_buffer("absmax_offset", state.absmax_offset)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """From an nn.Linear, or a Conv1D (its (in, out) weight quantized as (out, in), and remembered)."""
        stored_in_out = isinstance(linear, Conv1D)
        weight = linear.weight.t() if stored_in_out else linear.weight
        layer = cls(quantize_nf4(weight, block_size=block_size, double_quant=double_quant), linear.bias,
                    compute_dtype=compute_dtype)
        layer.fan_in_fan_out = stored_in_out
        return layer

    @property
    def state(self) -> NF4State:
        # Rebuilt from the buffers on each call, so it follows .to(device).
        shape = torch.Size((self.out_features, self.in_features))
        return NF4State(self.packed, self.absmax, self.absmax_scale, self.absmax_offset,
                        shape, self.weight_dtype, self.block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.state, dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in_features) -> (..., out_features)
        return _NF4Matmul.apply(x, self.bias, self.state, self.compute_dtype or x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"double_quant={self.absmax_scale is not None}, "
                f"bits_per_weight={self.state.bits_per_weight:.3f}")


@dataclass(frozen=True)
class QuantReport:
    replaced: tuple[str, ...]
    bytes_before: int  # weights and biases of the replaced layers, as they were
    bytes_after: int  # NF4 codes and scales plus the biases


def quantize_linears_(model: nn.Module, names, block_size: int = 64, double_quant: bool = True,
                      compute_dtype: torch.dtype | None = None) -> QuantReport:
    """Replace the named ``nn.Linear`` submodules of ``model`` by ``NF4Linear``, in place;
    ``compute_dtype`` is each new layer's (see ``NF4Linear``)."""
    names = list(names)
    modules = dict(model.named_modules())
    before = after = 0
    for name in names:
        if name not in modules:
            raise KeyError(f"no submodule named {name!r}")
        linear = modules[name]
        if not isinstance(linear, (nn.Linear, Conv1D)):
            raise TypeError(f"{name!r} is a {type(linear).__name__}, not an nn.Linear or a Conv1D")
        if not name:
            raise ValueError("cannot replace the model itself; name one of its submodules")
        bias_bytes = 0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size()
        before += linear.weight.numel() * linear.weight.element_size() + bias_bytes
        new = NF4Linear.from_linear(linear, block_size=block_size, double_quant=double_quant,
                                    compute_dtype=compute_dtype)
        after += new.state.nbytes + bias_bytes
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return QuantReport(tuple(names), before, after)
