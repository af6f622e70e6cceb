"""Generation with the tiny model (medtune.inference.decoding under medtune.inference.generation's rules): stopping at
the end-of-turn
token, batching, streaming, and the terminal chat."""

import os

import pytest
import torch

from medtune.inference.decoding import Stream, complete
from medtune.inference.generation import Sampling
from medtune.inference.load import load_for_inference

END_OF_TURN = "<|end_of_turn|>"

CONVERSATIONS = [
    [{"role": "user", "content": "I have had a headache for two days."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Fever and a dry cough since Monday, should I worry?"}],
    [{"role": "user", "content": "Sore throat."}, {"role": "assistant", "content": "Any fever?"},
     {"role": "user", "content": "No fever, but it hurts to swallow."}],
]


@pytest.fixture(scope="module")
def model_and_fmt(tiny_model_dir):
    return load_for_inference(tiny_model_dir, device="cpu")


def texts(model, fmt, conversations, max_new_tokens, sampling=None):
    return [c.text for c in complete(model, fmt, conversations, max_new_tokens, sampling or Sampling())]


@pytest.fixture()
def rigged(tiny_model_dir):
    """The tiny model with the <|end_of_turn|> output row set to 1.01x the row of the 4th greedy token.

    Wherever that token would have won, end-of-turn wins instead, so greedy generation stops after 3 tokens.
    """
    model, fmt = load_for_inference(tiny_model_dir, device="cpu")
    conv = CONVERSATIONS[0]
    prompt = torch.tensor([fmt.prompt_ids(conv)])
    ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         eos_token_id=None)[0, prompt.shape[1]:].tolist()
    assert ids[3] not in ids[:3], "the 4th greedy token repeats an earlier one: pick another conversation"
    with torch.no_grad():
        model.lm_head.weight[fmt.end_of_turn_id] = model.lm_head.weight[ids[3]] * 1.01
    return model, fmt, conv, ids[:3]


def test_generation_stops_at_end_of_turn(rigged):
    model, fmt, conv, expected_ids = rigged
    (result,) = complete(model, fmt, [conv], max_new_tokens=50)
    assert result.finish_reason == "stop"
    assert result.completion_tokens == len(expected_ids) + 1  # the reply and its end-of-turn
    assert result.text == fmt.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert END_OF_TURN not in result.text

    pieces = Stream(model, fmt, conv, max_new_tokens=50)
    assert "".join(pieces) == result.text
    assert pieces.finish_reason == "stop" and pieces.completion_tokens == result.completion_tokens


def test_length_limit_reports_length(model_and_fmt):
    model, fmt = model_and_fmt
    results = complete(model, fmt, CONVERSATIONS, max_new_tokens=5)
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [r.completion_tokens for r in results] == [5] * 3
    assert all(END_OF_TURN not in r.text and r.text for r in results)


def test_batched_greedy_equals_one_by_one_and_transformers_generate(model_and_fmt):
    model, fmt = model_and_fmt
    batched = texts(model, fmt, CONVERSATIONS, 12)
    single = [texts(model, fmt, [c], 12)[0] for c in CONVERSATIONS]
    assert batched == single
    assert len(set(batched)) == 3  # different prompts, different replies: the padding did not leak
    for conversation, text in zip(CONVERSATIONS, single):
        prompt = torch.tensor([fmt.prompt_ids(conversation)])
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=1,
                             do_sample=False, eos_token_id=list(fmt.stop_ids))[0, prompt.shape[1]:].tolist()
        assert fmt.reply_text(ids) == text


def test_a_shared_system_prompt_runs_once_and_replies_stay_those_of_each_prompt_alone(model_and_fmt, monkeypatch):
    from medtune.inference import decoding
    from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT, with_system_prompt

    model, fmt = model_and_fmt
    conversations = [with_system_prompt([m for m in c if m["role"] != "system"], DEFAULT_SYSTEM_PROMPT)
                     for c in CONVERSATIONS]
    prompts = [fmt.prompt_ids(c) for c in conversations]
    shared = len(os.path.commonprefix(prompts))
    assert shared >= decoding.SHARED_PREFIX_MIN  # the batch takes the shared-prefix path
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: widths.append(k["input_ids"].shape) or forward(*a, **k))
    batched = texts(model, fmt, conversations, 12)
    assert widths[0] == (1, shared)  # the system prompt once, for all three rows
    single = [texts(model, fmt, [c], 12)[0] for c in conversations]
    assert batched == single and len(set(batched)) == 3


