"""Dataset mixtures (`datasets:` / `eval_datasets:`): TRL's entries and fraction rule, each entry read and counted by
medtune's own row pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.config import ConfigError, parse_recipe
from medtune.data import mixture
from medtune.data.fingerprint import fingerprint
from medtune.data.pipeline import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
VIGNETTES = ROOT / "data" / "vignettes" / "train.jsonl"


@pytest.fixture(scope="module")
def fmt():
    from medtune.chat_format import ChatFormat
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
    assert rows[10]["messages"][0]["content"] == json.loads(VIGNETTES.read_text().splitlines()[0])["case"]
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
    from medtune.data import replay
    from medtune.model import load_chat_format

    prompts = tmp_path / "prompts.jsonl"
    questions = ["Hi, who are you?", "Can I take paracetamol with a cold?", "What is a normal temperature?",
                 "Thank you!"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions) + '{"text": "no prompt"}\n')

    def recipe(fraction: float):
        return parse_recipe(["--config", "configs/recipes/demo.yaml", "--output_dir", str(tmp_path / "out"),
                             "--data_cache_dir", str(tmp_path / "cache")],
                            replace={"datasets": [{"path": str(sample_train_file), "fraction": fraction},
                                                  {"replay": {"prompts": str(prompts), "max_new_tokens": 64},
                                                   "fraction": 1 - fraction}]})

    asked = []
    generate = replay._generate
    monkeypatch.setattr(replay, "_generate", lambda r, todo, *a: asked.append(list(todo)) or generate(r, todo, *a))
    first = recipe(0.9)
    # a run interrupted after the first prompt: its reply is in the cache file
    generate(first, questions[:1], 64, replay.cache_file(first, 64))
    prepared = prepare_dataset(first, load_chat_format(first))
    assert asked == [questions[1:]]  # only what was missing
    counts = prepared.stats.mixture[1]
    assert counts["dataset"] == f"replay of {prompts}" and counts["rows_read"] == 5
    assert counts["skipped"].get("missing_prompt") == 1
    assert counts["rows_usable"] + counts["skipped"].get("replay_cut_at_max_new_tokens", 0) == 4
    assert counts["rows_used"] >= 1
    cached = [json.loads(line) for line in replay.cache_file(first, 64).read_text().splitlines()]
    assert [c["prompt"] for c in cached] == questions and all(c["reply"] for c in cached)

    asked.clear()
    second = recipe(0.8)
    prepare_dataset(second, load_chat_format(second))  # another fraction: the data is rebuilt ...
    assert asked == []  # ... from the replies already generated


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
