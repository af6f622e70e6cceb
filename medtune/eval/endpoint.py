"""`medtune-eval --endpoint`: every row's reply from an OpenAI-compatible chat-completions server (vLLM,
medtune-serve, ...), N requests at a time, resumable.

A request asks for what local generation (medtune.eval.generate) does: the same messages (`row_messages`: the user
turn, no system prompt), greedy (`temperature: 0`), `max_tokens` = --max-new-tokens and no `stop` (local generation
stops only at <|end_of_turn|>, which ends the turn in the served chat template too); the reply is stripped, as local
replies are (a Starling reply starts with the space after "GPT4 Correct Assistant:").

- `connect` checks the key and the served model with GET /models before any row is sent.
- At most `concurrency` requests are in flight: that many workers, each sending one request at a time.
- 429 and 503 are retried after the server's Retry-After; timeouts, 408, other 5xx, broken answers and lost
  connections after an exponential backoff with jitter. Other 4xx (a row over the context, say) cannot succeed
  and fail the row at once. A row that fails `max_attempts` times is recorded as failed and the run goes on; a
  server that cannot be reached `max_attempts` times in a row, or refuses the key, ends the run: the replies
  received so far are in eval_predictions.jsonl, and --resume goes on from there.
- Every reply is written as it arrives (medtune.eval.predictions); the report puts them back in row order.

httpx rather than the openai client (which retries 429/503 after Retry-After too): the openai package is no
runtime dependency, and a run needs rules of its own on top (failed rows recorded while the run goes on, an
unreachable server ending it), so Retry-After and the backoff are handled here.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import httpx
from tqdm import tqdm

from medtune.eval.predictions import PREDICTIONS, Journal, check_settings, key, read_done
from medtune.eval.prompt import row_messages

API_KEY_ENV = "MEDTUNE_EVAL_API_KEY"
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a reply queued behind a full batch on a busy server takes minutes
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 300.0


@dataclass(frozen=True)
class Endpoint:
    url: str  # the API's base URL, e.g. http://gpu-node:8000/v1
    model: str  # the served model name requests carry
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class RowFailed(Exception):
    """This row got no reply; the run goes on."""


class EndpointDown(Exception):
    """The server stopped answering (or refuses the key): nothing more can be generated."""


@dataclass
class Outcome:
    replies: dict[str, dict[tuple, str]]  # side ("prediction" / "base_prediction") -> key (predictions.key) -> reply
    failed: dict[tuple, str]  # key -> why it has no reply
    requests: dict[str, dict] = field(default_factory=dict)  # side -> {"resumed", "sent", "errors": {why: n}}


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def connect(url: str, api_key: str | None, served_model: str | None, flag: str = "--endpoint") -> Endpoint:
    """The endpoint, once GET /models has shown that the key is accepted and which model to ask for (the only one
    served, or `served_model`, which must be among them). Every failure stops here, before any row."""
    endpoint = Endpoint(url.rstrip("/"), "", api_key)
    try:
        response = httpx.get(endpoint.url + "/models", headers=endpoint.headers, timeout=30)
    except httpx.HTTPError as e:
        raise SystemExit(f"{flag} {url}: cannot reach the server ({type(e).__name__}: {e}); is it running?") from None
    if response.status_code in (401, 403):
        raise SystemExit(f"{flag} {url} refused the API key (HTTP {response.status_code}: {_error_message(response)}); "
                         f"pass the server's key with --api-key or ${API_KEY_ENV}")
    try:
        response.raise_for_status()
        names = [m["id"] for m in response.json()["data"]]
    except (httpx.HTTPStatusError, ValueError, KeyError, TypeError):
        raise SystemExit(f"{flag} {url}: GET /models answered HTTP {response.status_code} "
                         f"({_error_message(response)!r}), not a model list; {flag} is the API's base URL, "
                         "e.g. http://127.0.0.1:8000/v1") from None
    model_flag = "--baseline-served-model" if flag == "--baseline-endpoint" else "--served-model"
    if served_model is None and len(names) != 1:
        raise SystemExit(f"{flag} {url} serves {len(names)} models ({', '.join(names)}): name one with {model_flag} "
                         "(vLLM with --enable-lora lists the base model and each adapter)")
    if served_model is not None and served_model not in names:
        raise SystemExit(f"{model_flag} {served_model}: {url} does not serve it (it serves {', '.join(names)})")
    return Endpoint(endpoint.url, served_model or names[0], api_key)


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_S, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    """The server's Retry-After (seconds or an HTTP date), a little later so that waiting clients do not all come
    back at once; the backoff when there is none."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return _backoff(attempt)
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds)) * random.uniform(1.0, 1.25)


