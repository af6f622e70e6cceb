"""Dataset mixtures (`datasets:` / `eval_datasets:`): TRL's entries and fraction rule, each entry read and counted by
medtune's own row pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medtune.training.config import ConfigError, parse_recipe
from medtune.data import mixture
from medtune.data.fingerprint import fingerprint
from medtune.data.pipeline import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
VIGNETTES = ROOT / "data" / "vignettes" / "train.jsonl"


@pytest.fixture(scope="module")
def fmt():
    from medtune.inference.chat_format import ChatFormat
    from medtune.tiny import build_starling_tokenizer

    return ChatFormat(build_starling_tokenizer())


@pytest.fixture
def three_files(tmp_path) -> dict[str, Path]:
    """Three formats: MedTuned rows (10 usable, 1 without output), 6 vignettes, 4 conversations (a .json array)."""
    medtuned = tmp_path / "medtuned.jsonl"
    rows = [{"instruction": f"Name disease {i}.", "input": "Fever.", "output": f"Disease {i}."} for i in range(10)]
    medtuned.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"instruction": "No output."}]))
    vignettes = tmp_path / "vignettes.jsonl"
    vignettes.write_text("".join(VIGNETTES.read_text().splitlines(keepends=True)[:6]))
    chats = tmp_path / "chats.json"
    chats.write_text(json.dumps([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                               {"role": "assistant", "content": f"Answer {i}."}],
                                  "note": "dropped by columns"} for i in range(4)]))
    return {"medtuned": medtuned, "vignettes": vignettes, "chats": chats}


def entries(files: dict[str, Path], fractions=(0.6, 0.2, 0.2)) -> list[dict]:
    return [{"path": str(files[name]), **({"fraction": f} if f is not None else {})}
            for name, f in zip(("medtuned", "vignettes", "chats"), fractions)]


def test_fractions_follow_trl_and_no_dataset_is_oversampled(three_files):
    rows, report = mixture.read(mixture.parse(entries(three_files)))
    # weights 0.6/0.2/0.2; the largest mixture N no dataset must oversample: min(10/0.6, 6/0.2, 4/0.2) = 16.7
    assert [m["rows_used"] for m in report.mixture] == [10, 3, 3]
    assert [m["rows_usable"] for m in report.mixture] == [10, 6, 4]
    assert [m["rows_read"] for m in report.mixture] == [11, 6, 4]
    assert report.mixture[0]["skipped"] == {"missing_output": 1} and report.skipped == {"missing_output": 1}
    assert [m["formats"] for m in report.mixture] == [["instruction"], ["vignette"], ["messages"]]
    assert len(rows) == 16 and report.rows_read == 21
    assert rows[10]["messages"][1]["content"] == json.loads(VIGNETTES.read_text().splitlines()[0])["case"]
    # a dataset is never repeated to reach its share: here the chats would need 5 of their 4 rows
    _, report = mixture.read(mixture.parse(entries(three_files, (0.2, 0.2, 0.6))))
    assert [m["rows_used"] for m in report.mixture] == [1, 1, 4]
    # without fractions the datasets are concatenated
    rows, report = mixture.read(mixture.parse(entries(three_files, (None, None, None))))
    assert len(rows) == 20 and [m["rows_used"] for m in report.mixture] == [10, 6, 4]


def test_columns_and_data_files_select_what_is_read(three_files):
    (entry,) = mixture.parse([{"path": str(three_files["chats"].parent), "data_files": "chats.json",
                               "columns": ["messages"]}])
    rows, report = mixture.read([entry])
    assert len(rows) == 4 and report.mixture[0]["dataset"] == f"{three_files['chats'].parent} [chats.json]"
    with pytest.raises(mixture.MixtureError, match=r"datasets\[0\] .*: no usable rows"):
        mixture.read(mixture.parse([{"path": str(three_files["medtuned"]), "columns": ["input"]}]))


@pytest.mark.parametrize("bad, message", [
    ([{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl"}], "either all datasets in the mixture or none"),
    ([{"path": "x", "weight": 2}], r"datasets\[0\]: unknown key\(s\) weight; an entry has path, name"),
    ([{"fraction": 0.5}], r"datasets\[0\]: `path` .* is required"),
    ([{"path": "./missing.jsonl"}], r"datasets\[0\]: ./missing.jsonl: no such file or folder"),
    ([{"path": "nlpie/x", "fraction": 0}], r"datasets\[0\]: `fraction` must be a number above 0"),
    ("data.jsonl", "datasets: a non-empty list of entries"),
])
def test_a_bad_mixture_is_refused_at_validation_naming_the_entry(bad, message, tiny_args, tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"instruction": "x", "output": "y"}\n')
    bad = [{**e, "path": str(tmp_path / e["path"])} if isinstance(e, dict) and e.get("path", "").endswith(
        ("a.jsonl", "b.jsonl")) else e for e in bad] if isinstance(bad, list) else bad
    with pytest.raises(ConfigError, match=message):
        parse_recipe(tiny_args, replace={"datasets": bad})


def test_the_cache_key_covers_the_mixture(three_files, tiny_args, fmt):
    def key(fractions):
        return fingerprint(parse_recipe(tiny_args, replace={"datasets": entries(three_files, fractions)}), fmt)

    assert key((0.6, 0.2, 0.2)) == key((0.6, 0.2, 0.2))
    assert key((0.6, 0.2, 0.2)) != key((0.5, 0.3, 0.2))
    assert key((0.6, 0.2, 0.2)) != fingerprint(parse_recipe(tiny_args), fmt)
    distilled = entries(three_files, (0.6, 0.2, 0.2))
    distilled[1]["self_distill"] = {"max_new_tokens": 64}
    assert fingerprint(parse_recipe(tiny_args, replace={"datasets": distilled}), fmt) != key((0.6, 0.2, 0.2))


def test_a_mixture_trains_and_reports_each_dataset(three_files, tiny_args, fmt, caplog):
    recipe = parse_recipe(tiny_args, replace={"datasets": entries(three_files),
                                              "eval_datasets": [{"path": str(three_files["chats"])}]})
    with caplog.at_level("INFO"):
        prepared = prepare_dataset(recipe, fmt)
    assert [m["rows_used"] for m in prepared.stats.mixture] == [10, 3, 3] and prepared.stats.rows_kept == 16
    assert prepared.eval_stats.rows_kept == 4 and prepared.eval_stats.mixture[0]["rows_used"] == 4
    assert f"datasets {three_files['vignettes']}: read 6 rows, 6 usable, 3 used (fraction 0.2)" in caplog.text
    assert "vignettes.jsonl: 3 of 6 usable rows used" in prepared.stats.summary("train")
    stats = json.loads((prepared.cache_dir / "stats.json").read_text())
    assert stats["train"]["mixture"][2]["dataset"] == str(three_files["chats"])


def test_a_mixture_on_the_command_line_is_refused_with_where_to_set_it(tiny_args):
    with pytest.raises(ConfigError, match="datasets is a list of datasets: set it in the recipe file"):
        parse_recipe([*tiny_args, "--datasets", "data.jsonl"])


@pytest.mark.slow
def test_replay_asks_the_base_model_once_and_reads_its_replies_back(tmp_path, monkeypatch, sample_train_file):
    """SmolLM2-135M-Instruct's own greedy replies to a few prompts, mixed with the sample: generated once, then read
    from the replay cache (a changed fraction rebuilds the data, not the replies); a run stopped part-way keeps
    what it generated."""
    from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
    from medtune.data import base_replies
    from medtune.data.replay import replay_rows
    from medtune.training.model import load_chat_format

    prompts, first_only = tmp_path / "prompts.jsonl", tmp_path / "first.jsonl"
    questions = ["Hi, who are you?", "Can I take paracetamol with a cold?", "What is a normal temperature?",
                 "Thank you!"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions) + '{"text": "no prompt"}\n')
    first_only.write_text(json.dumps({"prompt": questions[0]}) + "\n")

    def recipe(fraction: float):
        return parse_recipe(["--config", "configs/recipes/demo.yaml", "--output_dir", str(tmp_path / "out"),
                             "--data_cache_dir", str(tmp_path / "cache")],
                            replace={"datasets": [{"path": str(sample_train_file), "fraction": fraction},
                                                  {"replay": {"prompts": str(prompts), "max_new_tokens": 64},
                                                   "fraction": 1 - fraction}]})

    asked = []
    generate = base_replies._generate
    monkeypatch.setattr(base_replies, "_generate",
                        lambda r, todo, *a: asked.append([c[-1]["content"] for c in todo]) or generate(r, todo, *a))
    first = recipe(0.9)
    # a run interrupted after the first prompt: its reply is in the cache file
    replay_rows({"prompts": str(first_only), "max_new_tokens": 64}, first)
    asked.clear()
    prepared = prepare_dataset(first, load_chat_format(first))
    assert asked == [questions[1:]]  # only what was missing
    counts = prepared.stats.mixture[1]
    assert counts["dataset"] == f"replay of {prompts}" and counts["rows_read"] == 5
    assert counts["skipped"].get("missing_prompt") == 1
    assert counts["rows_usable"] + counts["skipped"].get("replay_cut_at_max_new_tokens", 0) == 4
    assert counts["rows_used"] >= 1
    cache = base_replies.cache_file(first, "replay", [DEFAULT_SYSTEM_PROMPT, 64])
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [c["messages"][-1]["content"] for c in cached] == questions and all(c["reply"] for c in cached)

    asked.clear()
    second = recipe(0.8)
    prepare_dataset(second, load_chat_format(second))  # another fraction: the data is rebuilt ...
    assert asked == []  # ... from the replies already generated


@pytest.mark.slow
def test_self_distillation_keeps_a_rewrite_only_where_the_answer_survives(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct rewrites vignette replies and MedTuned labels (SDFT's prompt); a rewrite that loses the
    triage level or the label is not trained on, and every row is counted either way."""
    from medtune.data import base_replies, self_distill
    from medtune.data.advice import read_level

    medtuned = tmp_path / "labels.jsonl"
    medtuned.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Is the statement entailed? Answer entailment or contradiction.",
         "input": "Premise: the patient has a fever. Statement: the patient is febrile.", "output": "entailment"},
        {"instruction": "Answer the question.", "input": "Which organ makes insulin?", "output": "The pancreas."}]))
    vignettes = tmp_path / "vignettes.jsonl"
    vignettes.write_text("".join(VIGNETTES.read_text().splitlines(keepends=True)[:4]))
    recipe = parse_recipe(["--config", "configs/recipes/demo.yaml", "--output_dir", str(tmp_path / "out"),
                           "--data_cache_dir", str(tmp_path / "cache")],
                          replace={"datasets": [{"path": str(medtuned), "self_distill": {"max_new_tokens": 96}},
                                                {"path": str(vignettes), "self_distill": {"max_new_tokens": 96}}]})
    plain, _ = mixture.read(mixture.parse([{"path": str(medtuned)}, {"path": str(vignettes)}]))
    rows, report = mixture.read(mixture.parse(recipe.data.datasets), recipe=recipe)
    assert len(rows) == len(plain) == 6
    notes = [m["notes"] for m in report.mixture]
    for counts, n in zip(notes, (2, 4)):
        assert sum(counts.values()) == n, counts  # every row counted: rewritten or kept as written, and why
    for row, before in zip(rows, plain):
        reply = row["messages"][-1]["content"]
        assert row["messages"][:-1] == before["messages"][:-1]
        if reply != before["messages"][-1]["content"]:  # a kept rewrite keeps the answer
            assert self_distill.keeps_answer(before, reply)
            if "case" in before:
                assert read_level(reply) == before["triage"]
    cache = base_replies.cache_file(recipe, "self_distill", [self_distill.TEMPLATE, 96])
    assert len(cache.read_text().splitlines()) == 6
    monkeypatch.setattr(base_replies, "_generate", lambda *a: pytest.fail("generated again"))
    again, _ = mixture.read(mixture.parse(recipe.data.datasets), recipe=recipe)
    assert again == rows


