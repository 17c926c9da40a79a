"""The lean computations against the plain ones they replace, on the tiny model: the LoRA update, the
gated MLP, the chunked output head, and shared-prefix batches for every gradient method. Equal
outputs and gradients, to rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_model
from tuneforge.eval.lm import label_loss
from tuneforge.model import kernels
from tuneforge.model.kernels import (LLAMA_RMS_NORMS, GatedMLP, RMSNorm, draw_seed, drawn_mask, dropout_mask,
                                     head_logprobs, lora_linear, lora_update, shared_prefix, swiglu, use_lean_mlps,
                                     use_lean_norms)
from tuneforge.methods.registry import get_method

VOCAB = 259


def test_lora_update_is_the_formula_with_and_without_dropout():
    torch.manual_seed(0)
    result, x = torch.randn(2, 5, 12), torch.randn(2, 5, 16, requires_grad=True)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    for p in (0.0, 0.05, 0.3):  # no dropout; the draws kept for backward; the mask kept
        torch.manual_seed(1)
        out = lora_update(result, x, A, B, 2.0, p)
        torch.manual_seed(1)
        keep = ~drawn_mask(x, p) if p else torch.ones_like(x, dtype=torch.bool)
        ref = result + 2.0 * ((x * keep / (1 - p)) @ A.T) @ B.T
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # 1 / (1 - p) after the product: other rounding
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad((out * g).sum(), (x, A, B)), torch.autograd.grad((ref * g).sum(), (x, A, B))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the path without autograd (evaluation, generation) computes the same
        torch.testing.assert_close(lora_update(result, x, A, B, 2.0, 0.0), result + 2.0 * (x @ A.T) @ B.T,
                                   rtol=1e-6, atol=1e-6)
        one, r1 = x[:1, -1:], result[:1, -1:]  # one position: a decoding step
        torch.testing.assert_close(lora_update(r1, one, A, B, 2.0, 0.0), r1 + 2.0 * (one @ A.T) @ B.T,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_is_the_base_layer_plus_the_update(bias):
    """The fused layer against base(x) + lora_update: the same output and every gradient (x, A, B, and the
    base weight and bias where they train), with and without dropout, from the same draws."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    base = nn.Linear(16, 12, bias=bias)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    for p in (0.0, 0.05, 0.3):
        for frozen in (True, False):
            base.requires_grad_(not frozen)
            inputs = (x, A, B) if frozen else (x, A, B, *base.parameters())
            torch.manual_seed(1)
            out = lora_linear(x, base.weight, base.bias, A, B, 2.0, p)
            torch.manual_seed(1)
            ref = lora_update(base(x), x, A, B, 2.0, p)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no graph: a batch, and one position
        for xs in (x, x[:1, -1:]):
            torch.testing.assert_close(lora_linear(xs, base.weight, base.bias, A, B, 2.0, 0.0),
                                       base(xs) + 2.0 * (xs @ A.T) @ B.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_a_lora_layer_over_a_plain_base_is_one_function(bias):
    """Over a plain linear base the layer is ``lora_linear`` (one position with no graph: three
    matrix-vector products), in training with dropout as in a decoding step; a hook on the base layer
    keeps the base layer's own call, so the hook runs, and the output is the same."""
    from tuneforge.methods import lora

    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 12, bias=bias), lora.Config(r=4, lora_alpha=8, lora_dropout=0.1)).eval()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 1, 16)
    plain = layer.base_layer(x) + layer.scale * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert layer._plain(x) is not None and layer(x).grad_fn is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)
        assert layer(x).shape == (1, 1, 12)
    layer.train()
    torch.manual_seed(3)
    fused = layer(torch.randn(2, 5, 16))
    assert type(fused.grad_fn).__name__ == "_LoRALinearBackward"
    calls = []
    hook = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    assert layer._plain(x) is None
    torch.manual_seed(3)
    torch.testing.assert_close(layer(torch.randn(2, 5, 16)), fused, rtol=1e-6, atol=1e-6)  # the same draws
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), plain, rtol=1e-6, atol=1e-6)
    assert calls == [1, 1]
    hook.remove()
    fused = layer(torch.randn(2, 5, 16))  # not a view: a model or a hook may add into it in place
    fused += 1
    fused.sum().backward()
    seen = []
    hook = layer.base_layer.register_full_backward_hook(lambda *a: seen.append(1))
    assert layer._plain(x) is None  # a backward hook on the base: its own call, so the hook runs
    layer(torch.randn(2, 5, 16)).sum().backward()
    assert seen == [1]
    hook.remove()
    layer.lora_A.to(torch.float64)  # one dtype, or the general path
    assert layer._plain(x) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lora_layer_under_autocast_is_one_function_in_its_dtype(dtype):
    """Under autocast the layer is still ``lora_linear``, run as autocast runs a linear layer: every
    operand in autocast's dtype, the output in it, float32 gradients for the float32 parameters. It
    computes what autocast makes of the base layer plus ``lora_update``, to that dtype's rounding."""
    from tuneforge.methods import lora

    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 24), lora.Config(r=4, lora_alpha=8, lora_dropout=0.1))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 32, requires_grad=True)
    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    for training in (True, False):
        layer.train(training)
        with torch.autocast("cpu", dtype=dtype):
            assert layer._plain(x) is not None
            torch.manual_seed(1)
            out = layer(x)
            torch.manual_seed(1)
            ref = lora_update(layer.base_layer(x), x, layer.lora_A.weight, layer.lora_B.weight, layer.scale,
                              layer.dropout.p if training else 0.0)
        assert out.dtype == ref.dtype == dtype
        assert type(out.grad_fn).__name__ == "_LoRALinearBackward"
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        g = torch.randn_like(out)
        ours, theirs = torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)
        for a, b in zip(ours, theirs):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # no graph: a batch, and one position
        for xs in (x, x[:1, -1:]):
            out = layer.eval()(xs)
            assert out.dtype == dtype
            torch.testing.assert_close(out, layer.base_layer(xs) + layer.lora_B(layer.lora_A(xs)) * layer.scale,
                                       rtol=2e-2, atol=2e-2)
    layer.double()  # autocast leaves float64 as it is: so does the layer, by the general path
    with torch.autocast("cpu", dtype=dtype):
        x64 = x.detach().double()
        assert layer._plain(x64) is None and layer(x64).dtype == layer.base_layer(x64).dtype == torch.float64


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_masks_drop_at_the_rate_independently(p):
    """The hashed masks behave as independent Bernoulli draws: the rate, no correlation between neighbouring
    positions or between seeds, a different mask per seed and the same mask for the same seed."""
    n = 1 << 20
    masks = [dropout_mask(torch.Size([n]), p, seed, torch.device("cpu")).float() for seed in (7, 8, -3)]
    sigma = (p * (1 - p) / n) ** 0.5
    for m in masks:
        assert abs(m.mean().item() - p) < 5 * sigma
        assert abs(torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()) < 5 / n ** 0.5
        assert abs(torch.corrcoef(torch.stack([m[:-576], m[576:]]))[0, 1].item()) < 5 / n ** 0.5  # one row apart
    assert abs(torch.corrcoef(torch.stack(masks[:2]))[0, 1].item()) < 5 / n ** 0.5
    assert torch.equal(dropout_mask(torch.Size([n]), p, 7, torch.device("cpu")).float(), masks[0])
    positions = kernels.dropout_draws(n, p, 7, torch.device("cpu"))
    assert torch.equal(positions, masks[0].nonzero().squeeze(1))  # strictly ascending, none repeated
    assert torch.equal(kernels._gap_draws(n, p, 7, gaps=3), positions)  # hashed a few gaps at a time: the same
    # counts in blocks of 64 follow the binomial spread: no clumping along positions
    counts = masks[0].view(-1, 64).sum(1)
    assert abs(counts.var().item() / (64 * p * (1 - p)) - 1) < 0.05