def test_stream_matches_complete(model_and_fmt):
    model, fmt = model_and_fmt
    pieces = Stream(model, fmt, CONVERSATIONS[1], max_new_tokens=12)
    received = list(pieces)
    assert len(received) > 1
    assert "".join(received) == texts(model, fmt, [CONVERSATIONS[1]], 12)[0]
    assert pieces.finish_reason == "length" and pieces.prompt_tokens == len(fmt.prompt_ids(CONVERSATIONS[1]))


def test_stream_close_stops_generation(model_and_fmt):
    model, fmt = model_and_fmt
    pieces = Stream(model, fmt, CONVERSATIONS[0], max_new_tokens=500)
    next(iter(pieces))
    pieces.close()
    assert list(pieces) == []
    assert 0 < pieces.completion_tokens < 500


def test_sampling_runs(model_and_fmt):
    model, fmt = model_and_fmt
    torch.manual_seed(0)
    replies = texts(model, fmt, CONVERSATIONS[:2], 6, Sampling(temperature=0.8, top_p=0.9))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_terminal_chat_keeps_history_and_resets(model_and_fmt, monkeypatch):
    import io

    import medtune.inference.chat as chat

    model, fmt = model_and_fmt
    seen = []
    real_stream = chat.Stream

    def recording_stream(model, fmt, messages, *args):
        seen.append(messages)
        return real_stream(model, fmt, messages, *args)

    monkeypatch.setattr(chat, "Stream", recording_stream)
    lines = iter(["My knee is swollen.", "It hurts when I walk.", "/reset", "/unknown", "Headache.", "/exit", "never"])
    out = io.StringIO()
    chat.chat_loop(model, fmt, chat.ChatOptions(max_new_tokens=4, temperature=0), read=lambda _: next(lines), out=out)

    assert [[m["role"] for m in conv] for conv in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][2]["content"] == texts(model, fmt, [seen[0]], 4)[0]
    assert seen[2][1]["content"] == "Headache."
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "(new conversation)" in text and "Not a doctor" in text
    assert "/reset new conversation" in text  # help printed for the unknown command


def test_terminal_chat_flags_emergencies_before_the_reply(model_and_fmt):
    import io

    import medtune.inference.chat as chat
    from medtune.inference.triage import triage_text

    model, fmt = model_and_fmt
    emergency = "My face is drooping on one side and my speech is slurred."
    lines = iter(["I have a runny nose.", emergency])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    chat.chat_loop(model, fmt, chat.ChatOptions(max_new_tokens=2, temperature=0), read=read, out=out)
    _, first_reply, second_reply = out.getvalue().split("assistant> ")
    assert out.getvalue().count("[EMERGENCY]") == 1  # once, right before the emergency message's reply
    assert first_reply.rstrip().endswith(f"[EMERGENCY] {triage_text(emergency).notice}")


def test_terminal_chat_cli_reads_stdin(tiny_model_dir, monkeypatch, capsys):
    import io

    import medtune.inference.chat as chat

    monkeypatch.setattr("sys.stdin", io.StringIO("I feel dizzy.\n"))  # then end of input: the chat ends
    chat.main(["--model", str(tiny_model_dir), "--max-tokens", "3", "--device", "cpu"])
    assert capsys.readouterr().out.count("assistant> ") == 1


def test_terminal_chat_answers_one_message_with_ask(tiny_model_dir, capsys):
    import medtune.inference.chat as chat

    chat.main(["--model", str(tiny_model_dir), "--max-tokens", "3", "--device", "cpu", "--temperature", "0",
               "--ask", "Crushing chest pain and sweating."])
    out = capsys.readouterr().out
    assert out.startswith("you> Crushing chest pain and sweating.\n[EMERGENCY] ")
    assert out.count("assistant> ") == 1 and "Commands:" not in out
