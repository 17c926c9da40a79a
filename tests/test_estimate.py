
from tuneforge import config
from tuneforge.estimate import estimate


def test_estimate_counts_parameters_and_memory_without_loading_weights(tiny_dir):
    cfg = config.from_dict({"model": str(tiny_dir), "data": {"max_length": 32}, "train": {"batch_size": 2}})
    est = estimate(cfg, n_examples=10, flops_per_s=1e9)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    n = sum(p.numel() for p in model.parameters())
    assert est.total_params == est.trainable_params == n
    assert 4 * n <= est.weight_bytes < 4 * n + 1024  # parameters, plus small buffers (rotary frequencies)
    assert est.train_state_bytes == 12 * n  # gradient + two AdamW moments
    assert est.steps == 5 and est.tokens_per_step == 64 and est.seconds_per_step > 0
    assert "trainable" in est.describe()


def test_freezing_layers_lowers_the_estimate(tiny_dir):
    base = {"model": str(tiny_dir)}
    all_layers = estimate(config.from_dict(base), flops_per_s=1e9)
    frozen = estimate(config.from_dict({**base, "method": {"name": "full", "freeze_layers": 1}}), flops_per_s=1e9)
    assert frozen.trainable_params < all_layers.trainable_params
    assert frozen.seconds_per_step < all_layers.seconds_per_step
    assert frozen.peak_bytes < all_layers.peak_bytes
