"""In-context learning: prompt layouts, demonstration choice, label scoring against a hand-computed
log-likelihood, contextual calibration on hand-made numbers, and generation metrics."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.data import classification_prompt, word_ids
from tuneforge.core.errors import UserError
from tuneforge.eval.classify import score_labels
from tuneforge.eval.fewshot import (build_prompt, calibrate, exact_match, rouge_l, run_generation_icl, run_icl,
                                    select_demos)

WORDS = ["negative", "positive"]
DEMOS = [("awful plot", "negative"), ("lovely cast", "positive")]
POOL = (["dull", "grim", "bleak", "sad", "fun", "warm", "bright"], [0, 0, 0, 0, 1, 1, 1])


def test_build_prompt_modes(tiny_tokenizer):
    tok = tiny_tokenizer
    chat = tok.decode(build_prompt(tok, "the query", DEMOS, None, WORDS, "chat"))
    turns = tok.decode(build_prompt(tok, "the query", DEMOS, None, WORDS, "chat_turns"))
    raw = tok.decode(build_prompt(tok, "the query", DEMOS, None, WORDS, "raw"))
    for text in (chat, turns, raw):
        assert "awful plot" in text and "lovely cast" in text and "Text: the query" in text
    # chat: one user message holding the answered demonstrations, the answer opens the assistant turn
    assert chat.count("<|im_start|>user") == 1 and chat.count("<|im_start|>assistant") == 1
    assert "Text: awful plot\nAnswer: negative\n\nText: lovely cast\nAnswer: positive\n\nText: the query" in chat
    assert chat.endswith("Text: the query<|im_end|>\n<|im_start|>assistant\n")
    # both chat modes: the question once, as the system message
    assert chat.startswith("<|im_start|>system\nIs the sentiment") and chat.count("Is the sentiment") == 1
    # chat_turns: each demonstration a user/assistant pair
    assert turns.startswith("<|im_start|>system\nIs the sentiment") and turns.count("Is the sentiment") == 1
    assert turns.count("<|im_start|>user") == 3 and turns.count("<|im_start|>assistant") == 3
    assert "<|im_start|>assistant\nnegative<|im_end|>" in turns
    # raw: no template at all, the answer after "Answer:"
    assert "<|im_start|>" not in raw and raw.endswith("Text: the query\nAnswer:")
    assert "Text: awful plot\nAnswer: negative\n\n" in raw
    assert len({chat, turns, raw}) == 3


def test_zero_shot_is_the_training_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    for mode, template in (("chat", True), ("chat_turns", True), ("raw", False)):
        assert build_prompt(tok, "fine", [], None, WORDS, mode) == \
            classification_prompt(tok, "fine", None, WORDS, chat_template=template)


def test_chat_modes_need_a_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(UserError, match="raw"):
        build_prompt(tiny_tokenizer, "x", DEMOS, None, WORDS, "chat")
    with pytest.raises(UserError, match="mode"):
        build_prompt(tiny_tokenizer, "x", DEMOS, None, WORDS, "chatty")


@pytest.mark.parametrize("words", [WORDS, ["a", "b"]])  # several answer tokens, and one (the batched path)
def test_label_scores_equal_hand_computed_loglikelihood(tiny, words):
    model, tok = tiny
    demos = [("awful plot", words[0]), ("lovely cast", words[1])]
    prompts = [build_prompt(tok, q, demos, None, words, "chat") for q in ("great", "a longer query text")]
    answers = [word_ids(tok, w) for w in words]
    assert (max(map(len, answers)) > 1) == (words == WORDS)
    scores = score_labels(model, prompts, answers, batch_size=3, pad_id=tok.pad_token_id)
    for i, prompt in enumerate(prompts):
        for j, answer in enumerate(answers):
            with torch.no_grad():  # one forward of the full sequence, log_softmax, sum over the word's tokens
                logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            expected = sum(logp[len(prompt) + t - 1, tok_id] for t, tok_id in enumerate(answer))
            assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4)


def test_calibration_divides_out_a_biased_prior():
    p = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    p_cf = torch.tensor([[0.85, 0.15], [0.75, 0.25]])  # averages to a prior of (0.8, 0.2)
    scores = p.log() - 3.0  # unnormalized: only the ratio between the words counts
    out = calibrate(scores, p_cf.log() + torch.tensor([[-1.0], [2.0]]))
    expected = torch.log(p / torch.tensor([0.8, 0.2]))  # [[0.75, 2.0], [1.125, 0.5]]
    torch.testing.assert_close(out, expected.double())
    assert scores.argmax(1).tolist() == [0, 0] and out.argmax(1).tolist() == [1, 0]  # the first flips
    assert math.isclose(calibrate([[0.0, 0.0]], [[0.0, 0.0]])[0, 0].item(), 0.0)  # no prior: no change


def test_random_demos_seeded_and_balanced():
    a = select_demos(POOL, 4, "random", seed=0)
    assert a == select_demos(POOL, 4, "random", seed=0) and len(set(a)) == 4
    assert sorted(POOL[1][i] for i in a) == [0, 0, 1, 1]
    assert any(select_demos(POOL, 4, "random", seed=s) != a for s in range(1, 5))
    three = [POOL[1][i] for i in select_demos(POOL, 3, "random", seed=1)]
    assert sorted(three) in ([0, 0, 1], [0, 1, 1])
    assert sorted(POOL[1][i] for i in select_demos(POOL, 7, "random", seed=2)) == sorted(POOL[1])  # all of it
    with pytest.raises(UserError, match="pool holds 7"):
        select_demos(POOL, 8, "random")


def test_nearest_demos_by_cosine():
    pool_emb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [-1, 0, 0], [0, 0.2, 1], [0, 1, 1]])
    query = torch.tensor([[2.0, 0.1, 0], [0, 0, 5]])
    got = select_demos(POOL, 2, "nearest", query_embeddings=query, pool_embeddings=pool_emb)
    assert got == [[3, 0], [5, 2]]  # the most similar last, next to the query


def test_run_icl_matches_scoring_by_hand(tiny, tmp_path):
    model, tok = tiny
    items = (["nice", "poor", "okay film", "meh"], [1, 0, 1, 0])
    out = run_icl(model, tok, items, POOL, WORDS, k=2, mode="raw", strategy="random", calibrate=True, seed=3)
    assert {"accuracy", "macro_f1", "n", "k", "mode", "strategy", "calibrated", "seed", "seconds",
            "accuracy_uncalibrated", "macro_f1_uncalibrated"} <= out.keys() and out["n"] == 4
    demos = [(POOL[0][i], WORDS[POOL[1][i]]) for i in select_demos(POOL, 2, "random", 3)]
    answers = [word_ids(tok, w, chat_template=False) for w in WORDS]
    assert tok.decode(answers[1]) == " positive"
    prompts = [build_prompt(tok, t, demos, None, WORDS, "raw") for t in items[0]]
    scores = score_labels(model, prompts, answers, pad_id=tok.pad_token_id)
    cf = score_labels(model, [build_prompt(tok, c, demos, None, WORDS, "raw") for c in ("N/A", "", "[MASK]")],
                      answers, pad_id=tok.pad_token_id)
    gold = torch.tensor(items[1])
    assert out["accuracy_uncalibrated"] == (scores.argmax(1) == gold).float().mean().item()
    assert out["accuracy"] == (calibrate(scores, cf).argmax(1) == gold).float().mean().item()
    near = run_icl(model, tok, items, POOL, WORDS, k=2, mode="chat_turns", strategy="nearest", calibrate=True,
                   cache_dir=tmp_path)
    # by hand: each query's two nearest pool texts by mean-pooled last hidden state, its own calibration
    embed = lambda texts: torch.stack([  # noqa: E731
        model(torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        for t in texts]).detach()
    sets = select_demos(POOL, 2, "nearest", query_embeddings=embed(items[0]), pool_embeddings=embed(POOL[0]))
    correct = 0
    for text, label, chosen in zip(*items, sets):
        demos = [(POOL[0][i], WORDS[POOL[1][i]]) for i in chosen]
        prompt = lambda t: build_prompt(tok, t, demos, None, WORDS, "chat_turns")  # noqa: E731
        answers = [word_ids(tok, w) for w in WORDS]
        s = score_labels(model, [prompt(text)], answers, pad_id=tok.pad_token_id)
        cf = score_labels(model, [prompt(c) for c in ("N/A", "", "[MASK]")], answers, pad_id=tok.pad_token_id)
        correct += int(calibrate(s, cf).argmax(1).item() == label)
    assert near["n"] == 4 and near["accuracy"] == correct / 4


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(2 * 5 / 12)
    assert rouge_l("a b c d", "b d") == pytest.approx(2 * 2 / 6)  # LCS "b d": P = 1/2, R = 1
    assert rouge_l("x y", "z") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0
    assert exact_match(" Paris\n", "paris") and not exact_match("Paris.", "Paris")


def test_generation_icl_is_greedy_decoding_scored_against_the_reference(tiny):
    model, tok = tiny
    pool = (["1+1?", "3+3?"], ["2", "6"])
    out = run_generation_icl(model, tok, (["2+2?"], ["4"]), pool, k=1, max_new_tokens=3)
    demos = [(pool[0][i], pool[1][i]) for i in select_demos((pool[0], [0, 0]), 1, "random", 0)]
    ids = torch.tensor([build_prompt(tok, "2+2?", demos, None, None, "chat")])
    with torch.no_grad():  # three greedy steps by hand, no cache
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0, -3:], skip_special_tokens=True).split("\nText:")[0].strip()
    assert out["n"] == 1 and out["predictions"] == [expected]
    assert out["rouge_l"] == rouge_l(expected, "4") and out["exact_match"] == float(exact_match(expected, "4"))


@pytest.mark.real
def test_zero_shot_on_movie_reviews(real_model, data_dir):
    from tuneforge.core.config import DataCfg
    from tuneforge.data.classify import clean_text, label_of
    from tuneforge.data.readers import read_rows, shuffled

    cfg = DataCfg(columns=["id", "score", "text"], label_column="score", score_thresholds=[-1.0, 1.0])
    rows = shuffled(read_rows(data_dir / "sentiment" / "movie_review_snippets.tsv", cfg), seed=0)
    kept = [(clean_text(r["text"]), label_of(r, cfg, WORDS)) for r in rows[:40]]
    texts, labels = zip(*[(t, y) for t, y in kept if y is not None][:20])
    model, tok = real_model
    # Calibrated: uncalibrated, this small model leans towards "negative" (0.6 on these 20).
    out = run_icl(model, tok, (list(texts), list(labels)), ([], []), WORDS, k=0, mode="chat", calibrate=True,
                  batch_size=16)
    assert out["n"] == 20 and out["accuracy"] > 0.6, out


def test_a_prompt_longer_than_the_models_context_is_refused_in_one_line(tiny):
    """GPT-2 and OPT learn a table of positions: past its end a prompt crashes with an index error."""
    model, tok = tiny
    model.config.max_position_embeddings = 24
    items = (["a long enough film review to pass the limit"], [1])
    with pytest.raises(UserError, match="2-shot prompt with its answer is .* tokens, and the model takes at most 24"):
        run_icl(model, tok, items, POOL, WORDS, k=2, mode="raw", strategy="random", seed=3)
