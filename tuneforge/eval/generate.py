"""Text generation: greedy by default, sampling on request, tokens streamed as they come."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import TextStreamer

from tuneforge.data.instruct import apply_template


def encode_prompt(tokenizer, prompt: str, raw: bool = False, system: str | None = None) -> dict[str, torch.Tensor]:
    """Token ids for one prompt: through the tokenizer's chat template when it has one, unless raw;
    ``system`` replaces the template's default system message."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]
        text = apply_template(tokenizer, messages, True, where="--prompt")  # under the render time limit
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    return dict(tokenizer(prompt, return_tensors="pt"))


class _CallbackStreamer(TextStreamer):
    """transformers' streamer, handing each finished piece of text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, raw: bool = False, system: str | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
    """Generate a reply to ``prompt`` and return it (without the prompt).

    ``temperature`` 0 decodes greedily; above 0 it samples, with nucleus ``top_p``. ``on_text``
    receives the text piece by piece as it is decoded (for a terminal, ``print(end="")``).
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encode_prompt(tokenizer, prompt, raw, system).items()}
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=tokenizer.pad_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # a model's generation_config may carry sampling defaults that greedy decoding must not see
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if on_text is not None:
        kwargs["streamer"] = _CallbackStreamer(tokenizer, on_text)
    out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
