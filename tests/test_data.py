"""Reading, cleaning, encoding, packing and caching the training data."""

from __future__ import annotations

import json
import os

import pytest


from medtune.training.config import parse_recipe
from medtune.data import prepare_dataset, read_rows
from medtune.data import pipeline


@pytest.fixture(scope="module")
def fmt():
    from medtune.inference.chat_format import ChatFormat
    from medtune.tiny import build_starling_tokenizer

    return ChatFormat(build_starling_tokenizer())


@pytest.fixture(scope="module")
def tok(fmt):
    return fmt.tokenizer


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
def test_bad_data_file_completes_with_exact_counts(tmp_path, tiny_args, fmt, overlong, kept, truncated, skipped):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    recipe = parse_recipe(tiny_args + ["--dataset_name", str(path), "--eval_split", "none", "--max_seq_length", "256",
                                       "--overlong", overlong])
    prepared = prepare_dataset(recipe, fmt)
    s = prepared.stats
    assert s.rows_read == 16 and s.rows_kept == kept and s.truncated == truncated
    expected = {"missing_output": 1, "missing_instruction": 1, "empty_output": 1, "empty_instruction": 1,
                "non_string_input": 1, "non_string_output": 1, "not_an_object": 1, "invalid_json": 1, **skipped}
    assert s.skipped == expected
    assert s.rows_read == s.rows_kept + sum(s.skipped.values())
    assert prepared.eval is None
    assert all(len(ids) <= 256 for ids in prepared.train["input_ids"])
    assert sum(map(sum, prepared.train["seq_lengths"])) == s.tokens


def _encoded(fmt, row):
    from medtune.data.formats import INSTRUCTION, clean

    return fmt.encode([clean(INSTRUCTION, row)[0]["messages"]])[0]


def test_overlong_rows_keep_the_template_and_a_reply(fmt, tok):
    eot = tok.convert_tokens_to_ids("<|end_of_turn|>")
    row = {"instruction": "Summarize the findings.", "input": "finding " * 300, "output": "Normal study. " * 20}
    ids, mask = pipeline.fit(_encoded(fmt, row), max_length=128)
    assert len(ids) == 128 and ids[0] == tok.bos_token_id and ids.count(eot) == 1
    prompt = tok.decode(ids[:mask.index(1)])
    assert prompt.startswith("<s> GPT4 Correct User: Summarize the findings.") and prompt.endswith("Assistant:")
    assert sum(mask) == 128 // 4  # the reply keeps its reserved quarter
    assert tok.decode([i for i, m in zip(ids, mask) if m]).startswith("Normal study.")
    short_reply = dict(row, output="Normal.")
    ids, mask = pipeline.fit(_encoded(fmt, short_reply), max_length=128)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Normal.<|end_of_turn|>"  # whole reply, its end too


def test_sample_packs_efficiently_with_prompt_masked(tiny_args, fmt, tok):
    prepared = prepare_dataset(parse_recipe(tiny_args), fmt)
    s = prepared.stats
    assert s.rows_kept == s.rows_read == 203 and not s.skipped and s.duplicates == 0 and s.truncated == 0
    assert s.packing_efficiency >= 0.95
    assert prepared.eval_stats.rows_kept == 58 and prepared.eval_stats.shared_with_train == 0
    eval_rows = [json.loads(line) for line in (prepared.cache_dir / pipeline.EVAL_ROWS).read_text().splitlines()]
    assert len(eval_rows) == 58 and all(set(r) == {"instruction", "input", "output", "source"} for r in eval_rows)
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


def test_cache_hit_on_second_run_and_invalidation(tiny_args, fmt, monkeypatch, tmp_path):
    first = prepare_dataset(parse_recipe(tiny_args), fmt)

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the data was tokenized again despite an unchanged fingerprint")

    monkeypatch.setattr(pipeline, "encode_rows", must_not_encode)
    fmt.tokenizer(["a b c"], truncation=True, max_length=2, padding="max_length")  # call state is not identity
    second = prepare_dataset(parse_recipe(tiny_args), fmt)
    assert second.cache_dir == first.cache_dir
    assert second.stats == first.stats
    assert second.train["input_ids"] == first.train["input_ids"]
    # A different max_length is a different cache entry.
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_dataset(parse_recipe(tiny_args + ["--max_seq_length", "256"]), fmt)


