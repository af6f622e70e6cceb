"""Load a medtune model (base, merged, or LoRA adapter on its base) and generate Starling-format replies.

Shared by the terminal chat, the HTTP server and evaluation. Prompts are built with
`medtune.chat_format.encode_messages`, so typed special tokens stay plain text, and generation stops at the
`<|end_of_turn|>` id.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from medtune import model as medtune_model
from medtune.adapters import adapter_base, is_adapter
from medtune.chat_format import END_OF_TURN, GREEDY_TEMPERATURE, encode_messages

Messages = Sequence[Mapping[str, str]]
DEMO_MODEL = ".cache/tiny-starling"


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-turn generated) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_inference_tokenizer(path: str | Path, fallback: str | Path | None = None):
    """Starling tokenizer from `path` (an adapter folder carries one) or else `fallback`; left padding for
    generation."""
    try:
        tok = medtune_model.load_tokenizer(path)
    except (OSError, ValueError):
        if fallback is None:
            raise
        tok = medtune_model.load_tokenizer(fallback)
    tok.padding_side = "left"
    return tok


def load_for_inference(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                       base_model: str | None = None):
    """(model, tokenizer) for a base/merged model folder or a LoRA adapter folder.

    An adapter is loaded on top of its base (un-merged, un-quantised); `base_model` overrides the base path
    recorded in adapter_config.json (e.g. when the base was moved). `dtype` None or "auto": bf16 (fp16 without bf16)
    on a GPU, fp32 on CPU.
    """
    device = device or default_device()
    if dtype in (None, "auto"):
        dtype = medtune_model.compute_dtype("auto") if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if is_adapter(path):
        from peft import PeftModel

        base = base_model or adapter_base(path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(path))
        tok = load_inference_tokenizer(path, fallback=base)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = load_inference_tokenizer(path)
    model.to(device).eval()
    return model, tok


def load_for_inference_or_demo(path: str | Path | None, device: str | None = None, dtype: str | None = None):
    """load_for_inference(path), or without a path the tiny random demo model (built on first use)."""
    if path is None:
        from medtune.tiny import build_tiny_model

        logging.getLogger(__name__).warning("no model given: using the tiny random demo model (it answers gibberish)")
        path = build_tiny_model(DEMO_MODEL)
    return load_for_inference(path, device=device, dtype=dtype)


def _generate_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    # min_new_tokens=1: a reply that ends before its first token is never useful to the person asking.
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=1, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    if temperature >= GREEDY_TEMPERATURE:
        return dict(kwargs, do_sample=True, temperature=temperature, top_p=top_p)
    # Greedy: neutralise sampling defaults a model's generation_config may carry.
    return dict(kwargs, do_sample=False, temperature=None, top_p=None, top_k=None)


def left_padded(tok, prompts: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Left-padded token id lists (generation continues from the right edge)."""
    enc = tok.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _reply(tok, new_ids: list[int]) -> tuple[str, str, int]:
    """Reply text without the end-of-turn (and the padding after it), finish reason, and token count."""
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    if eot in new_ids:
        new_ids = new_ids[: new_ids.index(eot)]
        return tok.decode(new_ids, skip_special_tokens=True).strip(), "stop", len(new_ids) + 1
    return tok.decode(new_ids, skip_special_tokens=True).strip(), "length", len(new_ids)


@torch.inference_mode()
def complete(model, tok, conversations: Sequence[Messages], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0) -> list[Completion]:
    """Replies with finish reasons and token counts for a batch of conversations."""
    prompts = [encode_messages(tok, c) for c in conversations]
    batch = left_padded(tok, prompts, model.device)
    out = model.generate(**batch, **_generate_kwargs(tok, max_new_tokens, temperature, top_p))
    width = batch["input_ids"].shape[1]
    completions = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        text, reason, n = _reply(tok, row)
        completions.append(Completion(text, reason, len(prompt), n))
    return completions


def generate(model, tok, conversations: Sequence[Messages], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Reply texts (without `<|end_of_turn|>`) for a batch of conversations; greedy below GREEDY_TEMPERATURE."""
    return [c.text for c in complete(model, tok, conversations, max_new_tokens, temperature, top_p)]


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also keeps the generated ids (for the finish reason and usage)."""

    def __init__(self, tok, **kwargs):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.new_ids: list[int] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.new_ids += value.reshape(-1).tolist()
        super().put(value)


class TextStream:
    """Iterator over reply text pieces, generated in a background thread.

    After exhaustion `finish_reason` and `completion_tokens` are set. `close()` stops the generation early
    (e.g. when an HTTP client disconnects) and waits for the thread.
    """

    def __init__(self, model, tok, messages: Messages, max_new_tokens: int, temperature: float, top_p: float):
        self.tok = tok
        prompt = encode_messages(tok, messages)
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._streamer = _CountingStreamer(tok)
        self._started = self._done = False
        kwargs = dict(
            left_padded(tok, [prompt], model.device), **_generate_kwargs(tok, max_new_tokens, temperature, top_p),
            streamer=self._streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(self._stop)]),
        )
        self._thread = threading.Thread(target=self._run, args=(model, kwargs), daemon=True)
        self._thread.start()

    def _run(self, model, kwargs) -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = e
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        for piece in self._streamer:
            if not self._started:  # Starling replies begin with a space after "Assistant:"
                piece = piece.lstrip()
                self._started = bool(piece)
            if piece:
                return piece
        self._finish()
        raise StopIteration

    def _finish(self) -> None:
        self._done = True
        self._thread.join()
        if self._error is not None:
            raise self._error
        _, self.finish_reason, self.completion_tokens = _reply(self.tok, self._streamer.new_ids)

    def close(self) -> None:
        if self._done:
            return
        self._stop.set()
        self._done = True
        for _ in self._streamer:  # wait for the end signal so the queue is left empty
            pass
        self._thread.join()
        self.completion_tokens = len(self._streamer.new_ids)


def stream(model, tok, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0) -> TextStream:
    """Reply text pieces as they are generated (a `TextStream`, an Iterator[str])."""
    return TextStream(model, tok, messages, max_new_tokens, temperature, top_p)
