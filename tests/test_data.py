"""Reading, cleaning, encoding, packing and caching the training data."""

from __future__ import annotations

import json

import pytest

from medtune.config import parse_recipe
from medtune.data import prepare_dataset, read_rows
from medtune.data import pipeline


@pytest.fixture(scope="module")
def tok():
    from medtune.tiny import build_starling_tokenizer

    return build_starling_tokenizer()


def _write_bad_file(path):
    good = {"instruction": "Name the disease.", "input": "Fever and rash.", "output": "Measles."}
    long_reply = {"instruction": "Explain.", "input": "", "output": "word " * 400}
    long_prompt = {"instruction": "Read this. " + "text " * 400, "input": "", "output": "ok"}
    hopeless = {"instruction": "Read this. " + "text " * 1200, "input": "", "output": "word " * 400}
    lines = [json.dumps(good)] * 5 + [
        json.dumps({"instruction": "No output here."}),                       # missing_output
        json.dumps({"input": "x", "output": "y"}),                            # missing_instruction
        json.dumps({"instruction": "Q", "input": "", "output": "   "}),       # empty_output
        json.dumps({"instruction": "", "input": "x", "output": "y"}),         # empty_instruction
        json.dumps({"instruction": "Q", "input": 3, "output": "y"}),          # non_string_input
        json.dumps({"instruction": "Q", "input": "", "output": ["a"]}),       # non_string_output
        json.dumps(["not", "an", "object"]),                                  # not_an_object
        '{"instruction": "broken json", "output": ',                          # invalid_json
        "",                                                                    # blank lines are not rows
        json.dumps(long_reply),                                               # too long: reply tail cut
        json.dumps(long_prompt),                                              # prompt alone too long: input cut
        json.dumps(hopeless),                                                 # cutting 3/4 of the prompt: dropped
    ]
    path.write_text("\n".join(lines) + "\n")


def test_read_rows_counts_every_skipped_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    rows, report = read_rows(str(path), "train")
    assert report.rows_read == 16
    assert len(rows) == 8
    assert dict(report.skipped) == {
        "missing_output": 1, "missing_instruction": 1, "empty_output": 1, "empty_instruction": 1,
        "non_string_input": 1, "non_string_output": 1, "not_an_object": 1, "invalid_json": 1,
    }
    assert report.examples["invalid_json"] == [f"{path}:13"]


@pytest.mark.parametrize("overlong, kept, truncated, skipped", [
    ("truncate", 7, 2, {"prompt_too_long": 1}),
    ("drop", 5, 0, {"too_long": 3}),
])
def test_bad_data_file_completes_with_exact_counts(tmp_path, tiny_args, tok, overlong, kept, truncated, skipped):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    recipe = parse_recipe(tiny_args + ["--dataset_name", str(path), "--eval_split", "none", "--max_seq_length", "256",
                                       "--overlong", overlong])
    prepared = prepare_dataset(recipe, tok)
    s = prepared.stats
    assert s.rows_read == 16 and s.rows_kept == kept and s.truncated == truncated
    expected = {"missing_output": 1, "missing_instruction": 1, "empty_output": 1, "empty_instruction": 1,
                "non_string_input": 1, "non_string_output": 1, "not_an_object": 1, "invalid_json": 1, **skipped}
    assert s.skipped == expected
    assert s.rows_read == s.rows_kept + sum(s.skipped.values())
    assert prepared.eval is None
    assert all(len(ids) <= 256 for ids in prepared.train["input_ids"])
    assert sum(map(sum, prepared.train["seq_lengths"])) == s.tokens


def test_overlong_rows_keep_the_template_and_a_reply(tok):
    eot = tok.convert_tokens_to_ids("<|end_of_turn|>")
    from medtune.chat_format import encode_example

    row = {"instruction": "Summarize the findings.", "input": "finding " * 300, "output": "Normal study. " * 20}
    ids, mask = pipeline.fit(*encode_example(tok, row), max_length=128, eot_id=eot)
    assert len(ids) == 128 and ids[0] == tok.bos_token_id and ids.count(eot) == 1
    prompt = tok.decode(ids[:mask.index(1)])
    assert prompt.startswith("<s> GPT4 Correct User: Summarize the findings.") and prompt.endswith("Assistant:")
    assert sum(mask) == 128 // 4  # the reply keeps its reserved quarter
    assert tok.decode([i for i, m in zip(ids, mask) if m]).startswith("Normal study.")
    short_reply = dict(row, output="Normal.")
    ids, mask = pipeline.fit(*encode_example(tok, short_reply), max_length=128, eot_id=eot)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Normal.<|end_of_turn|>"  # whole reply, its end too


def test_sample_packs_efficiently_with_prompt_masked(tiny_args, tok):
    prepared = prepare_dataset(parse_recipe(tiny_args), tok)
    s = prepared.stats
    assert s.rows_kept == s.rows_read > 300 and not s.skipped
    assert s.packing_efficiency >= 0.95
    assert prepared.eval_stats.rows_kept > 50
    eot = tok.convert_tokens_to_ids("<|end_of_turn|>")
    for row in prepared.train.select(range(5)):
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= 512
        start = 0
        for n in row["seq_lengths"]:
            ids, labels = row["input_ids"][start:start + n], row["labels"][start:start + n]
            assert ids[0] == tok.bos_token_id and ids[-1] == eot
            first_loss = next(i for i, x in enumerate(labels) if x != -100)
            # Loss only on the reply: the prompt (up to and including "Assistant:") is masked, the rest is not.
            assert tok.decode(ids[:first_loss]).endswith("GPT4 Correct Assistant:")
            assert labels[first_loss:] == ids[first_loss:]
            start += n


def test_cache_hit_on_second_run_and_invalidation(tiny_args, tok, monkeypatch, tmp_path):
    first = prepare_dataset(parse_recipe(tiny_args), tok)

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the data was tokenized again despite an unchanged fingerprint")

    monkeypatch.setattr(pipeline, "encode_rows", must_not_encode)
    tok(["a b c"], truncation=True, max_length=2, padding="max_length")  # tokenizer call state is not identity
    second = prepare_dataset(parse_recipe(tiny_args), tok)
    assert second.cache_dir == first.cache_dir
    assert second.stats == first.stats
    assert second.train["input_ids"] == first.train["input_ids"]
    # A different max_length is a different cache entry.
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_dataset(parse_recipe(tiny_args + ["--max_seq_length", "256"]), tok)


def test_eval_split_held_out_when_missing(tiny_args, tok, sample_train_file):
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--eval_dataset_name", "", "--eval_split_size", "0.1"]), tok)
    n_rows = sum(1 for _ in open(sample_train_file))
    assert prepared.eval_stats.rows_kept == int(n_rows * 0.1)
    assert prepared.stats.rows_kept + prepared.eval_stats.rows_kept == n_rows
