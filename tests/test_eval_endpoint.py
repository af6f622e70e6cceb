"""`medtune-eval --endpoint`: generation through a live medtune-serve (and its --upstream front) over real HTTP.

The tiny model's replies are random-looking text, different for every row, so a reply landing on another row's
record is seen at once. The reference is local generation: `medtune-eval --model` on the same rows.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from serve_helpers import LIMITS, LocalServer, wait_for

from medtune.eval import run
from medtune.eval.predictions import PREDICTIONS
from medtune.inference.load import load_for_inference
from medtune.serve.app import ServerSettings, create_app
from medtune.serve.local import LocalBackend
from medtune.serve.protocol import Limits
from medtune.serve.upstream import UpstreamBackend

SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "data" / "sample" / "medtuned_sample_eval.jsonl"
ROWS = ["--data", str(SAMPLE_EVAL), "--max-samples", "12", "--max-new-tokens", "16"]
FEW = ["--data", str(SAMPLE_EVAL), "--max-samples", "8", "--max-new-tokens", "6"]
KEY = "sk-eval-key"


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_for_inference(tiny_model_dir, device="cpu")


def serve(model_and_tok, limits: Limits | None = None, **backend_kwargs) -> LocalServer:
    """medtune-serve's app on a real uvicorn server: no system prompt added (as `--system-prompt ''`), a key."""
    settings = ServerSettings(system_prompt="", api_key=KEY, limits=limits or Limits())
    return LocalServer(create_app(LocalBackend(*model_and_tok, "tiny-starling", **backend_kwargs), settings))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