def test_the_cpu_s_draws_for_fewer_elements_are_the_first_of_the_draws_for_more():
    """Gap k is a function of k and the seed alone, so the positions dropped among n elements are those of a
    longer draw below n: the last element is kept or dropped as in the longer draw (no end lost or added).
    And the edges: no element, rate 0, a rate near 1, a rate too small for int64 gaps."""
    for p in (0.05, 0.5):
        for seed in range(20):
            longer = kernels._gap_draws(4096, p, seed)
            for n in (1, 2, 3, 17, 64, 1000):
                assert torch.equal(kernels._gap_draws(n, p, seed), longer[longer < n]), (p, seed, n)
    assert kernels._gap_draws(0, 0.1, 1).numel() == kernels._gap_draws(100, 0.0, 1).numel() == 0
    near_one = kernels._gap_draws(100_000, 0.999, 1)
    assert abs(near_one.numel() / 100_000 - 0.999) < 5 * (0.999 * 0.001 / 100_000) ** 0.5
    assert kernels._gap_draws(1000, 1e-30, 1).numel() == 0


def test_layers_draw_consecutive_segments_of_one_pool_until_the_generator_moves():
    """On the CPU, layer after layer takes the next segment of one pool's positions (disjoint segments of a
    draw whose elements are dropped independently: each at the rate), a pool is new once anything else draws
    from the generator, and the same generator state gives the same masks."""
    p, xs = 0.05, [torch.empty(7, 16), torch.empty(3, 40), torch.empty(1, 16)]
    torch.manual_seed(3)
    masks = [drawn_mask(x, p).reshape(-1) for x in xs]
    torch.manual_seed(3)
    pool = dropout_mask(torch.Size([kernels.POOL_SPAN]), p, draw_seed(), torch.device("cpu"))
    assert torch.equal(torch.cat(masks), pool[:sum(x.numel() for x in xs)])  # one pool, in order
    torch.manual_seed(3)
    assert torch.equal(drawn_mask(xs[0], p).reshape(-1), masks[0])  # a seed set: a new pool, the same one
    torch.rand(1)  # another draw from the generator: the next layer starts a new pool
    assert not torch.equal(drawn_mask(xs[1], p).reshape(-1), masks[1])
    big = torch.empty(kernels.POOL_SPAN // 8 + 1)  # larger than a pool serves: a draw of its own
    torch.manual_seed(4)
    seed = draw_seed()
    torch.manual_seed(4)
    assert torch.equal(drawn_mask(big, p), dropout_mask(big.shape, p, seed, big.device))
    many = torch.cat([drawn_mask(torch.empty(64, 64), p).reshape(-1).float() for _ in range(500)])  # 2M values
    assert abs(many.mean().item() - p) < 5 * (p * (1 - p) / many.numel()) ** 0.5


def test_a_checkpoint_s_generator_state_carries_the_dropout_pool():
    """Resuming from a checkpoint's generator state draws what the uninterrupted run drew next: whether the
    pool was serving (it goes on with it) or the generator had moved since (a new pool from the generator)."""
    from tuneforge.training import checkpoint

    x = torch.empty(5, 32)
    for moved in (False, True):
        torch.manual_seed(0)
        drawn_mask(x, 0.3)  # a pool serves
        if moved:
            torch.rand(1)
        saved = checkpoint._rng_join(*checkpoint._rng_split(checkpoint.rng_state()))  # as state.json keeps it
        ahead = [drawn_mask(x, 0.3) for _ in range(3)]
        kernels._pools.clear()  # a new process
        torch.manual_seed(1)
        checkpoint.set_rng_state(saved)
        assert all(torch.equal(drawn_mask(x, 0.3), m) for m in ahead)


def test_swiglu_and_the_gated_mlp_equal_the_model_s_own():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    ours, ref = swiglu(gate, up), F.silu(gate) * up
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours.square().sum(), (gate, up)), torch.autograd.grad(ref.square().sum(), (gate, up))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    model = make_tiny_model(VOCAB)
    lean = copy.deepcopy(model)
    assert use_lean_mlps(lean) == 2 and all(isinstance(layer.mlp, GatedMLP) for layer in lean.model.layers)
    assert lean.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lean(ids).logits, model(ids).logits)