def test_eval_split_held_out_when_missing(tiny_args, fmt, sample_train_file):
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--eval_dataset_name", "", "--eval_split_size", "0.1"]), fmt)
    n_rows = sum(1 for _ in open(sample_train_file))
    assert prepared.eval_stats.rows_kept == int(n_rows * 0.1) == 20 and prepared.stats.moved_to_train == 0
    assert prepared.stats.rows_kept + prepared.eval_stats.rows_kept == n_rows


# -- bad input that must be counted, never crash and never change silently ----------------------------------

ROW = {"instruction": "Name the disease.", "input": "Fever and rash.", "output": "Measles."}


def _jsonl(path, records) -> str:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() + b"\n"
                              for r in records))
    return str(path)


def test_json_lines_split_on_newline_only(tmp_path):
    inside = {**ROW, "input": "line\u2028separator, paragraph\u2029separator and next\u0085line"}
    rows, report = read_rows(_jsonl(tmp_path / "u.jsonl", [ROW, inside, ROW | {"input": "x"}]), "train")
    assert report.rows_read == 3 and len(rows) == 3 and not report.skipped
    assert rows[1]["input"] == inside["input"]


def test_utf8_byte_order_mark_is_dropped_and_noted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n" + json.dumps(ROW | {"input": "x"}).encode())
    rows, report = read_rows(str(path), "train")
    assert len(rows) == 2 and not report.skipped and report.notes == {"utf8_bom": 1}
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([ROW, ROW | {"input": "y"}]).encode())
    rows, report = read_rows(str(array), "train")
    assert len(rows) == 2 and report.notes == {"utf8_bom": 1}


def test_malformed_json_array_file_is_counted_not_raised(tmp_path):
    good = tmp_path / "data" / "a.json"
    good.parent.mkdir()
    good.write_text(json.dumps([ROW, ROW | {"input": "2"}]))
    (tmp_path / "data" / "b.json").write_text('[{"instruction": "x", "output": "y"},')  # cut short
    rows, report = read_rows(str(tmp_path / "data"), "train")
    assert len(rows) == 2 and report.rows_read == 3
    assert dict(report.skipped) == {"invalid_json": 1}
    assert report.examples["invalid_json"] == [str(tmp_path / "data" / "b.json")]


def test_non_utf8_bytes_are_counted_not_replaced(tmp_path):
    latin1 = json.dumps(ROW | {"input": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n"
    path = _jsonl(tmp_path / "bytes.jsonl", [ROW, latin1, ROW | {"input": "ok"}])
    rows, report = read_rows(path, "train")
    assert [r["input"] for r in rows] == ["Fever and rash.", "ok"] and report.rows_read == 3
    assert dict(report.skipped) == {"invalid_utf8": 1} and report.examples["invalid_utf8"] == [f"{path}:2"]
    assert not any("\ufffd" in r["input"] for r in rows)
    array = tmp_path / "bytes.json"
    array.write_bytes(b"[" + latin1.strip() + b"]")
    assert dict(read_rows(str(array), "train")[1].skipped) == {"invalid_utf8": 1}


@pytest.mark.parametrize("value", [0, False, [], {}, 1.5])
def test_falsy_and_other_non_string_inputs_are_counted(tmp_path, value):
    rows, report = read_rows(_jsonl(tmp_path / "i.jsonl", [ROW, ROW | {"input": value}]), "train")
    assert len(rows) == 1 and dict(report.skipped) == {"non_string_input": 1}


def test_missing_or_null_input_is_an_empty_input(tmp_path):
    no_input = {k: v for k, v in ROW.items() if k != "input"}
    rows, report = read_rows(_jsonl(tmp_path / "n.jsonl", [no_input, ROW | {"input": None}]), "train")
    assert [r["input"] for r in rows] == ["", ""] and not report.skipped and report.duplicates == 1


def test_duplicates_are_counted_and_kept_and_rows_keep_their_index_and_source(tmp_path):
    records = [ROW, ROW | {"source": "chatdoctor"}, "not json", ROW | {"input": "other"}, ROW]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records))
    rows, report = read_rows(str(path), "train")
    assert len(rows) == 4 and report.duplicates == 2 and dict(report.skipped) == {"invalid_json": 1}
    assert [r["index"] for r in rows] == [0, 1, 3, 4] and rows[1]["source"] == "chatdoctor"


