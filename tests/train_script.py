"""Run by tests/test_train.py in a child process: trains the tiny model, optionally killing itself
with SIGKILL right after a given step (a crash with no chance to clean up)."""

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model  # noqa: E402
from test_train import VOCAB, collate, synthetic_examples  # noqa: E402

from tuneforge.core.config import TrainCfg  # noqa: E402
from tuneforge.methods import full  # noqa: E402
from tuneforge.training.loop import train  # noqa: E402

out, kill_after, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
model = make_tiny_model(VOCAB, seed=1)
model.config.attention_dropout = 0.2  # dropout makes the result depend on the restored RNG state
for layer in model.model.layers:
    layer.self_attn.attention_dropout = 0.2
params = full.inject(model, full.Config()).trainable(model)
cfg = TrainCfg(batch_size=4, grad_accum=2, max_steps=8, save_steps=2, learning_rate=1e-3, warmup_steps=2,
               seed=3, keep_checkpoints=3)


def on_step(step: int) -> None:
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


train(model, params, synthetic_examples(40), collate, cfg, out, resume=resume, on_step=on_step, progress=False)
save_file({k: v.detach().contiguous() for k, v in params.items()}, str(out / "weights.safetensors"))
