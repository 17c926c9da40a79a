"""The Try page: a run's result on a prompt (generation, streamed) or, for a classification run, on
a text (the probability of each label, scored as the run's evaluation scores it).

The base model and the run's adapter (or the run's whole model, for full fine-tuning) are loaded
once and kept while the page keeps asking about the same run; one request uses the model at a time.
This is inference: nothing here trains. What a run's config.yaml names (the base model, the data its
labels come from) is checked as the New run form's paths are, and nothing is read through a link.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from tuneforge.core import config
from tuneforge.core.config import RunCfg
from tuneforge.data import classification_prompt, read_rows, word_ids
from tuneforge.data.classify import clean_text, default_instruction, label_names, label_words
from tuneforge.core.errors import UserError
from tuneforge.eval.classify import score_labels
from tuneforge.eval.generate import generate
from tuneforge.methods import feature_cache
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import CONFIG, load_adapter
from tuneforge.methods._shared import Injected
from tuneforge.apps.ui.runs import Runs, first_link


@dataclass
class Loaded:
    name: str
    key: tuple
    cfg: RunCfg
    model: Any
    tokenizer: Any
    handle: Any  # Injected (an adapter), a probe (a feature classifier), or None (a whole model)
    labels: list[str] | None  # classification: label names in label order
    words: list[str] | None  # and the words the model answers

    @property
    def generates(self) -> bool:
        return self.handle is None or isinstance(self.handle, Injected)

    def info(self) -> dict:
        system = None
        if self.words and self.generates:  # the question the run was trained with, so a generation answers it
            system = self.cfg.data.instruction or default_instruction(self.words)
        return {"name": self.name, "generates": self.generates, "labels": self.labels, "words": self.words,
                "system": system, "prompt_prefix": "Text: " if system else ""}


class Playground:
    """The loaded result of one run at a time; ``check(cfg, source)`` refuses a config naming files
    outside the folders the page may read."""

    def __init__(self, runs: Runs, check: Callable[[RunCfg, str], None]):
        self.runs, self.check = runs, check
        self._loaded: Loaded | None = None
        self._load_lock = threading.Lock()
        self.use_lock = threading.Lock()  # one generation or scoring at a time

    def get(self, name: str) -> Loaded:
        folder = self.runs.folder(name)
        final = folder / "final"
        if not final.is_dir() or not (folder / "config.yaml").is_file():
            raise UserError("this run has no result to try yet", self.runs.display(folder),
                            fix="choose a finished run")
        for path in (folder / "config.yaml", final):
            if (link := first_link(path)) is not None:
                raise UserError("a link in the run's folder, which this page does not follow",
                                self.runs.display(link.parent) + "/" + link.name, fix="try it from a terminal")
        key = (name, final.stat().st_mtime_ns)
        with self._load_lock:
            if self._loaded is None or self._loaded.key != key:
                self._loaded = None  # the previous model goes before the next one loads
                self._loaded = self._load(name, key, folder)
            return self._loaded

    def _load(self, name: str, key: tuple, folder) -> Loaded:
        cfg = config.from_yaml(folder / "config.yaml")
        self.check(cfg, self.runs.display(folder / "config.yaml"))
        final = folder / "final"
        if (final / CONFIG).is_file():
            model, tokenizer = load_model(cfg.model, device=cfg.train.device, allow_pickle=cfg.allow_pickle)
            handle = load_adapter(model, final)
        else:  # full fine-tuning: the result is a model directory
            model, tokenizer = load_model(str(final), device=cfg.train.device)
            handle = None
        labels = words = None
        if not (handle is None or isinstance(handle, Injected)):
            labels = words = list(handle.labels)
        elif cfg.data.format == "classification" and cfg.data.path:
            labels = label_names(read_rows(cfg.data.path, cfg.data), cfg.data)
            words = label_words(labels, cfg.data.verbalizer)
        return Loaded(name, key, cfg, model.eval(), tokenizer, handle, labels, words)

    def classify(self, name: str, text: str) -> list[dict]:
        """Each label's probability for ``text``: a softmax over the labels' scores."""
        loaded = self.get(name)
        if not loaded.labels:
            raise UserError("this run was not trained on classification data", "Try",
                            fix="generate a reply to a prompt instead")
        text = clean_text(text)
        with self.use_lock:
            if loaded.generates:
                data, tok = loaded.cfg.data, loaded.tokenizer
                prompt = classification_prompt(tok, text, data.instruction, loaded.words, data.chat_template)
                answers = [word_ids(tok, w, data.chat_template) for w in loaded.words]
                scores = score_labels(loaded.model, [prompt], answers, 1, tok.pad_token_id)[0]
            else:
                features, _ = feature_cache.extract(loaded.model, loaded.tokenizer, [text], loaded.handle.cfg)
                scores = torch.from_numpy(loaded.handle.scores(features[0]))[0]
        probs = scores.double().softmax(-1).tolist()
        return [{"label": label, "word": word, "p": p} for label, word, p in zip(loaded.labels, loaded.words, probs)]

    def generate(self, name: str, prompt: str, max_new_tokens: int, system: str | None) -> Iterator[str]:
        """The reply to ``prompt``, piece by piece as it is decoded (the checks run before the first piece)."""
        loaded = self.get(name)
        if not loaded.generates:
            raise UserError("this run's result is a feature classifier, which labels texts and does not generate",
                            "Try", fix="score a text with it instead")
        return self._stream(loaded, prompt, max_new_tokens, system)

    def _stream(self, loaded: Loaded, prompt: str, max_new_tokens: int, system: str | None) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()

        def work():
            try:
                with self.use_lock:
                    generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             system=system or None, on_text=pieces.put)
            except Exception as exc:  # noqa: BLE001 - said on the page, and the server goes on
                pieces.put(f"\n[generation failed: {exc}]")
            finally:
                pieces.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (piece := pieces.get()) is not done:
            yield piece