def test_held_out_rows_never_duplicate_train_rows(tiny_args, fmt, tmp_path, sample_train_file):
    lines = sample_train_file.read_text().splitlines()
    data = tmp_path / "twice.jsonl"
    data.write_text("\n".join(lines + lines[:100]) + "\n")  # 100 rows appear twice
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--dataset_name", str(data), "--eval_dataset_name", "",
                                                         "--eval_split_size", "0.2"]), fmt)
    train, held = prepared.stats, prepared.eval_stats
    assert train.duplicates == 100
    assert held.rows_kept + train.moved_to_train == int(303 * 0.2) and train.moved_to_train > 0
    assert train.rows_kept + held.rows_kept == 303
    eval_rows = [json.loads(line) for line in (prepared.cache_dir / pipeline.EVAL_ROWS).read_text().splitlines()]
    keys = {(r["instruction"], r["input"], r["output"]) for r in eval_rows}
    train_file_keys = {(r["instruction"], r["input"], r["output"]) for r in map(json.loads, lines + lines[:100])}
    assert len(eval_rows) == held.rows_kept and keys <= train_file_keys
    # every duplicated row is either wholly in train or wholly held out
    twice = {(r["instruction"], r["input"], r["output"]) for r in map(json.loads, lines[:100])}
    held_twice = [r for r in eval_rows if (r["instruction"], r["input"], r["output"]) in twice]
    assert len(held_twice) % 2 == 0


def test_eval_rows_shared_with_train_are_counted(tiny_args, fmt, tmp_path, sample_train_file):
    lines = sample_train_file.read_text().splitlines()
    changed = [json.dumps(json.loads(line) | {"input": "new " + json.loads(line)["input"]}) for line in lines[2:30]]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(lines[:2] + changed) + "\n")
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--eval_dataset_name", str(eval_file)]), fmt)
    assert prepared.eval_stats.rows_kept == 30 and prepared.eval_stats.shared_with_train == 2


def test_max_eval_samples_is_stratified_by_source(tiny_args, fmt, sample_eval_file):
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--max_eval_samples", "24"]), fmt)
    rows = [json.loads(line) for line in (prepared.cache_dir / pipeline.EVAL_ROWS).read_text().splitlines()]
    counts = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    assert len(rows) == prepared.eval_stats.rows_kept == 24 and set(counts.values()) == {2} and len(counts) == 12
    first_24 = [json.loads(line)["source"] for line in sample_eval_file.read_text().splitlines()[:24]]
    assert len(set(first_24)) < 12  # the file is in source blocks: "the first N" would miss sources


def test_cache_key_is_the_files_content(tiny_args, fmt, tmp_path, sample_train_file):
    data = tmp_path / "copy.jsonl"
    data.write_bytes(sample_train_file.read_bytes())
    args = tiny_args + ["--dataset_name", str(data)]
    first = prepare_dataset(parse_recipe(args), fmt)
    os.utime(data, (1, 1))  # a new modification time alone keeps the cache
    assert prepare_dataset(parse_recipe(args), fmt).cache_dir == first.cache_dir
    text = data.read_text()
    data.write_text(text.replace("patient", "patiens", 1))  # same size, new content
    assert data.stat().st_size == sample_train_file.stat().st_size
    assert prepare_dataset(parse_recipe(args), fmt).cache_dir != first.cache_dir


# -- conversation datasets ----------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I feel dizzy."},
                {"role": "assistant", "content": "Since when?"}, {"role": "user", "content": "This morning."},
                {"role": "assistant", "content": "Sit down and drink water."}]


