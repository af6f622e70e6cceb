"""One chat format per tokenizer (medtune.inference.chat_format): training ids equal the tokenizer's
apply_chat_template, masks
cover exactly the assistant turns and their end-of-turn, typed control tokens stay text; for four template families.
Starling's ids are checked against the ids its card publishes and the ids OpenChat's training code produces, Mistral's
against mistral-common."""

from __future__ import annotations

import pytest

from medtune.inference.chat_format import ChatFormat, ChatFormatError, RowError, user_message

from families import CONTROL_TEXT, END_OF_TURN, FAMILIES, tokenizer, trl_template

SYSTEM = {"role": "system", "content": "You are a careful medical assistant."}
TURNS = [
    {"role": "user", "content": "I have had a headache for two days."},
    {"role": "assistant", "content": "Do you also have a fever or a stiff neck?"},
    {"role": "user", "content": "A fever of 38.5 °C, no stiff neck."},
    {"role": "assistant", "content": "Rest, drink water, and see a doctor if it gets worse."},
]
CONVERSATIONS = [TURNS[:2], TURNS, [SYSTEM, *TURNS[:2]], [SYSTEM, *TURNS]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def fmt(family) -> ChatFormat:
    return ChatFormat(tokenizer(family))


def supervised_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def test_user_turn_is_the_instruction_a_blank_line_and_the_input():
    assert user_message("Classify the relationship.", "Premise: fever.\nHypothesis: infection.") == (
        "Classify the relationship.\n\nPremise: fever.\nHypothesis: infection.")
    assert user_message("  What causes gout? ", "") == "What causes gout?"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "two-turns", "system", "system-two-turns"])