def report(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def endpoint_eval(url: str, out: Path, *extra: str, rows: list[str] = ROWS) -> None:
    run.main(["--endpoint", url, "--api-key", KEY, *rows, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def local(tiny_model_dir, tmp_path_factory) -> Path:
    """`medtune-eval --model` on the tiny model (fp32 on CPU, greedy, batches of 8): the replies to match."""
    out = tmp_path_factory.mktemp("local")
    run.main(["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "8", *ROWS, "--out", str(out)])
    return out


def without_loss(results: dict) -> dict:
    return {name: {k: v for k, v in metrics.items() if k != "loss"} for name, metrics in results.items()}


@pytest.mark.slow
def test_endpoint_predictions_equal_local_generation_row_for_row(model_and_tok, local, tmp_path):
    with serve(model_and_tok, max_batch_size=8) as server:
        endpoint_eval(server.url + "/v1", tmp_path, "--concurrency", "4")
        assert server.backend.batcher.stats["largest_batch"] > 1  # rows really were generated together
    expected = records(local)
    assert len({r["prediction"] for r in expected}) == 12  # every row its own reply: a misplaced one would show
    got = records(tmp_path)
    assert [(r["index"], r["row_hash"]) for r in got] == [(r["index"], r["row_hash"]) for r in expected]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]

    result, reference = report(tmp_path), report(local)
    assert result["endpoint"] == server.url + "/v1" and result["served_model"] == "tiny-starling"
    assert (result["concurrency"], result["max_new_tokens"], result["decoding"]) == (4, 16, "greedy")
    for group in ("families", "sources"):
        assert result[group] == without_loss(reference[group])  # same replies, same scores
    assert result["overall"] == {"n": 12}  # no model here: no loss or perplexity
    assert result["rows"]["failed"] == 0
    assert result["requests"] == {"prediction": {"resumed": 0, "sent": 12, "errors": {}}}


@pytest.mark.slow
def test_order_is_kept_through_a_503_storm(model_and_tok, local, tmp_path):
    """One row generated at a time, one waiting, eight in flight: most requests are answered 503 and come back after
    Retry-After, in another order than they were sent; every reply still lands on its own row."""
    with serve(model_and_tok, max_batch_size=1, max_queue=1) as server:
        endpoint_eval(server.url + "/v1", tmp_path, "--concurrency", "8", "--max-attempts", "50")
        assert server.backend.batcher.stats["finished"] == 12
    requests = report(tmp_path)["requests"]["prediction"]
    assert requests["errors"]["503"] > 0 and set(requests["errors"]) == {"503"}
    assert requests["sent"] == 12 + requests["errors"]["503"]
    assert [(r["index"], r["prediction"]) for r in records(tmp_path)] == [
        (r["index"], r["prediction"]) for r in records(local)]


def test_at_most_n_in_flight_through_the_upstream_front_and_a_failed_row_retried_on_resume(model_and_tok,
                                                                                           tmp_path):
    """The --upstream front answers 503 beyond --max-queue requests in flight; with one attempt per row, any 503
    fails a row. At --concurrency 3 against a cap of 3 none does; at 6, rows fail, are counted and not scored, the
    run ends non-zero, and --resume sends only those rows again."""
    with serve(model_and_tok, max_batch_size=8) as upstream:
        front_app = create_app(UpstreamBackend(upstream.url + "/v1", KEY, max_in_flight=3),
                               ServerSettings(system_prompt="", api_key=KEY))
        with LocalServer(front_app) as front:
            capped = tmp_path / "capped"
            endpoint_eval(front.url + "/v1", capped, "--concurrency", "3", "--max-attempts", "1",
                          "--baseline-endpoint", upstream.url + "/v1", rows=FEW)
            result = report(capped)
            assert result["rows"]["failed"] == 0 and result["overall"]["n"] == 8
            assert result["requests"]["prediction"] == {"resumed": 0, "sent": 8, "errors": {}}
            assert result["baseline_endpoint"] == upstream.url + "/v1"
            assert result["served_model"] == result["baseline_served_model"] == "tiny-starling"
            # the same model behind both: the same replies and scores on both sides
            assert all(r["prediction"] == r["base_prediction"] for r in records(capped))
            assert result["baseline"]["families"] == result["families"]
            assert result["baseline"]["model"] == "tiny-starling"

            over = tmp_path / "over"
            with pytest.raises(SystemExit, match=r"row\(s\) got no reply and are not scored"):
                endpoint_eval(front.url + "/v1", over, "--concurrency", "6", "--max-attempts", "1", rows=FEW)
            result = report(over)
            failed = result["rows"]["failed"]
            assert failed > 0 and result["overall"]["n"] == 8 - failed == len(records(over))
            assert "HTTP 503" in result["rows"]["failed_examples"][0]
            assert result["requests"]["prediction"]["errors"] == {"503": failed}

            endpoint_eval(front.url + "/v1", over, "--concurrency", "3", "--max-attempts", "1", "--resume", rows=FEW)
    result = report(over)
    assert result["rows"]["failed"] == 0
    assert result["requests"]["prediction"] == {"resumed": 8 - failed, "sent": failed, "errors": {}}
    assert [r["prediction"] for r in records(over)] == [r["prediction"] for r in records(capped)]


@pytest.mark.parametrize("extra, message", [
    (["--api-key", "sk-wrong"], r"refused the API key \(HTTP 401"),
    ([], r"refused the API key \(HTTP 401.*MEDTUNE_EVAL_API_KEY"),
    (["--api-key", KEY, "--served-model", "other"], r"--served-model other: .* serves tiny-starling"),
    (["--api-key", KEY, "--baseline-served-model", "base"], r"--baseline-served-model base: .* serves tiny-starling"),
])
def test_a_wrong_key_or_model_stops_before_any_row(model_and_tok, tmp_path, monkeypatch, extra, message):
    monkeypatch.delenv("MEDTUNE_EVAL_API_KEY", raising=False)
    with serve(model_and_tok) as server:
        with pytest.raises(SystemExit, match=message):
            run.main(["--endpoint", server.url + "/v1", *extra, *ROWS, "--out", str(tmp_path / "out")])
        assert server.backend.health()["requests"]["finished"] == 0
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_and_flags_that_need_one(tmp_path):
    with pytest.raises(SystemExit, match="cannot reach the server"):
        run.main(["--endpoint", f"http://127.0.0.1:{free_port()}/v1", *ROWS, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    for flags in (["--resume"], ["--baseline-served-model", "base"]):
        with pytest.raises(SystemExit):
            run.parse_args(["--model", "m", "--data", "x", *flags])
    with pytest.raises(SystemExit):
        run.parse_args(["--endpoint", "http://x/v1", "--data", "x", "--concurrency", "0"])


def test_resume_keeps_what_arrived_and_refuses_other_data_or_settings(model_and_tok, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [json.loads(line) for line in SAMPLE_EVAL.read_text().splitlines()[:3]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with serve(model_and_tok, limits=LIMITS) as server:
        def args(tokens: int = 3) -> list[str]:
            return ["--endpoint", server.url + "/v1", "--api-key", KEY, "--data", str(data), "--max-new-tokens",
                    str(tokens), "--out", str(out)]

        run.main(args())
        complete = (out / PREDICTIONS).read_text()
        with pytest.raises(SystemExit, match="already holds predictions: pass --resume"):
            run.main(args())

        (out / PREDICTIONS).write_text(complete[:complete.rindex("\n", 0, -1) + 40])  # the last line cut short
        run.main([*args(), "--resume"])
        assert "1 unreadable line(s) left out" in capsys.readouterr().out
        assert report(out)["requests"]["prediction"] == {"resumed": 2, "sent": 1, "errors": {}}
        assert (out / PREDICTIONS).read_text() == complete

        with pytest.raises(SystemExit, match="made with --max-new-tokens 3, not 4"):
            run.main([*args(4), "--resume"])
        rows[1]["input"] += " (revised)"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(SystemExit, match=r"eval_predictions.jsonl:2 is a reply to row 1, but row 1 of --data "
                                             r"\(.*rows.jsonl:2\) has other content"):
            run.main([*args(), "--resume"])
        assert server.backend.batcher.stats["finished"] == 4  # the refused runs sent nothing


def test_a_row_the_server_refuses_is_counted_not_scored(model_and_tok, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [json.loads(line) for line in SAMPLE_EVAL.read_text().splitlines()[:3]]
    rows[1]["input"] = "word " * 500  # over the server's 2000 characters per message
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with serve(model_and_tok, limits=LIMITS) as server:
        with pytest.raises(SystemExit, match=r"1 row\(s\) got no reply .* row 1 \(.*rows.jsonl:2\): HTTP 400"):
            run.main(["--endpoint", server.url + "/v1", "--api-key", KEY, "--data", str(data), "--max-new-tokens",
                      "3", "--out", str(tmp_path / "out")])
    result = report(tmp_path / "out")
    assert result["rows"]["failed"] == 1 and "HTTP 400: message 0 is too long" in result["rows"]["failed_examples"][0]
    assert result["overall"]["n"] == 2 and result["requests"]["prediction"]["errors"] == {"400": 1}  # not retried
    assert [r["index"] for r in records(tmp_path / "out")] == [0, 2]


def start_medtune_serve(model_dir: Path, port: int) -> subprocess.Popen:
    """The real command, fp32 and without a system prompt, as docs/EVAL.md runs it for an evaluation."""
    proc = subprocess.Popen([sys.executable, "-m", "medtune.serve.cli", "--model", str(model_dir), "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--system-prompt", ""],
                            env={**os.environ, "MEDTUNE_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert proc.poll() is None, "medtune-serve exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=240, what="medtune-serve to start")
    return proc


@pytest.mark.slow
def test_a_server_that_dies_mid_run_then_resume(tiny_model_dir, local, tmp_path):
    """medtune-serve killed after a few replies: the run ends non-zero and keeps them; against a new server,
    --resume sends only the other rows, and the result is local generation's, row for row."""
    port = free_port()
    server = start_medtune_serve(tiny_model_dir, port)
    command = [sys.executable, "-m", "medtune.eval.run", *ROWS, "--out", str(tmp_path), "--concurrency", "2",
               "--max-attempts", "3"]
    env = {**os.environ, "MEDTUNE_EVAL_API_KEY": KEY}
    try:
        proc = subprocess.Popen([*command, "--endpoint", f"http://127.0.0.1:{port}/v1"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        path = tmp_path / PREDICTIONS
        wait_for(lambda: path.exists() and path.read_text().count("\n") >= 3, timeout=120, what="three replies")
    finally:
        server.kill()
        server.wait(30)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "stopped answering" in output and "with --resume" in output, output
    kept = records(tmp_path)  # in arrival order, one record per reply received
    expected = {r["index"]: r["prediction"] for r in records(local)}
    assert 3 <= len(kept) < 12 and all(r["prediction"] == expected[r["index"]] for r in kept)

    port = free_port()
    server = start_medtune_serve(tiny_model_dir, port)
    try:
        resumed = subprocess.run([*command, "--endpoint", f"http://127.0.0.1:{port}/v1", "--resume"], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    finally:
        server.terminate()
        server.wait(30)
    assert health["requests"]["finished"] == 12 - len(kept)  # only the rows that had no reply
    assert report(tmp_path)["requests"]["prediction"]["resumed"] == len(kept)
    assert [(r["index"], r["prediction"]) for r in records(tmp_path)] == [
        (r["index"], r["prediction"]) for r in records(local)]


@pytest.mark.slow
def test_eval_endpoint_benchmark_code_path(tmp_path):
    """bench/eval_endpoint.py at tiny sizes: every side, the comparison with local replies (no timing)."""
    from bench import eval_endpoint

    out = tmp_path / "eval_endpoint.json"
    result = eval_endpoint.main(["--rows", "3", "--max-new-tokens", "2", "--concurrency", "1", "2", "--repeats", "1",
                                 "--json", str(out)])
    assert [r["side"] for r in result["rows"]] == ["local", "endpoint_c1", "endpoint_c2"]
    assert all(r["same_as_local"] and r["failed"] == 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"][0]["ratio"] == 1.0
