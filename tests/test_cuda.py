"""The CUDA path: the same code on a GPU, with bf16 autocast and fused AdamW, against the CPU in fp32.
Skipped where there is no GPU; bench/gpu.sh runs it on one."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from test_train import VOCAB, collate, synthetic_examples
from tuneforge.core.config import TrainCfg
from tuneforge.eval.lm import label_loss
from tuneforge.model.kernels import head_logprobs, lora_update, use_lean_modules
from tuneforge.methods import lora, qlora
from tuneforge.training.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_kernels_on_the_gpu_equal_the_cpu():
    torch.manual_seed(0)
    result, x = torch.randn(3, 5, 12), torch.randn(3, 5, 16)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    cpu = lora_update(result, x, A, B, 2.0, 0.0)
    gpu = lora_update(*(t.cuda() for t in (result, x, A, B)), 2.0, 0.0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    head = torch.nn.Linear(16, 50)
    h, t = torch.randn(7, 16), torch.randint(0, 50, (7, 2))
    torch.testing.assert_close(head_logprobs(h.cuda(), head.cuda(), t.cuda(), chunk=3).cpu(),
                               head_logprobs(h, head.cpu(), t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_lora_step_on_the_gpu_matches_the_cpu(precision):
    rows = synthetic_examples(8)
    losses = {}
    for device in ("cpu", "cuda"):
        model = make_tiny_model(VOCAB, seed=1).to(device)
        handle = lora.inject(model, lora.Config(r=4, target_modules="all-linear", init_lora_weights=False))
        use_lean_modules(model)
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16" and device == "cuda"):
            loss, n = label_loss(model, **batch)
        (loss / n).backward()
        losses[device] = (loss.item() / n, torch.cat([p.grad.flatten().cpu() for p in handle.trainable(model).values()]))
    tol = 1e-4 if precision == "fp32" else 3e-2
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=tol)
    torch.testing.assert_close(losses["cuda"][1], losses["cpu"][1], rtol=tol * 10, atol=tol)


def test_training_on_the_gpu_lowers_the_loss_with_fused_adamw_and_bf16(tmp_path):
    model = make_tiny_model(VOCAB, seed=1).cuda()
    handle = qlora.inject(model, qlora.Config(r=8, target_modules="all-linear"))
    rows = synthetic_examples(16)
    batch = {k: v.cuda() for k, v in collate(rows).items()}
    with torch.no_grad():
        before = label_loss(model, **batch)[0].item()
    summary = train(model, handle.trainable(model), rows, collate,
                    TrainCfg(batch_size=8, max_steps=8, learning_rate=2e-2, precision="bf16", device="cuda"),
                    tmp_path, progress=False)
    with torch.no_grad():
        after = label_loss(model, **batch)[0].item()
    assert after < before and summary.peak_memory_mb > 0
