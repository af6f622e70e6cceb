"""`medtune-eval` end to end: scoring replies made elsewhere (--predictions) on the sample, and an adapter vs its
base on the tiny model; the eval.json contract, per family and per source."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from medtune import adapters
from medtune.inference.load import load_for_inference
from medtune.eval import generate, run
from medtune.data.select import load_rows
from medtune.data.sources import FAMILIES, SOURCE_FAMILY

SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "data" / "sample" / "medtuned_sample_eval.jsonl"
OTHER_ROW = {"instruction": "Summarise the clinical note in one sentence.",
             "input": "Admitted with pneumonia, treated with amoxicillin, discharged on day 4.",
             "output": "Pneumonia treated with amoxicillin; home after four days."}
COUNT_METRICS = {"answer_words", "loss", "perplexity"}


def _sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_EVAL.read_text().splitlines()]


def _write_predictions(path: Path, replies: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in replies))
    return path


def test_scoring_mode_gold_as_prediction_scores_one_everywhere(tmp_path):
    rows = _sample_rows()
    preds = _write_predictions(tmp_path / "preds.jsonl", [{"prediction": r["output"]} for r in rows])
    run.main(["--data", str(SAMPLE_EVAL), "--predictions", str(preds), "--out", str(tmp_path / "report")])

    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert set(report["families"]) == set(FAMILIES) - {"other"}
    assert set(report["sources"]) == set(SOURCE_FAMILY)
    for group in ("families", "sources"):
        for name, metrics in report[group].items():
            assert metrics[metrics["primary"]] == 1.0, (group, name, metrics)
    assert report["sources"]["NCBI-disease"]["n"] == 3 and report["families"]["qa"]["n"] == 12
    assert report["sources"]["pmc_llama"] == pytest.approx({
        "n": 12, "primary": "answer_accuracy", "n_medmcqa": 4, "n_pubmedqa": 4, "n_rougeL": 10,
        "medmcqa_accuracy": 1.0, "pubmedqa_accuracy": 1.0, "answer_accuracy": 1.0, "rougeL_f": 1.0,
        "answer_words": report["sources"]["pmc_llama"]["answer_words"]})
    assert report["overall"] == {"n": len(rows)} and report["unknown_sources"] == {}
    assert report["rows"] == {"read": len(rows), "skipped": {}, "duplicates": 0, "notes": {},
                              "unusable_predictions": 0}
    markdown = (tmp_path / "report" / "eval.md").read_text()
    assert "| scope | name | n | metric | base | value | delta |" in markdown
    assert "| source | i2b2-2012 | 3 | entity_f1 * | – | 1.0000 | – |" in markdown
    written = [json.loads(line) for line in (tmp_path / "report" / "eval_predictions.jsonl").read_text().splitlines()]
    assert [w["prediction"] for w in written] == [r["output"] for r in rows]


def test_scoring_mode_lines_predictions_up_with_skipped_rows_and_counts_bad_ones(tmp_path, capsys):
    rows = _sample_rows()[:4] + [{"instruction": "x"}, OTHER_ROW, {**OTHER_ROW, "source": "my_corpus"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = [{"prediction": r.get("output", "")} for r in rows]
    replies[1] = {"text": "no prediction key"}
    preds = _write_predictions(tmp_path / "preds.jsonl", replies)
    run.main(["--data", str(data), "--predictions", str(preds), "--output", str(tmp_path / "out")])  # old flag name
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["rows"]["read"] == 7 and report["rows"]["skipped"] == {"missing_output": 1}
    assert report["rows"]["unusable_predictions"] == 1 and "preds.jsonl:2" in capsys.readouterr().out
    assert report["overall"]["n"] == 6 and report["unknown_sources"] == {"my_corpus": 1}
    assert report["sources"]["my_corpus"]["rougeL_f"] == 1.0 and report["families"]["other"]["n"] == 2
    with pytest.raises(SystemExit, match="has 6 records but --data has 7 rows"):
        run.main(["--data", str(data), "--predictions", str(_write_predictions(tmp_path / "short.jsonl", replies[:6])),
                  "--out", str(tmp_path / "out2")])


def test_scoring_mode_shows_ner_reply_lines_that_are_wrong_or_extra(tmp_path):
    rows = _sample_rows()
    replies = [{"prediction": r["output"] + ("\n" + r["output"]) * 9 if r["source"] == "NCBI-disease" else r["output"]}
               for r in rows]  # NCBI-disease replies loop: the gold ten times
    run.main(["--data", str(SAMPLE_EVAL), "--predictions", str(_write_predictions(tmp_path / "p.jsonl", replies)),
              "--out", str(tmp_path / "r")])
    ncbi = json.loads((tmp_path / "r" / "eval.json").read_text())["sources"]["NCBI-disease"]
    extra = 9 * sum(len(r["output"].split("\n")) for r in rows if r["source"] == "NCBI-disease")
    assert ncbi["n_extra_lines"] == extra and ncbi["n_misaligned_lines"] == 0
    assert ncbi["entity_f1"] == pytest.approx(2 / 11)  # precision 1/10, recall 1
    markdown = (tmp_path / "r" / "eval.md").read_text()
    assert f"| source | NCBI-disease | 3 | n_extra_lines | – | {extra} | – |" in markdown
    assert "| source | NCBI-disease | 3 | n_misaligned_lines | – | 0 | – |" in markdown
    assert "| source | BC2GM | 3 | n_extra_lines | – | 0 | – |" in markdown


def test_scoring_without_a_usable_prediction_exits_non_zero_with_the_count(tmp_path):
    preds = _write_predictions(tmp_path / "preds.jsonl", [{"text": r["output"]} for r in _sample_rows()])
    done = subprocess.run([sys.executable, "-m", "medtune.eval.run", "--data", str(SAMPLE_EVAL), "--predictions",
                           str(preds), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 1 and not (tmp_path / "r").exists()
    assert f"--predictions {preds}: none of its 58 records has a string 'prediction'" in done.stderr


def test_scoring_mode_samples_per_source(tmp_path):
    rows = _sample_rows()
    preds = _write_predictions(tmp_path / "preds.jsonl", [{"prediction": "None"} for _ in rows])
    run.main(["--data", str(SAMPLE_EVAL), "--predictions", str(preds), "--out", str(tmp_path / "r"),
              "--max-samples-per-source", "2", "--seed", "3"])
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert {s: m["n"] for s, m in report["sources"].items()} == {s: 2 for s in SOURCE_FAMILY}
    chosen = (tmp_path / "r" / "eval_predictions.jsonl").read_text()
    run.main(["--data", str(SAMPLE_EVAL), "--predictions", str(preds), "--out", str(tmp_path / "again"),
              "--max-samples-per-source", "2", "--seed", "3"])
    assert (tmp_path / "again" / "eval_predictions.jsonl").read_text() == chosen  # seeded


def test_flags_need_one_mode():
    with pytest.raises(SystemExit):
        run.parse_args(["--data", "x"])
    with pytest.raises(SystemExit):
        run.parse_args(["--data", "x", "--predictions", "p", "--baseline"])


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    """One sample row of every family plus one row no family claims."""
    rows, seen = [], set()
    for row in _sample_rows():
        if SOURCE_FAMILY[row["source"]] not in seen:
            seen.add(SOURCE_FAMILY[row["source"]])
            rows.append(row)
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [OTHER_ROW]))
    return path


@pytest.mark.slow
def test_cli_adapter_vs_base(random_adapter_dir, eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "report"
    run.main(["--model", str(random_adapter_dir), "--baseline", "--data", str(eval_file), "--max-new-tokens", "6",
              "--batch-size", "4", "--out", str(out), "--device", "cpu", "--wandb"])

    report = json.loads((out / "eval.json").read_text())
    assert report["baseline"]["overall"]["n"] == report["rows"]["read"] == 7
    assert report["model"] == str(random_adapter_dir)
    assert report["baseline"]["model"] == adapters.adapter_base(random_adapter_dir)
    for results in (report, report["baseline"]):
        assert set(results["families"]) == set(FAMILIES)
        assert results["families"]["other"]["n"] == 1
        assert results["overall"]["perplexity"] == pytest.approx(math.exp(results["overall"]["loss"]))
        for group in ("families", "sources"):
            for name, metrics in results[group].items():
                for metric, value in metrics.items():
                    if metric not in COUNT_METRICS and metric != "primary" and not metric.startswith("n"):
                        assert 0.0 <= value <= 1.0, (name, metric, value)
    assert report["overall"]["loss"] != report["baseline"]["overall"]["loss"]
    for r in report["table"]:
        assert r["delta"] == pytest.approx(r["value"] - r["base"])
    assert "| family | other | 1 | rougeL_f * |" in (out / "eval.md").read_text()
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 7 and all({"prediction", "base_prediction", "source"} <= set(p) for p in predictions)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_end_of_training_generation_eval_restores_training_mode(random_adapter_dir, eval_file):
    model, fmt = load_for_inference(random_adapter_dir, device="cpu")
    model.train()
    rows = load_rows(str(eval_file))[0][:3]
    results, _ = generate.evaluate_model(model, fmt, rows, max_new_tokens=2, batch_size=2)
    assert model.training
    metrics = generate.flat_metrics(results)
    assert metrics["eval_gen_all_n"] == 3 and metrics["eval_gen_all_perplexity"] > 1
    assert metrics["eval_gen_ner_n"] == 1 and "eval_gen_source_NCBI-disease_entity_f1" in metrics
    assert all(isinstance(v, float) for v in metrics.values())
    line = generate.headlines(results)
    assert line.startswith("ner entity_f1=") and "(n=1)" in line and "source" not in line


def test_baseline_flag_needs_an_adapter(tmp_path, eval_file):
    with pytest.raises(SystemExit, match="adapter"):
        run.main(["--model", str(tmp_path), "--baseline", "--data", str(eval_file)])