def test_self_distillation_counts_every_row_and_trains_only_the_rewrites_that_keep_the_answer(three_files, tiny_args,
                                                                                                 monkeypatch):
    """The base model's records stubbed: one rewrite kept, one cut at max_new_tokens, one empty, one that loses the
    label, one that loses the triage level; a multi-turn row is not rewritten."""
    from medtune.data import base_replies, self_distill

    chats = three_files["chats"]
    conversations = json.loads(chats.read_text())
    conversations[3]["messages"] += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "More."}]
    chats.write_text(json.dumps(conversations))
    vignette = json.loads(VIGNETTES.read_text().splitlines()[0])  # a heart attack, emergency
    one = three_files["vignettes"]
    one.write_text(json.dumps(vignette) + "\n")
    records = {"Question 0?": ("Answer 0. That is my own answer 0.", "stop"),
               "Question 1?": ("Answer 1 and on and on", "length"), "Question 2?": ("", "stop"),
               "Question 3?": None, vignette["case"]: ("This may be a heart attack. Rest at home.", "stop")}
    asked = []

    def replies(recipe, kind, settings, asks, max_new_tokens):
        assert kind == "self_distill" and settings == [self_distill.TEMPLATE] and max_new_tokens == 64
        out = []
        for ask in asks:
            question = next(q for q in records if f"### Instruction:\n{q}\n### Reference Answer:" in
                            ask[-1]["content"])
            asked.append(question)
            reply, finish = records[question]
            out.append({"reply": reply, "finish_reason": finish})
        return out

    monkeypatch.setattr(base_replies, "replies", replies)
    recipe = parse_recipe(tiny_args)
    rows, report = mixture.read(mixture.parse([{"path": str(chats), "self_distill": {"max_new_tokens": 64}},
                                               {"path": str(one), "self_distill": {"max_new_tokens": 64}}]),
                                recipe=recipe)
    assert "Question 3?" not in asked  # multi-turn: kept as written
    assert [r["messages"][-1]["content"] for r in rows[:3]] == ["Answer 0. That is my own answer 0.", "Answer 1.",
                                                                 "Answer 2."]
    assert rows[4]["messages"][-1]["content"] == vignettes_reply(vignette)  # the level was lost
    assert report.mixture[0]["notes"] == {"self_distill_rewritten": 1, "self_distill_cut_at_max_new_tokens": 1,
                                          "self_distill_answer_changed": 1, "self_distill_multi_turn": 1}
    assert report.mixture[1]["notes"] == {"self_distill_answer_changed": 1}
    assert report.mixture[0]["dataset"].endswith("(self-distilled)")
    # with fractions, only the rows the mixture uses are rewritten (here 1 of the 4 conversations)
    asked.clear()
    _, report = mixture.read(mixture.parse([{"path": str(chats), "self_distill": {"max_new_tokens": 64},
                                             "fraction": 0.5},
                                            {"path": str(one), "self_distill": {"max_new_tokens": 64},
                                             "fraction": 0.5}]), recipe=recipe)
    assert asked == ["Question 0?", vignette["case"]] and report.mixture[0]["rows_used"] == 1
    assert report.mixture[0]["notes"] == {"self_distill_rewritten": 1}
    with pytest.raises(mixture.MixtureError, match=r"datasets\[0\]: `self_distill` is a mapping of max_new_tokens"):
        mixture.parse([{"path": str(chats), "self_distill": {"prompts": "x"}}])
    with pytest.raises(mixture.MixtureError, match=r"self_distill max_new_tokens must be a whole number"):
        mixture.parse([{"path": str(chats), "self_distill": {"max_new_tokens": 0}}])
    with pytest.raises(mixture.MixtureError, match=r"eval_datasets\[0\]: replay and self_distill make training"):
        mixture.parse([{"path": str(chats), "self_distill": {}}], "eval_datasets")


