"""tuneforge's preference losses against TRL's own code, on one batch of the tiny model.

TRL is the reference here only (the package never imports it). For each objective its trainer is built
on the tiny model, its own collator pads a batch of its processed dataset, and its own loss computation
runs on it; tuneforge's ``objectives.make`` runs on the same tokens. tuneforge's examples are built
from TRL's token ids, so that what is compared is the loss math, not the tokenization: TRL's ORPO and
CPO put BOS before the prompt where tuneforge's text rows have none (for DPO, where both read raw
text the same way, a check shows tuneforge's own tokenization gives the same ids). Both sides run
the same weights in eval mode (the tiny llama has no dropout) in float32. Each comparison also shows
it can fail: a changed setting moves tuneforge's loss away from TRL's."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (TRL depends on datasets)

from conftest import make_tiny_model, make_tiny_tokenizer  # noqa: E402
from tuneforge.core.config import DataCfg, TrainCfg  # noqa: E402
from tuneforge.data.preference import PreferencePair, RowsCollator, Unpaired, pair_of, unpaired  # noqa: E402
from tuneforge.data.readers import Row  # noqa: E402
from tuneforge.training import objectives  # noqa: E402

# Prompts and answers of different lengths, so that rows are padded and the chosen and rejected
# answer of a pair differ in length.
ROWS = [
    {"prompt": "Q: what colour is the sky?", "chosen": " Blue.", "rejected": " Green, mostly, on a Tuesday."},
    {"prompt": "Say hi", "chosen": " Hello there, friend!", "rejected": " No."},
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5, or maybe 22"},
]
# KTO's unpaired rows: desirable and undesirable mixed, so each kind has a KL row of the other.
KTO_ROWS = [
    {"prompt": "Q: what colour is the sky?", "completion": " Blue.", "label": True},
    {"prompt": "Say hi", "completion": " No.", "label": False},
    {"prompt": "2+2=", "completion": " 4", "label": True},
    {"prompt": "Name a fruit:", "completion": " A hammer, obviously.", "label": False},
    {"prompt": "Capital of France?", "completion": " Paris", "label": True},
]
TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """(tokenizer, policy, reference): the reference is the tiny model, the policy the same with every
    weight moved a little, so that the log-ratios are not all 0."""
    tok = make_tiny_tokenizer()
    reference = make_tiny_model(len(tok))
    policy = copy.deepcopy(reference)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return tok, policy, reference


def trl_batch(trainer) -> dict:
    """TRL's collator on its whole processed training set, in order: one batch."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def args(config, tmp_path, batch_size: int, **settings):
    """TRL's settings for one batch of ``batch_size``, in float32 (TRL's configs default to bf16, under
    which accelerate runs the reference model's forward in autocast)."""
    return config(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=batch_size, max_length=512, **settings)


def ours(cfg: TrainCfg, examples: list, tok, policy, reference=None, share: bool = False) -> tuple[float, dict]:
    """tuneforge's loss on ``examples`` as one batch, and its metrics, both as means over the units."""
    def ref(batch: dict, share: bool) -> torch.Tensor:
        return objectives.sequence_logprobs(reference, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            share, None, groups=2)[0]

    loss = objectives.make(cfg, ref if reference is not None else None)
    batch = RowsCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        total, metrics = loss.loss(policy, batch, share, {})
    units = loss.units(batch)
    return total.item() / units, {k: v / units for k, v in metrics.items()}


def pairs_of(ids) -> list[PreferencePair]:
    """Pairs from (prompt, chosen, rejected) token ids, every answer token carrying the loss."""
    return [PreferencePair(prompt, chosen, rejected, chosen, rejected) for prompt, chosen, rejected in ids]


def check(cfg, theirs: float, examples, tok, policy, reference=None, moved: dict | None = None) -> dict:
    """tuneforge's loss equals TRL's (with and without the shared prompt), and a changed setting does
    not: returns tuneforge's metrics."""
    for share in (False, True):
        loss, metrics = ours(cfg, examples, tok, policy, reference, share)
        name = f"dpo/{cfg.loss_type}" if cfg.objective == "dpo" else cfg.objective
        print(f"{name} share={share}: tuneforge {loss:.8f} TRL {theirs:.8f} diff {loss - theirs:.2e}")
        assert loss == pytest.approx(theirs, abs=TOL)
    other, _ = ours(dataclasses.replace(cfg, **(moved or {"beta": 2 * cfg.beta})), examples, tok, policy, reference)
    assert abs(other - theirs) > 1e-3
    return metrics