NORM_MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
                "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3", "Qwen3MoeRMSNorm": "qwen3_moe",
                "SmolLM3RMSNorm": "smollm3", "Phi3RMSNorm": "phi3"}


@pytest.mark.parametrize("name", sorted(LLAMA_RMS_NORMS))
def test_the_lean_rms_norm_is_each_classs_own(name):
    """Each norm the swap takes: the same output to the bit in float32 (the same arithmetic in the same
    order), the same gradients for x and a training weight to rounding, and the same output in bfloat16."""
    import importlib

    module = NORM_MODULES[name]
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    torch.manual_seed(0)
    own = cls(24, eps=1e-5)
    nn.init.uniform_(own.weight, 0.5, 1.5)
    lean = RMSNorm(own)
    x = torch.randn(3, 5, 24, requires_grad=True) * 3
    assert torch.equal(lean(x), own(x))
    g = torch.randn(3, 5, 24)
    for a, b in zip(torch.autograd.grad((lean(x) * g).sum(), (x, own.weight)),
                    torch.autograd.grad((own(x) * g).sum(), (x, own.weight))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    own.to(torch.bfloat16)
    lean = RMSNorm(own)
    xb = x.detach().to(torch.bfloat16)
    assert torch.equal(lean(xb), own(xb))


def test_the_lean_norms_replace_every_llama_norm_and_keep_the_loss():
    assert set(NORM_MODULES) == LLAMA_RMS_NORMS
    model = make_tiny_model(VOCAB)
    lean = copy.deepcopy(model)
    assert use_lean_norms(lean) == 2 * 2 + 1  # two per block, and the final norm
    assert lean.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lean(ids).logits, model(ids).logits)
    for m in (model, lean):
        m(ids, labels=ids).loss.backward()
    for (key, a), b in zip(lean.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_trains", [True, False])
def test_head_logprobs_in_chunks_equal_log_softmax(bias, head_trains):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(head_trains)  # frozen: backward from softmax @ W
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11, 3))
    ours = head_logprobs(hidden, head, targets, chunk=4)  # three chunks, the last short
    ref = torch.log_softmax(head(hidden), -1).gather(1, targets)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no graph: nothing kept for a backward
        torch.testing.assert_close(head_logprobs(hidden, head, targets, chunk=4), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ours)
    inputs = (hidden,) + ((head.weight,) + ((head.bias,) if bias else ()) if head_trains else ())
    for a, b in zip(torch.autograd.grad((ours * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_trains", [True, False])
def test_head_logprobs_under_autocast_cast_the_head_once_and_compute_what_autocast_computes(head_trains,
                                                                                            monkeypatch):
    """Under bf16 autocast the head is cast once for all its chunks. The log-probabilities and the gradients
    are those of autocast casting the head at each product, bit for bit, step after step of the run's own
    optimizer (whose fused update does not move the weight's version counter)."""
    from tuneforge.training.optim import make_optimizer

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(head_trains)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11, 3))
    g = torch.randn(11, 3)
    inputs = (hidden, head.weight) if head_trains else (hidden,)
    trained = head.weight if head_trains else hidden
    optimizer = make_optimizer({"trained": trained}, lr=0.5, weight_decay=0.0)

    def step():  # three chunks, the last short
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head_logprobs(hidden, head, targets, chunk=4)
        return out, torch.autograd.grad((out * g).sum(), inputs)

    for _ in range(3):
        ours = step()
        with monkeypatch.context() as m:
            m.setattr(kernels, "autocast_weight", lambda weight: weight)  # autocast casts at each product
            ref = step()
        assert torch.equal(ours[0], ref[0])
        assert all(torch.equal(a, b) for a, b in zip(ours[1], ref[1]))
        trained.grad = ours[1][-1].detach().clone()  # the last input's gradient is the trained tensor's
        optimizer.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.autocast_weight(head.weight).dtype == torch.bfloat16
    assert kernels.autocast_weight(head.weight) is head.weight  # no autocast: the weight itself


def test_shared_prefix_length():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 9, 9, 0], [1, 2, 3, 4, 5, 6, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0], [1] * 6 + [0] * 2])
    none = torch.zeros_like(ids, dtype=torch.bool)
    assert shared_prefix(ids, mask, none) == 5
    keep = none.clone()
    keep[1, 4] = True  # position 4 predicts a label: it must be computed per row
    assert shared_prefix(ids, mask, keep) == 4
    keep[0, 2] = True
    assert shared_prefix(ids, mask, keep) == 0  # 2 shared tokens are not worth a second call
    assert shared_prefix(ids[:1], mask[:1], none) == 0