def test_messages_and_prompt_completion_files_are_detected_and_bad_rows_counted(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "a_chat.jsonl", [
        {"messages": CONVERSATION, "source": "own"},
        {"messages": [{"role": "tool", "content": "x"}, *CONVERSATION[1:3]]},             # unknown_role
        {"messages": CONVERSATION[:2]},                                                    # no_assistant_turn
        {"messages": "hello"},                                                             # not_a_message_list
        {"messages": [CONVERSATION[1], {"role": "assistant", "content": 7}]},              # non_string_content
        {"messages": [CONVERSATION[1], {"role": "assistant", "content": "  "}]},           # empty_reply
        {"prompt": CONVERSATION[:2]},                                                       # missing_messages
    ])
    _jsonl(folder / "b_pc.jsonl", [
        {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
        {"prompt": CONVERSATION[:2], "completion": [{"role": "user", "content": "no reply"}]},  # no_assistant_turn
        {"prompt": "a string", "completion": "another"},                                         # not_a_message_list
    ])
    _jsonl(folder / "c_rows.jsonl", [ROW])
    rows, report = read_rows(str(folder), "train")
    assert report.formats == {str(folder / "a_chat.jsonl"): "messages", str(folder / "b_pc.jsonl"): "prompt_completion",
                              str(folder / "c_rows.jsonl"): "instruction"}
    assert dict(report.skipped) == {"unknown_role": 1, "no_assistant_turn": 2, "not_a_message_list": 2,
                                    "non_string_content": 1, "empty_reply": 1, "missing_messages": 1}
    assert report.rows_read == 11 and len(rows) == 3
    chat, completion, row = rows
    assert chat["messages"] == CONVERSATION and chat["train_from"] == 0 and chat["source"] == "own"
    assert completion["messages"] == CONVERSATION and completion["train_from"] == 4
    assert row["messages"][0]["content"] == "Name the disease.\n\nFever and rash." and row["train_from"] == 0


def test_every_assistant_turn_of_a_conversation_is_trained_only_the_completion_of_a_prompt(tmp_path, tiny_args, fmt):
    (tmp_path / "data").mkdir()
    chat = _jsonl(tmp_path / "data" / "chat.jsonl", [{"messages": CONVERSATION}])
    pc = _jsonl(tmp_path / "data" / "pc.jsonl", [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}])
    recipe = parse_recipe(tiny_args + ["--dataset_name", str(tmp_path / "data"), "--eval_split", "none",
                                       "--packing", "false"])
    prepared = prepare_dataset(recipe, fmt)
    assert prepared.stats.rows_kept == 2 and prepared.stats.formats == {chat: "messages", pc: "prompt_completion"}
    trained = [fmt.tokenizer.decode([i for i in row["labels"] if i != -100]) for row in prepared.train]
    assert sorted(trained) == sorted(["Since when?<|end_of_turn|> Sit down and drink water.<|end_of_turn|>",
                                      "Sit down and drink water.<|end_of_turn|>"])


def test_a_row_the_template_refuses_is_counted(tmp_path, tiny_args):
    from medtune.inference.chat_format import ChatFormat

    from families import tokenizer

    mistral = ChatFormat(tokenizer("mistral_v3"))  # its template raises on roles that do not alternate
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION},
                                            {"messages": [CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]]}])
    prepared = prepare_dataset(parse_recipe(tiny_args + ["--dataset_name", data, "--eval_split", "none"]), mistral)
    assert prepared.stats.rows_kept == 1 and prepared.stats.skipped == {"template_error": 1}


def test_show_json_prints_the_first_prepared_rows_unpacked(tiny_args, fmt, sample_train_file, capsys):
    from medtune.prepare_data import main

    main(tiny_args + ["--show", "3", "--json"])
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    first_rows = [json.loads(line) for line in sample_train_file.read_text().splitlines()[:3]]
    for record, row in zip(records, first_rows):
        assert set(record) == {"source", "messages", "input_ids", "labels"} and record["source"] == row["source"]
        assert record["messages"][1] == {"role": "assistant", "content": row["output"].strip()}
        assert record["input_ids"] == fmt.tokenizer.apply_chat_template(record["messages"])["input_ids"]
        trained = [i for i in record["labels"] if i != -100]
        assert fmt.tokenizer.decode(trained) == row["output"].strip() + "<|end_of_turn|>"
        assert len(record["labels"]) == len(record["input_ids"])


# -- every file type, read as written ---------------------------------------------------------------------------

NA_SPELLINGS = ["None", "NA", "N/A", "null", "nan", "NULL", "n/a", "#N/A", "-nan"]  # pandas' NA defaults


def _csv(path, lines: list[str], newline: str = "\n") -> str:
    path.write_text(newline.join(lines) + newline, newline="")
    return str(path)


def test_csv_cells_are_read_exactly_as_written(tmp_path):
    lines = ["instruction,input,output"] + [f"Which hallmarks?,{na},{na}" for na in NA_SPELLINGS]
    lines += ["Count.,,0", "Count.,007,1.50", 'Quote.,"a, ""b""\nand c",true']
    rows, report = read_rows(_csv(tmp_path / "hoc.csv", lines), "train")
    assert not report.skipped and report.rows_read == len(NA_SPELLINGS) + 3
    assert [(r["input"], r["output"]) for r in rows] == [(na, na) for na in NA_SPELLINGS] + [
        ("", "0"), ("007", "1.50"), ('a, "b"\nand c', "true")]
    numbers = read_rows(_csv(tmp_path / "n.csv", ["instruction,output", "Q1,1", "Q2,2", "Q3,3"]), "train")[0]
    assert [r["output"] for r in numbers] == ["1", "2", "3"]  # all numbers: still text