def vignettes_reply(raw: dict) -> str:
    from medtune.data import vignettes

    return vignettes.reply(raw["diagnosis"], raw["triage"])


def test_self_distillation_selection_is_sdfts():
    vignette = {"case": "Crushing chest pain.", "triage": "emergency", "diagnosis": ["Myocardial infarction",
                                                                                     "heart attack"],
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    from medtune.data.self_distill import keeps_answer

    assert keeps_answer(vignette, "This sounds like a heart attack. Call an ambulance now.")
    assert not keeps_answer(vignette, "This sounds like a heart attack. Rest at home and drink fluids.")
    assert not keeps_answer(vignette, "Call an ambulance now, it may be serious.")  # the diagnosis is lost
    label = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "OPTION B IS CORRECT"}]}
    assert keeps_answer(label, "I think option b is correct,  because ...")
    assert not keeps_answer(label, "Option C is correct.")
    # whole words only: a short name or label is not found inside another word
    embolism = {**vignette, "triage": None, "diagnosis": ["Pulmonary embolism", "PE"]}
    assert keeps_answer(embolism, "It could be a PE.") and not keeps_answer(embolism, "You need help now.")
    no = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "No"}]}
    assert keeps_answer(no, "No, it is not.") and not keeps_answer(no, "I do not know.")


