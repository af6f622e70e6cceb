"""`medtune-eval` end to end on the tiny model: an adapter vs its base, every task family, report files."""

import json
import math
from pathlib import Path

import pytest

from medtune.eval import run
from medtune.eval.tasks import FAMILIES, detect_family
from medtune.tiny import build_tiny_model

SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "data" / "sample" / "medtuned_sample_eval.jsonl"
OTHER_ROW = {"instruction": "Summarise the clinical note in one sentence.",
             "input": "Admitted with pneumonia, treated with amoxicillin, discharged on day 4.",
             "output": "Pneumonia treated with amoxicillin; home after four days."}
COUNT_METRICS = {"answer_words", "loss", "perplexity"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A randomly initialised LoRA adapter on the tiny model (so tuned and base replies differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    """Two sample rows of every family plus one row no family claims."""
    rows, seen = [], {}
    for line in SAMPLE_EVAL.read_text().splitlines():
        row = json.loads(line)
        family = detect_family(row["instruction"])
        if seen.get(family, 0) < 2:
            seen[family] = seen.get(family, 0) + 1
            rows.append(row)
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [OTHER_ROW]))
    return path


@pytest.mark.slow
def test_cli_adapter_vs_base(adapter_dir, eval_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "report"
    run.main(["--model", str(adapter_dir), "--baseline", "--data", str(eval_file), "--max-new-tokens", "6",
              "--batch-size", "4", "--output", str(out), "--device", "cpu", "--wandb"])

    report = json.loads((out / "eval_results.json").read_text())
    assert report["baseline"] == run.inference.adapter_base(adapter_dir)
    assert report["rows"] == 2 * 6 + 1
    for which in ("tuned", "base"):
        results = report["results"][which]
        assert set(results) == set(FAMILIES) | {"all"}
        assert results["other"]["n"] == 1 and results["all"]["n"] == 13
        assert results["all"]["perplexity"] > 1
        assert results["all"]["perplexity"] == pytest.approx(math.exp(results["all"]["loss"]))
        for family, metrics in results.items():
            for name, value in metrics.items():
                if name not in COUNT_METRICS and not name.startswith("n"):
                    assert 0.0 <= value <= 1.0, (which, family, name, value)
    assert report["results"]["tuned"]["all"]["loss"] != report["results"]["base"]["all"]["loss"]

    table = report["table"]
    assert {r["family"] for r in table} == set(FAMILIES) | {"all"}
    for r in table:
        assert r["delta"] == pytest.approx(r["tuned"] - r["base"])
    markdown = (out / "eval_results.md").read_text()
    assert "| family | n | metric | base | tuned | delta |" in markdown
    assert "| other | 1 | rougeL_f |" in markdown
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 13 and all({"tuned", "base", "family"} <= set(p) for p in predictions)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_evaluate_generation_restores_training_mode(adapter_dir, eval_file):
    model, tok = run.inference.load_model(adapter_dir, device="cpu")
    model.train()
    rows = run.load_rows(str(eval_file))[:3]
    metrics = run.evaluate_generation(model, tok, rows, max_new_tokens=2, batch_size=2)
    assert model.training
    assert metrics["eval_gen_all_n"] == 3 and metrics["eval_gen_all_perplexity"] > 1
    assert all(isinstance(v, float) for v in metrics.values())


def test_select_rows_is_balanced_and_seeded():
    rows = [{"instruction": "Identify named entities.", "output": str(i)} for i in range(10)]
    rows += [{"instruction": "Answer the question.", "output": "q"}, {"instruction": "Summarise.", "output": "o"}]
    picked = run.select_rows(rows, 4, seed=1)
    assert len(picked) == 4
    assert sorted(detect_family(r["instruction"]) for r in picked) == ["ner", "ner", "other", "qa"]
    assert picked == run.select_rows(rows, 4, seed=1)
    assert run.select_rows(rows, None) == rows


def test_baseline_flag_needs_an_adapter(tmp_path, eval_file):
    with pytest.raises(SystemExit, match="adapter"):
        run.main(["--model", str(tmp_path), "--baseline", "--data", str(eval_file)])