def same_rewards(metrics: dict, theirs: dict) -> None:
    """TRL's reward figures of the batch. A reward is beta times a difference of summed log-probabilities
    near 100 in size, which float32 leaves ~1e-5 apart: compared to a relative 1e-4."""
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies")):
        assert metrics[ours_key] == pytest.approx(theirs[trl_key], rel=1e-4, abs=TOL), ours_key


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 1.0)])
def test_dpo_matches_trl(tmp_path, models, loss_type, beta):
    # IPO at beta 1: its loss is near (1 / (2 beta))^2, which a small beta makes bury the pairs' part
    from trl import DPOConfig, DPOTrainer

    tok, policy, reference = models
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tok,
                         args=args(DPOConfig, tmp_path, len(ROWS), beta=beta, loss_type=[loss_type]),
                         train_dataset=Dataset.from_list(ROWS))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trl_batch(trainer)).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    processed = [trainer.train_dataset[i] for i in range(len(ROWS))]
    for row, trl_row in zip(ROWS, processed):  # raw text: tuneforge's own tokens are TRL's
        pair, _ = pair_of(Row(row, "rows:1"), tok, DataCfg(max_length=512))
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == \
            (trl_row["prompt_ids"], trl_row["chosen_ids"], trl_row["rejected_ids"])
    at_reference = math.log(2) if loss_type == "sigmoid" else 1 / (2 * beta) ** 2
    assert abs(theirs - at_reference) > 1e-3  # the policy is not the reference
    metrics = check(TrainCfg(objective="dpo", beta=beta, loss_type=loss_type), theirs,
                    pairs_of((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in processed),
                    tok, policy, reference)
    same_rewards(metrics, trl_metrics)


def orpo_cpo_pairs(trainer) -> list[PreferencePair]:
    """The pairs of ORPO's and CPO's processed rows (BOS, prompt, answer, EOS), whose labels are the answer's."""
    out = []
    for r in (trainer.train_dataset[i] for i in range(len(trainer.train_dataset))):
        n = len(r["prompt_input_ids"])
        assert r["chosen_input_ids"][:n] == r["rejected_input_ids"][:n] == r["prompt_input_ids"]
        for answer in ("chosen", "rejected"):
            assert r[f"{answer}_labels"] == [-100] * n + r[f"{answer}_input_ids"][n:]
        out.append((r["prompt_input_ids"], r["chosen_input_ids"][n:], r["rejected_input_ids"][n:]))
    return pairs_of(out)


def test_orpo_matches_trl(tmp_path, models):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, policy, _ = models
    trainer = ORPOTrainer(model=copy.deepcopy(policy), processing_class=tok, train_dataset=Dataset.from_list(ROWS),
                          args=args(ORPOConfig, tmp_path, len(ROWS), beta=0.1, remove_unused_columns=False))
    with torch.no_grad():
        theirs, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch(trainer))
    metrics = check(TrainCfg(objective="orpo", beta=0.1), theirs.item(), orpo_cpo_pairs(trainer), tok, policy)
    same_rewards(metrics, trl_metrics)
    assert metrics["nll"] == pytest.approx(trl_metrics["nll_loss"], abs=TOL)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_matches_trl(tmp_path, models, cpo_alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, policy, _ = models
    settings = dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=cpo_alpha)
    trainer = CPOTrainer(model=copy.deepcopy(policy), processing_class=tok, train_dataset=Dataset.from_list(ROWS),
                         args=args(CPOConfig, tmp_path, len(ROWS), loss_type="simpo", remove_unused_columns=False,
                                   **settings))
    with torch.no_grad():
        theirs, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch(trainer))
    metrics = check(TrainCfg(objective="simpo", **settings), theirs.item(), orpo_cpo_pairs(trainer), tok, policy,
                    moved={"simpo_gamma": 0.0})
    same_rewards(metrics, trl_metrics)


def test_kto_matches_trl(tmp_path, models):
    from trl import KTOConfig, KTOTrainer

    tok, policy, reference = models
    n = len(KTO_ROWS)
    settings = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tok,
                         args=args(KTOConfig, tmp_path, n, **settings), train_dataset=Dataset.from_list(KTO_ROWS))
    processed = [trainer.train_dataset[i] for i in range(n)]
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trl_batch(trainer)).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    # TRL's examples in TRL's order; tuneforge's ``unpaired`` gives each the KL answer TRL gave it.
    examples = unpaired([Unpaired(r["prompt_ids"], r["completion_ids"], r["completion_ids"], r["label"])
                         for r in processed], n)
    assert [e.kl_ids for e in examples] == [r["KL_completion_ids"] for r in processed]
    metrics = check(TrainCfg(objective="kto", batch_size=n, **settings), theirs, examples, tok, policy, reference)
    good = sum(r["label"] for r in KTO_ROWS)
    # tuneforge reports the mean reward signed by its label; TRL the mean reward of each kind
    signed = (trl_metrics["rewards/chosen"] * good - trl_metrics["rewards/rejected"] * (n - good)) / n
    assert metrics["rewards_signed"] == pytest.approx(signed, abs=TOL)
    # z is a mean of differences of summed log-probabilities near 100 in size: float32 leaves ~1e-5
    assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-4) and metrics["kl"] > 0.1  # z is not clamped