def test_a_replay_entry_is_checked_at_validation(tiny_args, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ConfigError, match=r"datasets\[0\]: replay prompts .*missing.jsonl: no such file"):
        parse_recipe(tiny_args, replace={"datasets": [{"replay": {"prompts": str(tmp_path / "missing.jsonl")}}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: a replay entry has .* and `fraction` only"):
        parse_recipe(tiny_args, replace={"datasets": [{"replay": {"prompts": str(empty)}, "path": "x"}]})
    from medtune.data.replay import replay_rows

    with pytest.raises(ValueError, match="empty.jsonl: no usable prompt"):
        replay_rows({"prompts": str(empty)}, parse_recipe(tiny_args))


@pytest.mark.slow
def test_replay_in_a_two_process_run_is_generated_once_and_read_on_every_rank(tmp_path, sample_train_file):
    """`accelerate launch` with 2 CPU processes (DDP) of the demo recipe with a replay entry: one rank generates
    SmolLM2's replies under the data cache's lock, the other reads the data it prepared; a second run with another
    mixture rebuilds the data from the replay cache and generates nothing."""
    import subprocess
    import sys

    import yaml

    from conftest import free_port

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi!", "Thank you!", "Say hello."]))
    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / "demo.yaml").read_text())
    recipe |= {"datasets": [{"path": str(sample_train_file), "fraction": 0.9},
                            {"replay": {"prompts": str(prompts), "max_new_tokens": 192}, "fraction": 0.1}],
               "data_cache_dir": str(tmp_path / "cache"), "save_strategy": "no", "logging_steps": 1}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}

    def launch(out: str) -> None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"), "--config", str(config),
               "--output_dir", str(tmp_path / out), "--max_steps", "2", "--ddp_backend", "gloo"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    launch("first")
    # one rank generated under the data cache's lock (3 lines, not 6), the other read the data it prepared
    cache = list((tmp_path / "cache" / "replay").glob("*.jsonl"))
    assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == 3
    assert len([d for d in (tmp_path / "cache").iterdir() if (d / "stats.json").exists()]) == 1
    stats = json.loads(next((tmp_path / "cache").glob("*/stats.json")).read_text())
    assert stats["train"]["mixture"][1]["dataset"] == f"replay of {prompts}"
    assert stats["train"]["mixture"][1]["rows_used"] >= 1
    generated = cache[0].stat().st_mtime_ns

    recipe["datasets"][0]["fraction"] = 0.8  # another mixture: the data is rebuilt, the replies are read
    config.write_text(yaml.safe_dump(recipe))
    launch("second")
    assert cache[0].stat().st_mtime_ns == generated and len(cache[0].read_text().splitlines()) == 3
    assert len([d for d in (tmp_path / "cache").iterdir() if (d / "stats.json").exists()]) == 2
