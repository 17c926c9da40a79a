"""NF4 quantization: the code table, error and size figures, packing, and NF4Linear."""

import pytest
import torch
from torch import nn

from tuneforge.quant.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    pack_nibbles,
    quantize_linears_,
    quantize_nf4,
    unpack_nibbles,
)

# The 16 levels as published with QLoRA / in bitsandbytes (get_4bit_type("nf4")).
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))


def rel_error(w, state):
    return ((w - dequantize_nf4(state)).norm() / w.norm()).item()


def test_code_table_is_the_papers():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(PAPER_NF4, dtype=torch.float32))
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert (NF4_CODE == 0).sum() == 1
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0


def test_gaussian_error_matches_nf4(gaussian):
    single = rel_error(gaussian, quantize_nf4(gaussian, 64, double_quant=False))
    double = rel_error(gaussian, quantize_nf4(gaussian, 64, double_quant=True))
    print(f"NF4 relative error, block 64: {single:.5f} single, {double:.5f} double quant")
    assert 0.085 < single < 0.10
    assert 0.085 < double < 0.10
    assert double < single * 1.01  # double quantization costs less than 1% of the error


def test_exact_values_survive():
    # Each block's absmax element maps to +-1 exactly, and zeros stay zero.
    w = torch.zeros(4, 64)
    w[0, 3], w[1, 10], w[3, 0] = 2.5, -0.75, 1e-3
    assert torch.equal(dequantize_nf4(quantize_nf4(w, 64, double_quant=False)), w)


def test_pack_round_trip():
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (500,)
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (65,), (13, 17), (2, 3, 11)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_sizes_round_trip(shape, double_quant):
    w = torch.randn(*shape, dtype=torch.bfloat16)
    state = quantize_nf4(w, 64, double_quant=double_quant)
    out = dequantize_nf4(state)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    assert state.packed.numel() == -(-w.numel() // 64) * 32
    assert ((w.float() - out.float()).norm() / w.float().norm()) < 0.2


def test_many_blocks_double_quant_groups():
    # n_blocks (300) not a multiple of 256: the last group of scales is partial.
    w = torch.randn(300 * 64 - 5)
    state = quantize_nf4(w, 64, double_quant=True)
    assert state.absmax.dtype == torch.uint8 and state.absmax.shape == (300,)
    assert state.absmax_scale.shape == (2,) and state.absmax_offset.shape == ()
    assert rel_error(w, state) < 0.1


def test_bits_per_weight(gaussian):
    double = quantize_nf4(gaussian, 64, double_quant=True).bits_per_weight
    single = quantize_nf4(gaussian, 64, double_quant=False).bits_per_weight
    print(f"bits per weight: {double:.4f} double quant, {single:.4f} single")
    assert double == pytest.approx(4.127, abs=1e-3)
    assert single == 4.5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_matches_dequantized_linear(bias, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    q = NF4Linear.from_linear(linear, block_size=64, double_quant=double_quant)
    ref = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        if bias:
            ref.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), ref(x_ref)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in q.parameters())


def test_nf4linear_keeps_no_float_weight():
    q = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=False)
    for name, t in list(q.named_parameters()) + list(q.named_buffers()):
        assert not (t.is_floating_point() and t.numel() == 64 * 128), name
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 64 * 128 // 2
    assert "block_size=64" in repr(q)


def test_backward_saves_only_packed_state():
    q = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert not any(t.numel() == 64 * 128 and t.is_floating_point() for t in saved)


def test_quantize_linears_replaces_named_layers():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 8)))
    x = torch.randn(4, 64)
    before = model(x)
    report = quantize_linears_(model, ["0", "2.1"])
    assert isinstance(model[0], NF4Linear) and isinstance(model[2][1], NF4Linear)
    assert type(model[2][0]) is nn.Linear and isinstance(model[1], nn.ReLU)
    assert report.replaced == ("0", "2.1")
    assert report.bytes_before == (64 * 128 + 128 + 128 * 8 + 8) * 4
    assert report.bytes_after < report.bytes_before / 4
    assert (model(x) - before).norm() / before.norm() < 0.2
    with pytest.raises(TypeError):
        quantize_linears_(model, ["1"])
    with pytest.raises(KeyError):
        quantize_linears_(model, ["9"])


def test_against_bitsandbytes(gaussian):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for double_quant in (False, True):
        try:
            q, s = bnb_f.quantize_4bit(gaussian, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            theirs = ((gaussian - bnb_f.dequantize_4bit(q, s)).norm() / gaussian.norm()).item()
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            pytest.skip(f"bitsandbytes NF4 does not run here: {exc}")
        ours = rel_error(gaussian, quantize_nf4(gaussian, 64, double_quant=double_quant))
        print(f"double_quant={double_quant}: bitsandbytes {theirs:.5f}, ours {ours:.5f}")
        assert ours == pytest.approx(theirs, rel=0.01)