def test_csv_rows_that_cannot_be_read_as_written_are_counted(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"instruction,input,output\r" + b"Q,in,out\r" + b"Q,in,out,extra\r" + b"Q,in\r"
                     + b"Q,caf\xe9,out\r" + b"\r" + b"Q,\"two\rlines\",out\r")  # bare CRs end the lines
    rows, report = read_rows(str(path), "train")
    assert dict(report.skipped) == {"csv_field_count": 2, "invalid_utf8": 1} and report.rows_read == 5
    assert report.examples["csv_field_count"] == [f"{path}:3", f"{path}:4"]
    assert report.examples["invalid_utf8"] == [f"{path}:5"]
    assert [(r["input"], r["index"]) for r in rows] == [("in", 0), ("two\rlines", 4)]


def test_parquet_non_strings_are_counted_not_converted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": ["Q", "Q", "Q"], "input": ["None", "", None], "output": ["NA", "x", "y"]}),
                   path)
    rows, report = read_rows(str(path), "train")
    assert [(r["input"], r["output"]) for r in rows] == [("None", "NA"), ("", "x"), ("", "y")] and not report.skipped
    pq.write_table(pa.table({"instruction": ["Q", "Q"], "output": [1, 2]}), path)
    rows, report = read_rows(str(path), "train")
    assert rows == [] and dict(report.skipped) == {"non_string_output": 2}


def test_lone_carriage_returns_end_json_lines(tmp_path):
    records = [json.dumps(ROW | {"input": str(i)}).encode() for i in range(4)]
    path = tmp_path / "cr.jsonl"
    path.write_bytes(records[0] + b"\r" + records[1] + b"\r\n" + records[2] + b"\n\r" + records[3])
    rows, report = read_rows(str(path), "train")
    assert [r["input"] for r in rows] == ["0", "1", "2", "3"] and not report.skipped
    assert [r["where"] for r in rows] == [f"{path}:{n}" for n in (1, 2, 3, 5)]


def _compress(path, data: bytes, suffix: str):
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    target = path.with_name(path.name + suffix)
    target.write_bytes(compress(data))
    return str(target)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_files_are_read(tmp_path, suffix):
    lines = tmp_path / "rows.jsonl"
    _jsonl(lines, [ROW, ROW | {"input": "None"}])
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([ROW, ROW | {"input": "None"}]))
    table = tmp_path / "rows.csv"
    _csv(table, ["instruction,input,output", "Name the disease.,Fever and rash.,Measles.",
                 "Name the disease.,None,Measles."])
    for path in (lines, array, table):
        expected = read_rows(str(path), "train")[0]
        rows, report = read_rows(_compress(path, path.read_bytes(), suffix), "train")
        assert [r["input"] for r in rows] == [r["input"] for r in expected] == ["Fever and rash.", "None"]
        assert not report.skipped


def test_zstd_files_are_read_or_named_with_what_they_need(tmp_path):
    path = tmp_path / "rows.jsonl.zst"
    try:
        from compression import zstd
    except ImportError:
        try:
            import zstandard as zstd
        except ImportError:
            zstd = None
    if zstd is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")  # a zstd frame's magic number
        with pytest.raises(ValueError, match=f"{path}: reading .zst files needs the zstandard package"):
            read_rows(str(path), "train")
    else:
        path.write_bytes(zstd.compress(json.dumps(ROW).encode() + b"\n"))
        assert [r["input"] for r in read_rows(str(path), "train")[0]] == [ROW["input"]]


def test_other_files_are_an_error_alone_and_counted_and_named_in_a_folder(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    records = [ROW | {"input": str(i)} for i in range(20)]
    _jsonl(folder / "a.jsonl", records)
    _compress(folder / "b.jsonl", (folder / "a.jsonl").read_bytes(), ".gz")
    _jsonl(folder / "c.txt", records)
    (folder / "d.jsonl.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=f"{folder / 'c.txt'}: not a data file medtune reads"):
        read_rows(str(folder / "c.txt"), "train")
    with caplog.at_level("WARNING"):
        rows, report = read_rows(str(folder), "train")
    assert len(rows) == report.rows_read == 40 and not report.skipped
    assert report.unread_files == [str(folder / "c.txt"), str(folder / "d.jsonl.zip")]
    assert report.notes == {"unread_files": 2}
    assert "2 file(s) not read" in caplog.text and str(folder / "c.txt") in caplog.text