CASES = {"lora": {"r": 4, "target_modules": "all-linear"}, "full": {}, "ia3": {},
         "prompt": {"num_virtual_tokens": 3}, "prefix": {"num_virtual_tokens": 3}, "adapter": {}}


@pytest.mark.parametrize("name", CASES)
def test_a_shared_prefix_gives_the_plain_loss_and_gradients(name):
    """Rows that share 10 tokens (a system turn), then differ, right-padded, labels on their ends."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, VOCAB, (10,), generator=gen)
    rows = [torch.cat([shared, torch.randint(3, VOCAB, (n,), generator=gen)]) for n in (6, 3, 8)]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (0, width - len(r)), value=2) for r in rows])
    mask = torch.stack([F.pad(torch.ones(len(r), dtype=torch.long), (0, width - len(r))) for r in rows])
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        labels[i, len(r) - 2:len(r)] = r[-2:]
    results = []
    for share in (False, True):
        model = make_tiny_model(VOCAB, seed=1)
        method = get_method(name)
        handle = method.inject(model, method.Config(**CASES[name]))
        use_lean_mlps(model)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in handle.trainable(model).values():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))  # away from the identity
        model.train()
        stats = {}
        loss, n = label_loss(model, ids, mask, labels, stats, share_prefix=share)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in handle.trainable(model).values()])
        results.append((loss.detach(), n, grads, stats.get("shared_tokens", 0)))
    (plain, n0, g0, s0), (shared_loss, n1, g1, s1) = results
    assert n0 == n1 == 6 and s0 == 0 and s1 == 10 * 2
    torch.testing.assert_close(shared_loss, plain, rtol=1e-5, atol=1e-5)
    assert g0.abs().sum() > 0
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_the_lean_mlp_replaces_the_mlp_after_a_method_wrapped_its_layers(tiny):
    """The run swaps the MLPs after inject: LoRA on every linear layer must not keep the plain MLP (it
    would save silu's input and output for backward again)."""
    from tuneforge.methods import lora

    model, _ = tiny
    lora.inject(model, lora.Config(target_modules="all-linear"))
    assert use_lean_mlps(model) == 2 and all(isinstance(layer.mlp, GatedMLP) for layer in model.model.layers)
