"""Starling-LM (OpenChat 3.5) chat format, shared by training, evaluation, chat and serving.

    GPT4 Correct User: {user}<|end_of_turn|>GPT4 Correct Assistant: {reply}<|end_of_turn|>

Turn boundaries are the `<|end_of_turn|>` token *id*. Text supplied by a person (a dataset row, a chat message)
is tokenized with `split_special_tokens=True`, so a typed "<|end_of_turn|>" stays plain text and can never
become the boundary id; only the template itself inserts special ids.

Also here, for the same users and with nothing heavy to import: the default system prompt of the chat commands and
the temperature below which a request means greedy decoding.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

END_OF_TURN = "<|end_of_turn|>"
PAD_TOKEN = "<|pad_0|>"
USER_PREFIX = "GPT4 Correct User: "
ASSISTANT_PREFIX = "GPT4 Correct Assistant:"
SYSTEM_PREFIX = "GPT4 Correct System: "
ROLE_PREFIX = {"system": SYSTEM_PREFIX, "user": USER_PREFIX, "assistant": ASSISTANT_PREFIX + " "}

# Jinja chat template equivalent to `render_messages`, stored in tokenizer_config.json so that
# `tokenizer.apply_chat_template` and any OpenAI-style server produce the same prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'GPT4 Correct System: ' + message['content'] + '<|end_of_turn|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'GPT4 Correct User: ' + message['content'] + '<|end_of_turn|>' }}"
    "{% else %}{{ 'GPT4 Correct Assistant: ' + message['content'] + '<|end_of_turn|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

# Temperatures below this mean greedy decoding: dividing logits by a tiny temperature overflows to inf/nan. vLLM
# uses the same bound (_SAMPLING_EPS = 1e-5 in vllm/sampling_params.py).
GREEDY_TEMPERATURE = 1e-5
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical assistant for symptom consultation. Ask for missing details that matter (age, "
    "how long, how severe, other symptoms, medicines, known conditions), explain the likely causes in plain "
    "language, suggest safe self-care, and say when and where to seek care. You are not a doctor and cannot "
    "diagnose. If the symptoms could be an emergency (chest pain, trouble breathing, signs of stroke, severe "
    "bleeding, thoughts of self-harm), tell the person to call emergency services now."
)


def user_message(instruction: str, input_text: str = "") -> str:
    """The user turn for a MedTuned row: the instruction, then the input (if any) after a blank line."""
    instruction, input_text = instruction.strip(), input_text.strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def with_system_prompt(messages: Sequence[Mapping[str, str]], system_prompt: str) -> list[dict]:
    """The conversation with `system_prompt` first, unless it already has a system message."""
    messages = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_messages(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Display form of a conversation (OpenAI-style role/content dicts)."""
    text = "".join(f"{ROLE_PREFIX[m['role']]}{m['content']}{END_OF_TURN}" for m in messages)
    return text + (ASSISTANT_PREFIX if add_generation_prompt else "")


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, with special-token spellings in the text encoded as ordinary pieces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # The Rust tokenizer directly, with the switch that `split_special_tokens=True` sets: encode_batch_fast skips
    # the character offsets and transformers' per-row dict conversion, ~20% of tokenizing 200k rows. Like
    # transformers, set the switch only when it differs (every transformers call sets it for itself again), so
    # that concurrent callers (the server) do not write it while another encodes.
    if not backend.encode_special_tokens:
        backend.encode_special_tokens = True
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _text_ids(tokenizer, text: str) -> list[int]:
    return _batch_ids(tokenizer, [text])[0]


def _turn_ids(tokenizer, role: str, content: str, eot_id: int) -> list[int]:
    return _text_ids(tokenizer, ROLE_PREFIX[role] + content) + [eot_id]


def encode_examples(tokenizer, rows: Sequence[Mapping[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and completion mask (1 on the assistant reply and its end-of-turn) for training rows.

    Batched: one tokenizer call for all user turns and one for all replies, which is what makes tokenizing
    ~200k rows take seconds rather than minutes.
    """
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    users = _batch_ids(tokenizer, [USER_PREFIX + user_message(r["instruction"], r.get("input") or "") for r in rows])
    replies = _batch_ids(tokenizer, [" " + r["output"].strip() for r in rows])
    assistant = _text_ids(tokenizer, ASSISTANT_PREFIX)
    out = []
    for user, reply in zip(users, replies):
        prompt = [tokenizer.bos_token_id] + user + [eot] + assistant
        out.append((prompt + reply + [eot], [0] * len(prompt) + [1] * (len(reply) + 1)))
    return out


def encode_example(tokenizer, row: Mapping[str, str]) -> tuple[list[int], list[int]]:
    """`encode_examples` for a single row."""
    return encode_examples(tokenizer, [row])[0]


def encode_messages(tokenizer, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a conversation, ready for generation (ends with 'GPT4 Correct Assistant:')."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    ids = [tokenizer.bos_token_id]
    for m in messages:
        if m["role"] not in ROLE_PREFIX:
            raise ValueError(f"unknown role {m['role']!r}: use one of {sorted(ROLE_PREFIX)}")
        ids += _turn_ids(tokenizer, m["role"], m["content"], eot)
    if add_generation_prompt:
        ids += _text_ids(tokenizer, ASSISTANT_PREFIX)
    return ids
