"""Smoke runs of every benchmark's code path, tiny sizes. Benchmarks are not tests: no timing is asserted."""

from __future__ import annotations

import json
import statistics
import tempfile

import pytest

from bench import cpu_train, data_pipeline, gpu_train, synthetic
from bench.training import CountingCollator


@pytest.fixture
def tmp_everything(tmp_path, monkeypatch):
    """Benchmarks use temporary folders for their cold caches: keep them inside tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def test_synthetic_rows_follow_the_source_mix_and_token_lengths(tiny_model_dir):
    from medtune.inference.load import load_tokenizer

    rows = synthetic.generate(3000, seed=1)
    assert rows == synthetic.generate(3000, seed=1)  # deterministic
    assert set(rows[0]) == {"instruction", "input", "output", "source"}
    for src in synthetic.SOURCES:
        share = sum(r["source"] == src.name for r in rows) / len(rows)
        assert abs(share - src.share) < 0.03, src.name
    # Word counts are derived from token targets: the median input length in Starling tokens must land near
    # the source's lognormal median (pmc_llama inputs add options or an abstract to the question).
    tok = load_tokenizer(str(tiny_model_dir))
    for src in synthetic.SOURCES:
        inputs = [r["input"] for r in rows if r["source"] == src.name][:200]
        med = statistics.median(len(ids) for ids in tok(inputs, add_special_tokens=False)["input_ids"])
        if src.kind != "pmc_llama":
            target = src.input_tokens[0] + (10 if src.name == "MedNLI" else 0)
            assert 0.75 * target <= med <= 1.3 * target, (src.name, med)
        if src.labels:
            assert {r["output"] for r in rows if r["source"] == src.name} <= {label for label, _ in src.labels}
        if src.kind in ("ner", "typed_ner"):  # one `token : TAG` line per input token
            assert all(len(r["output"].split("\n")) == len(r["input"].split(" "))
                       for r in rows if r["source"] == src.name)


def test_data_pipeline_benchmark_reports_every_side(tmp_everything):
    out = data_pipeline.run(rows=300, repeats=1, max_length=512)  # the recipe's length: real-shaped rows need it
    table = {row["side"]: row for row in out["table"]}
    assert set(table) == {"baseline", "medtune", "trl_packed", "medtune_cache_hit"}
    base, med, trl = table["baseline"], table["medtune"], table["trl_packed"]
    assert base["packed_rows"] == 300 and base["ratio_tokens_per_s"] == 1.0
    assert base["efficiency"] == pytest.approx(base["real_tokens"] / (300 * 512))
    assert med["efficiency"] > 0.9 > base["efficiency"]  # packing fills the slots, padding does not
    assert trl["real_tokens"] == base["real_tokens"]  # same text, same truncation
    assert table["medtune_cache_hit"]["seconds"] > 0
    assert out["lengths"]["p10"] < out["lengths"]["p50"] < out["lengths"]["p99"]


def test_cpu_train_benchmark_single_process(tmp_everything, tiny_model_dir):
    out = cpu_train.main(["--launchers", "single", "--steps", "3", "--warmup", "1", "--repeats", "1",
                          "--rows", "200", "--max-length", "256", "--batch", "2", "--model-dir", str(tiny_model_dir)])
    table = {row["side"]: row for row in out["table"]}  # 256: real-shaped rows are mostly over 128 tokens
    assert set(table) == {"baseline", "medtune", "trl_packed"}, out["raw"]
    assert table["baseline"]["ratio_tokens"] == 1.0
    assert table["medtune"]["slot_efficiency"] == 1.0  # padding-free: every slot is a real token
    assert table["baseline"]["slot_efficiency"] < 1.0  # padded to max_length
    for row in table.values():
        assert row["real_tokens_per_s"] > 0 and row["samples_per_s"] > 0


@pytest.mark.slow
def test_cpu_train_benchmark_two_process_ddp(tmp_everything, tiny_model_dir):
    out = cpu_train.main(["--launchers", "ddp", "--steps", "2", "--warmup", "1", "--repeats", "1", "--rows", "200",
                          "--max-length", "128", "--batch", "2", "--no-trl-packed", "--model-dir", str(tiny_model_dir)])
    table = {row["side"]: row for row in out["table"]}
    assert set(table) == {"baseline", "medtune"}, out["raw"]
    assert all(row["procs"] == 2 and row["real_tokens_per_s"] > 0 for row in table.values())


def test_cpu_train_counts_real_tokens_and_samples():
    import torch

    padded = CountingCollator(lambda f: {"input_ids": torch.zeros(2, 8, dtype=torch.long),
                                                   "attention_mask": torch.tensor([[1] * 3 + [0] * 5, [1] * 8])})
    packed = CountingCollator(lambda f: {"input_ids": torch.zeros(1, 7, dtype=torch.long),
                                                   "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])})
    padded(None), packed(None)
    assert padded.batches == [(11, 2, 16, 9 + 64)]
    assert packed.batches == [(7, 3, 7, 9 + 4 + 4)]


def test_gpu_benchmark_code_path_on_cpu(tmp_everything):
    out = gpu_train.main(["--model", "tiny", "--allow-cpu", "--model-dir", str(tmp_everything / "random"),
                          "--seq", "128", "--steps", "3", "--warmup", "1", "--repeats", "1", "--rows", "200",
                          "--sides", "baseline", "medtune", "--peak-tflops", "1"])
    table = {row["side"]: row for row in out["table"]}
    assert set(table) == {"baseline", "medtune"}
    assert table["medtune"]["slot_efficiency"] == 1.0
    assert all(0 < row["mfu"] < 1 for row in table.values())
    assert (tmp_everything / "random" / "model.safetensors.index.json").exists()


def test_gpu_benchmark_reports_a_failing_side_and_keeps_the_others(tmp_everything):
    out = gpu_train.main(["--model", "tiny", "--allow-cpu", "--model-dir", str(tmp_everything / "random"),
                          "--seq", "128", "--steps", "2", "--warmup", "1", "--repeats", "1", "--rows", "200",
                          "--sides", "medtune", "trl_packed", "--attn", "no_such_attention",
                          "--json", str(tmp_everything / "gpu.json")])
    table = {row["side"]: row for row in out["table"]}
    assert "no_such_attention" in table["medtune"]["note"] and "real_tokens_per_s" not in table["medtune"]
    assert table["trl_packed"]["real_tokens_per_s"] > 0 and "ratio_tokens" not in table["trl_packed"]  # no baseline
    assert json.loads((tmp_everything / "gpu.json").read_text())["table"] == out["table"]


def test_time_to_reach_interpolates_between_evaluations():
    from bench.quality import time_to_reach

    curve = [(10.0, 5, 2.0), (20.0, 10, 1.0)]
    assert time_to_reach(curve, 2.5, start_loss=3.0) == pytest.approx(5.0)  # half way from (0, 3) to (10, 2)
    assert time_to_reach(curve, 1.5, start_loss=3.0) == pytest.approx(15.0)
    assert time_to_reach(curve, 0.5, start_loss=3.0) is None


@pytest.mark.slow
def test_quality_benchmark_code_path(tmp_everything, tiny_model_dir):
    from bench import quality

    result = quality.main(["--model", str(tiny_model_dir), "--recipe", str(quality.ROOT / "configs/recipes/tiny.yaml"),
                           "--budget", "4", "--eval-every", "2", "--held-out", "4", "--max-new-tokens", "2",
                           "--work-dir", str(tmp_everything / "q"), "--json", str(tmp_everything / "q.json")])
    assert [s["side"] for s in result["sides"]] == list(quality.SIDES)
    for side in result["sides"]:
        assert side["steps"] > 0 and side["curve"] and side["curve"][-1][0] >= 4
        assert side["final_loss"] == side["curve"][-1][2] and side["headlines"]
    assert json.loads((tmp_everything / "q.json").read_text())["base_loss"] == pytest.approx(result["base_loss"])


def test_consultation_eval_benchmark_code_path(tiny_model_dir):
    from bench import consultation_eval
    from medtune.inference import decoding

    result = consultation_eval.main(["--model", str(tiny_model_dir), "--vignettes", "3", "--max-new-tokens", "2",
                                     "--repeats", "1"])
    assert [r["side"] for r in result["rows"]] == ["shared_prefix", "every_row"] and result["identical"]
    assert decoding.SHARED_PREFIX_MIN == 32  # restored