def test_training_ids_are_apply_chat_template_and_the_mask_is_each_reply_and_its_end(fmt, conversation):
    tok = fmt.tokenizer
    encoded = fmt.encode([conversation])[0]
    assert encoded.input_ids == tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    runs = supervised_runs(encoded.input_ids, encoded.mask)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == fmt.end_of_turn_id and run.count(fmt.end_of_turn_id) == 1
        assert tok.decode(run[:-1], skip_special_tokens=False).strip() == reply
    # The prompt for a reply is the conversation so far plus the template's generation prompt.
    prompt = fmt.prompt_ids(conversation[:-1])
    assert prompt == tok.apply_chat_template(conversation[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]


def test_end_of_turn_and_stop_ids(family, fmt):
    assert fmt.end_of_turn == END_OF_TURN[family]
    assert fmt.end_of_turn_id in fmt.stop_ids and fmt.tokenizer.eos_token_id in fmt.stop_ids
    more = ChatFormat(fmt.tokenizer, eos_token_id=[fmt.end_of_turn_id, 7, 9])  # a generation_config list
    assert set(more.stop_ids) == set(fmt.stop_ids) | {7, 9}


@pytest.mark.parametrize("family, conversation", [("starling", [SYSTEM, *TURNS]), ("chatml", [SYSTEM, *TURNS]),
                                                  ("mistral_v3", TURNS)])
def test_mask_equals_trls_prefix_rule_where_the_template_keeps_prefixes(family, conversation):
    """TRL's rule (sft_trainer: the completion starts where the prompt's ids stop being a prefix) applied turn by
    turn, cut after the end-of-turn token (ChatML's newline after <|im_end|> is not the model's to generate).
    Not for Mistral with a system message (it moves into the last user turn) nor for the llama3 family, whose
    generation prompt ends in "\n\n", one token at the end of a text and two before a reply in SmolLM2's
    vocabulary (the preflight warns about such a template, test_preflight_warns_...)."""
    fmt = ChatFormat(tokenizer(family))
    tok = fmt.tokenizer
    full = tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
    expected = [0] * len(full)
    for n, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(conversation[:n], tokenize=True, add_generation_prompt=True)["input_ids"]
        upto = tok.apply_chat_template(conversation[:n + 1], tokenize=True)["input_ids"]
        assert full[:len(upto)] == upto and upto[:len(prompt)] == prompt
        end = upto.index(fmt.end_of_turn_id, len(prompt))
        expected[len(prompt):end + 1] = [1] * (end + 1 - len(prompt))
    assert fmt.encode([conversation])[0].mask == expected


def test_mask_equals_return_assistant_tokens_mask_of_trls_generation_tagged_llama3_template():
    tok = tokenizer("llama3")
    conversation = [SYSTEM, *TURNS]
    marked = tok.apply_chat_template(conversation, chat_template=trl_template("llama3_training"), tokenize=True,
                                     return_assistant_tokens_mask=True)
    encoded = ChatFormat(tok).encode([conversation])[0]
    assert encoded.input_ids == marked["input_ids"]
    assert encoded.mask == marked["assistant_masks"]


def test_mistral_moves_the_system_message_and_the_mask_still_holds():
    fmt = ChatFormat(tokenizer("mistral_v3"))
    encoded = fmt.encode([[SYSTEM, *TURNS]])[0]
    text = fmt.tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.index(SYSTEM["content"]) > text.index(TURNS[1]["content"])  # in the last user turn
    assert len(supervised_runs(encoded.input_ids, encoded.mask)) == 2


def test_typed_control_tokens_stay_text_in_training_and_serving(family, fmt):
    tok, typed = fmt.tokenizer, CONTROL_TEXT[family]
    conversation = [{"role": "user", "content": f"My chart says {typed} is that bad?"},
                    {"role": "assistant", "content": f"The text {typed} is only text."}]
    plain = [{"role": "user", "content": "My chart says is that bad?"},
             {"role": "assistant", "content": "The text is only text."}]
    specials = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    template_specials = sorted(i for i in fmt.encode([plain])[0].input_ids if i in specials)
    encoded = fmt.encode([conversation])[0]
    assert sorted(i for i in encoded.input_ids if i in specials) == template_specials  # only the template's own
    assert typed in tok.decode(encoded.input_ids, skip_special_tokens=False)
    runs = supervised_runs(encoded.input_ids, encoded.mask)
    assert len(runs) == 1 and runs[0][-1] == fmt.end_of_turn_id
    assert typed in tok.decode(runs[0][:-1])
    prompt = fmt.prompt_ids(conversation[:1])
    assert sorted(i for i in prompt if i in specials) == sorted(
        i for i in fmt.prompt_ids(plain[:1]) if i in specials)


def test_starling_ids_are_the_ones_its_model_card_publishes():
    """Starling-LM-7B-alpha's card (as openchat/openchat_3.5's README) asserts these ids for its format."""
    tok = tokenizer("starling")
    assert tok("GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:").input_ids == [
        1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747]
    fmt = ChatFormat(tok)
    assert fmt.prompt_ids([{"role": "user", "content": "Hello"}]) == [
        1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747]


def test_starling_ids_are_what_openchat_trained_on(sample_train_file):
    """OpenChat's training code (imoneoi/openchat ochat/config/conversation_template.py, with the slow SentencePiece
    tokenizer and legacy=True) tokenizes each role prefix and each content separately: bos, then per message
    sp("GPT4 Correct <Role>:") + sp(content) + <|end_of_turn|>."""
    import json

    import sentencepiece

    from medtune.tiny import sentencepiece_file

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_file()))
    fmt = ChatFormat(tokenizer("starling"))
    rows = [json.loads(line) for line in sample_train_file.read_text().splitlines()[:40]]
    for row in rows:
        messages = [{"role": "user", "content": user_message(row["instruction"], row["input"])},
                    {"role": "assistant", "content": row["output"].strip()}]
        openchat = [1]
        for m in messages:
            openchat += sp.encode(f"GPT4 Correct {m['role'].title()}:") + sp.encode(m["content"]) + [32000]
        assert fmt.encode([messages])[0].input_ids == openchat


def test_mistral_prompt_ids_are_mistral_commons():
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from families import mistral_sentencepiece

    reference = MistralTokenizer.from_file(str(mistral_sentencepiece()))
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    fmt = ChatFormat(tokenizer("mistral_v3"))
    for conversation in ([TURNS[0]], TURNS[:3], [SYSTEM, *TURNS[:3]]):
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in conversation])
        assert fmt.prompt_ids(conversation) == reference.encode_chat_completion(request).tokens


def test_a_template_that_never_ends_a_reply_is_refused():
    tok = tokenizer("chatml")
    never_stops = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(ChatFormatError, match="never stop"):
        ChatFormat(tok, never_stops)


def test_bad_conversations_are_row_errors_with_reasons():
    fmt = ChatFormat(tokenizer("mistral_v3"))
    not_alternating = [TURNS[0], TURNS[0], TURNS[1]]
    errors = fmt.encode([not_alternating, [{"role": "user", "content": 3}, TURNS[1]], TURNS[:2]])
    assert [e.reason if isinstance(e, RowError) else "ok" for e in errors] == [
        "template_error", "non_string_content", "ok"]
    assert "alternate" in str(errors[0])