async def reply(client: httpx.AsyncClient, endpoint: Endpoint, row: Mapping, max_new_tokens: int,
                 max_attempts: int, answers: Counter) -> str:
    """The row's reply; `answers` counts every attempt by what came back ("ok", "503", "timeout", "ConnectError")."""
    body = {"model": endpoint.model, "messages": row_messages(row),
            "max_tokens": row.get("max_new_tokens", max_new_tokens),
            "temperature": 0}
    attempt = 0
    while True:
        attempt += 1
        unreachable = False
        try:
            response = await client.post(endpoint.url + "/chat/completions", json=body, headers=endpoint.headers)
        except httpx.TimeoutException:
            why, error, wait = "timeout", f"no answer within {TIMEOUT.read:.0f} s", _backoff(attempt)
        except httpx.TransportError as e:
            why, error, wait, unreachable = type(e).__name__, f"{type(e).__name__}: {e}", _backoff(attempt), True
        else:
            status = response.status_code
            why, wait = str(status), _backoff(attempt)
            error = f"HTTP {status}: {_error_message(response)}" if status != 200 else ""
            if status == 200:
                try:
                    reply = (response.json()["choices"][0]["message"]["content"] or "").strip()
                    answers["ok"] += 1
                    return reply
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    why, error = "malformed_answer", f"an answer that is no chat completion: {response.text[:200]!r}"
            elif status in (401, 403):
                answers[why] += 1
                raise EndpointDown(f"the server refused the API key during the run ({error})")
            elif status in (429, 503):
                wait = _retry_after(response, attempt)
            elif status != 408 and status < 500:
                # The request itself is refused (the row is over the context, say): retrying cannot help.
                answers[why] += 1
                raise RowFailed(error)
        answers[why] += 1
        if attempt == max_attempts:
            raise (EndpointDown if unreachable else RowFailed)(f"{error} (after {attempt} attempts)")
        await asyncio.sleep(wait)


async def _generate_side(endpoint: Endpoint, side: str, rows: Sequence[Mapping], concurrency: int,
                         max_new_tokens: int, max_attempts: int, journal: Journal, replies: dict[int, str],
                         failed: dict[int, str], answers: Counter) -> None:
    pending = iter(rows)  # shared by the workers: each takes the next row when its request is answered
    bar = tqdm(total=len(rows), unit="row", desc=f"{side} <- {endpoint.model}", smoothing=0.05)

    async def worker(client: httpx.AsyncClient) -> None:
        for row in pending:
            try:
                replies[key(row)] = text = await reply(client, endpoint, row, max_new_tokens, max_attempts,
                                                       answers)
                journal.add(row, side, text)
            except RowFailed as e:
                question = f", question {row['question']}" if "question" in row else ""
                failed[key(row)] = f"row {row['index']} ({row['where']}{question}): {e}"
                bar.write(f"failed: {failed[key(row)]}")
            bar.set_postfix(errors=sum(answers.values()) - answers["ok"], failed=len(failed), refresh=False)
            bar.update()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        workers = [asyncio.ensure_future(worker(client)) for _ in range(min(concurrency, len(rows)))]
        try:
            await asyncio.gather(*workers)
        finally:  # one worker's EndpointDown (or Ctrl-C) stops the others before the client closes
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            bar.close()


def generate(sides: Mapping[str, Endpoint], rows: Sequence[Mapping], all_rows: Sequence[Mapping], out: str | Path,
             concurrency: int, max_new_tokens: int, max_attempts: int, resume: bool) -> Outcome:
    """The replies of every side (the tuned model's "prediction", the baseline's "base_prediction") to `rows` (MedTuned
    rows and consultation requests, each with its own max_new_tokens), one side after the other, skipping with
    --resume those already in out/eval_predictions.jsonl. `all_rows`: every row and request of --data, against which
    the resumed records are checked."""
    out = Path(out)
    check_settings(out, {"max_new_tokens": max_new_tokens, "served_models": {s: e.model for s, e in sides.items()}},
                   resume)
    path = out / PREDICTIONS
    done = read_done(path, {key(r): r for r in all_rows}) if resume and path.exists() else {}
    outcome = Outcome({side: {} for side in sides}, {})
    journal = Journal(path, done)
    try:
        for side, endpoint in sides.items():
            replies = outcome.replies[side]
            replies.update({k: record[side] for k, record in done.items() if side in record})
            todo = [row for row in rows if key(row) not in replies]
            print(f"{side}: {endpoint.model} at {endpoint.url}, {len(rows) - len(todo)} of {len(rows)} rows already "
                  f"in {path}, {len(todo)} to generate, {concurrency} at a time")
            answers: Counter = Counter()
            try:
                if todo:
                    asyncio.run(_generate_side(endpoint, side, todo, concurrency, max_new_tokens, max_attempts,
                                               journal, replies, outcome.failed, answers))
            except (EndpointDown, KeyboardInterrupt) as e:
                have = sum(key(row) in replies for row in rows)
                why = f"{endpoint.url} stopped answering: {e}" if isinstance(e, EndpointDown) else "interrupted"
                raise SystemExit(f"{why}. {have} of {len(rows)} {side} replies are in {path}; run the same command "
                                 "with --resume to go on") from None
            outcome.requests[side] = {"resumed": len(rows) - len(todo), "sent": sum(answers.values()),
                                      "errors": {k: v for k, v in sorted(answers.items()) if k != "ok"}}
    finally:
        journal.close()
    return outcome
