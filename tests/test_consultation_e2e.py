"""The consultation task end to end: base against tuned on the tiny model through --model and through --endpoint (a
live medtune-serve, over real HTTP), the LLM judge against a live OpenAI-compatible server, and the consultation
logged at each evaluation of a short training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from serve_helpers import LocalServer

from medtune.eval import run
from medtune.eval.predictions import PREDICTIONS
from medtune.inference.load import load_for_inference
from medtune.serve.app import ServerSettings, create_app
from medtune.serve.local import LocalBackend

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "vignettes" / "heldout.jsonl"
SAMPLE_EVAL = ROOT / "data" / "sample" / "medtuned_sample_eval.jsonl"


@pytest.fixture(scope="module")
def vignettes(tmp_path_factory) -> Path:
    """Two held-out vignettes of each of the four levels."""
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    picked = [r for level in ("emergency", "urgent", "routine", "self-care")
              for r in [r for r in rows if r["triage"] == level][:2]]
    path = tmp_path_factory.mktemp("vignettes") / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


def report(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def consultation_records(out: Path) -> dict:
    records = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    return {(r["index"], r["question"]): r for r in records if r.get("family") == "consultation"}


@pytest.mark.slow
def test_model_mode_reports_the_consultation_base_against_tuned_next_to_medtuned(random_adapter_dir, vignettes,
                                                                                   tmp_path, capsys):
    out = tmp_path / "r"
    run.main(["--model", str(random_adapter_dir), "--baseline", "--data", str(SAMPLE_EVAL), str(vignettes),
              "--max-samples", "4", "--max-new-tokens", "8", "--batch-size", "8", "--device", "cpu",
              "--out", str(out)])
    r = report(out)
    tuned, base = r["families"]["consultation"], r["baseline"]["families"]["consultation"]
    contract = {"n", "primary", "triage_accuracy", "safety", "emergency_recall", "emergency_recall_ci",
                "under_triaged_emergencies", "over_triage", "unparsed", "top1", "top3", "top5"}
    assert contract <= set(tuned) and contract <= set(base)
    assert tuned["n"] == 8 and tuned["n_emergencies"] == 2 and set(tuned["questions"]) == {
        "consult", "triage", "likelihood", "differential"}
    assert tuned["questions"]["likelihood"]["unparsed"] == 0  # the likelihood level needs no parsing
    assert set(tuned["compared"]) == {"consult", "triage", "likelihood", "differential"}
    assert 0 <= tuned["compared"]["consult"]["safety"]["p_value"] <= 1
    assert isinstance(r["consultation_regressions"], list)
    assert r["overall"]["n"] == 4 and r["vignettes"] == 8  # MedTuned rows beside
    records = consultation_records(out)
    assert len(records) == 8 * 3
    assert all("prediction" in x and "base_prediction" in x for x in records.values())
    assert any(x["prediction"] != x["base_prediction"] for x in records.values())  # two models, not one twice
    printed = capsys.readouterr().out
    assert "4 MedTuned rows:" in printed and "McNemar p" in printed
    assert "### Regressions:" in (out / "eval.md").read_text()


@pytest.mark.slow
def test_endpoint_mode_asks_the_same_messages_and_gets_the_local_replies(tiny_model_dir, vignettes, tmp_path,
                                                                         capsys):
    local = tmp_path / "local"
    args = ["--data", str(vignettes), "--max-new-tokens", "8", "--batch-size", "8"]
    run.main(["--model", str(tiny_model_dir), "--device", "cpu", *args, "--out", str(local)])
    model_and_fmt = load_for_inference(tiny_model_dir, device="cpu")
    backend = LocalBackend(*model_and_fmt, "tiny-starling", max_batch_size=8)
    # The server's own default system prompt is not used: the consultation sends its system prompt itself.
    with LocalServer(create_app(backend, ServerSettings(system_prompt="something else"))) as server:
        remote = tmp_path / "remote"
        run.main(["--endpoint", server.url + "/v1", *args, "--concurrency", "4", "--out", str(remote)])
        capsys.readouterr()
        # the finished report is read back by --resume, keyed by vignette and question: nothing is asked again
        run.main(["--endpoint", server.url + "/v1", *args, "--out", str(remote), "--resume"])
        assert "24 of 24 rows already in" in capsys.readouterr().out
    mine, theirs = consultation_records(local), consultation_records(remote)
    assert mine.keys() == theirs.keys() and len(mine) == 8 * 3
    assert [mine[k]["prediction"] for k in mine] == [theirs[k]["prediction"] for k in mine]
    without_likelihood = {q: m for q, m in report(local)["families"]["consultation"]["questions"].items()
                          if q != "likelihood"}
    assert report(remote)["families"]["consultation"]["questions"] == without_likelihood


@pytest.mark.slow
def test_base_against_tuned_through_two_live_servers_equals_the_local_comparison(random_adapter_dir, tiny_model_dir,
                                                                                  vignettes, tmp_path):
    args = ["--data", str(vignettes), "--max-new-tokens", "6", "--batch-size", "8"]
    run.main(["--model", str(random_adapter_dir), "--baseline", str(tiny_model_dir), "--device", "cpu", *args,
              "--out", str(tmp_path / "local")])

    def server(path):
        return LocalServer(create_app(LocalBackend(*load_for_inference(path, device="cpu"), "m", max_batch_size=8),
                                      ServerSettings()))

    with server(random_adapter_dir) as tuned, server(tiny_model_dir) as base:
        run.main(["--endpoint", tuned.url + "/v1", "--baseline-endpoint", base.url + "/v1", *args,
                  "--out", str(tmp_path / "remote")])
    local, remote = report(tmp_path / "local"), report(tmp_path / "remote")
    for side in (lambda r: r["families"], lambda r: r["baseline"]["families"]):
        assert {q: m for q, m in side(local)["consultation"]["questions"].items() if q != "likelihood"} == \
            side(remote)["consultation"]["questions"]
    mine, theirs = consultation_records(tmp_path / "local"), consultation_records(tmp_path / "remote")
    assert [(m["prediction"], m["base_prediction"]) for m in mine.values()] == [
        (theirs[k]["prediction"], theirs[k]["base_prediction"]) for k in mine]
    assert remote["consultation_regressions"] == [
        r for r in local["consultation_regressions"] if r["question"] != "likelihood"]


def judge_app(fail_diagnosis: bool = False) -> FastAPI:
    """A live OpenAI-compatible judge: it answers "see a doctor" to every level question and "close" to every
    diagnosis question (HTTP 500 instead when `fail_diagnosis`)."""
    app = FastAPI()
    asked: list[str] = []
    app.state.asked = asked

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "judge", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        question = body["messages"][-1]["content"]
        asked.append(question)
        level = "What level of care" in question
        if fail_diagnosis and not level:
            return JSONResponse({"error": {"message": "judge down"}}, status_code=500)
        answer = "See a doctor." if level else "close"
        return {"id": "x", "object": "chat.completion", "model": "judge",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}]}

    return app


def test_the_judge_reads_replies_beside_the_rules_and_a_failing_judge_leaves_them_in_place(vignettes, tmp_path):
    rows = [json.loads(line) for line in vignettes.read_text().splitlines()]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"consult": "Call 999 now.", "triage": "emergency",
                                         "differential": f"1. {r['diagnosis'][0]}"}) + "\n" for r in rows))
    with LocalServer(judge_app()) as judge:
        run.main(["--data", str(vignettes), "--predictions", str(preds), "--out", str(tmp_path / "ok"),
                  "--judge-endpoint", judge.url + "/v1"])
        asked = judge.app.state.asked
    c = report(tmp_path / "ok")["families"]["consultation"]
    assert c["safety"] == 1.0 and c["top1"] == 1.0  # the deterministic reading
    j = c["judge"]
    assert j["model"] == "judge" and j["failed"] == 0 and len(asked) == 16
    assert j["consult"]["triage_accuracy"] == pytest.approx(4 / 8)  # "see a doctor" for all: the four ne cases
    assert j["consult"]["emergency_recall"] == 0 and j["top5_strict"] == 0 and j["top5_lenient"] == 1
    assert sum("Call 999 now." in a for a in asked) == 8

    with LocalServer(judge_app(fail_diagnosis=True)) as judge:
        run.main(["--data", str(vignettes), "--predictions", str(preds), "--out", str(tmp_path / "failing"),
                  "--judge-endpoint", judge.url + "/v1", "--judge-model", "judge"])
    c = report(tmp_path / "failing")["families"]["consultation"]
    assert c["safety"] == 1.0 and c["top1"] == 1.0
    assert c["judge"]["failed"] == 8 and "top5_strict" not in c["judge"] and "consult" in c["judge"]
    assert "judge down" in c["judge"]["failed_examples"][0]


def test_an_unreachable_judge_stops_before_any_work(vignettes, tmp_path):
    with pytest.raises(SystemExit, match="--judge-endpoint http://127.0.0.1:9/v1: cannot reach the server"):
        run.main(["--data", str(vignettes), "--predictions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path),
                  "--judge-endpoint", "http://127.0.0.1:9/v1"])


@pytest.mark.slow
def test_training_logs_the_consultation_at_each_evaluation(tiny_args, vignettes):
    from medtune.training.config import parse_recipe
    from medtune.training.train import train

    recipe = parse_recipe([*tiny_args, "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2",
                           "--generation_eval_samples", "0", "--sample_prompt", "", "--max_eval_samples", "4",
                           "--consultation_eval_dataset", str(vignettes), "--consultation_eval_max_new_tokens", "4"])
    result = train(recipe)
    logged = [e for e in result.log_history if "eval_consultation_consult_safety" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for entry in logged:
        assert 0 <= entry["eval_consultation_triage_triage_accuracy"] <= 1
        assert entry["eval_consultation_likelihood_unparsed"] == 0
        assert "eval_consultation_consult_emergency_recall" in entry
        assert "eval_consultation_base_consult_emergency_recall" in entry  # the base's, measured before step 1
    assert logged[0]["eval_consultation_base_consult_safety"] == logged[1]["eval_consultation_base_consult_safety"]
    assert result.safety_stop is None


@pytest.mark.slow
def test_the_safety_gate_stops_a_run_that_makes_the_model_miss_emergencies(tiny_args, tmp_path):
    """Trained to answer "Self-care" to the triage question of every emergency, the tiny model's likelihood triage
    stops recognising the emergencies its random base recognised: the gate ends the run with the step's adapter."""
    from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
    from medtune.training.config import parse_recipe
    from medtune.data.vignettes import EMERGENCY
    from medtune.eval import consultation
    from medtune.training.train import main, train

    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    emergencies = [r for r in rows if r["triage"] == EMERGENCY]
    vignettes = tmp_path / "emergencies.jsonl"
    vignettes.write_text("".join(json.dumps(r) + "\n" for r in emergencies))
    unsafe = tmp_path / "unsafe.jsonl"
    unsafe.write_text("".join(json.dumps({"messages": [
        *consultation.prompt({**r, "index": 0}, consultation.TRIAGE, DEFAULT_SYSTEM_PROMPT),
        {"role": "assistant", "content": "Self-care"}]}) + "\n" for r in emergencies))
    args = [*tiny_args, "--dataset_name", str(unsafe), "--eval_dataset_name", str(unsafe), "--max_steps", "40",
            "--eval_steps", "10", "--learning_rate", "2e-2", "--logging_steps", "10", "--generation_eval_samples", "0",
            "--sample_prompt", "", "--consultation_eval_dataset", str(vignettes),
            "--consultation_eval_max_new_tokens", "2", "--safety_regression", "stop"]
    result = train(parse_recipe(args))
    logged = [e for e in result.log_history if "eval_consultation_likelihood_under_triaged_emergencies" in e]
    assert logged[0]["eval_consultation_base_likelihood_under_triaged_emergencies"] < 16  # the base found some
    assert result.safety_stop and "likelihood under triaged emergencies: 16 against" in result.safety_stop
    assert logged[-1]["step"] < 40  # stopped at the evaluation that saw it
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert (result.output_dir / f"checkpoint-{logged[-1]['step']}").is_dir()
    with pytest.raises(SystemExit, match="safety gate at step .*set safety_regression: warn"):
        main([*args, "--output_dir", str(tmp_path / "again")])


def test_a_consultation_eval_file_without_vignettes_stops_the_run_before_the_model_loads(tiny_args, tmp_path):
    from medtune.training.config import parse_recipe
    from medtune.training.train import build_run

    recipe = parse_recipe([*tiny_args, "--consultation_eval_dataset", str(SAMPLE_EVAL)])
    with pytest.raises(ValueError, match="consultation_eval_dataset .*: no vignette with a triage level"):
        build_run(recipe)
