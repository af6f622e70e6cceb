"""`medtune-eval --endpoint`: every row's reply from an OpenAI-compatible chat-completions server (vLLM,
medtune-serve, ...), N requests at a time, resumable.

A request asks for what local generation (medtune.eval.generate) does: the same messages (`row_messages`: the user
turn, no system prompt), greedy (`temperature: 0`), `max_tokens` = --max-new-tokens and no `stop` (local generation
stops only at <|end_of_turn|>, which ends the turn in the served chat template too); the reply is stripped, as local
replies are (a Starling reply starts with the space after "GPT4 Correct Assistant:").

- `connect` checks the key and the served model with GET /models before any row is sent.
- At most `concurrency` requests are in flight: that many workers, each sending one request at a time.
- Requests go through the openai client (`open_client`), with its retry policy, up to `max_attempts` attempts:
  408, 409, 429, 5xx, timeouts and lost connections are retried after the server's Retry-After (one over 2 minutes
  is not retried) or else an exponential backoff with jitter. Other 4xx (a row over the context, say) cannot
  succeed and fail the row at once, as does an answer that is no chat completion. A row that fails is recorded as
  failed and the run goes on; a server that cannot be reached `max_attempts` times in a row, or refuses the key,
  ends the run: the replies received so far are in eval_predictions.jsonl, and --resume goes on from there.
- Every attempt is counted by what came back, for the report's `requests`: by hand (`_CountingTransport`), as the
  client retries out of sight.
- Every reply is written as it arrives (medtune.eval.predictions); the report puts them back in row order.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import httpx
import openai
from tqdm import tqdm

from medtune.eval.predictions import PREDICTIONS, Journal, check_settings, key, read_done
from medtune.eval.prompt import row_messages

API_KEY_ENV = "MEDTUNE_EVAL_API_KEY"
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a reply queued behind a full batch on a busy server takes minutes
NO_KEY = "none"  # the openai client needs a key; a server without one ignores it
# The openai client adds OPENAI_ORG_ID / OPENAI_PROJECT_ID from the environment: an account of the user's that an
# evaluated server or an upstream (vLLM, anyone's) has no business seeing.
NO_ACCOUNT_HEADERS = {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}


@dataclass(frozen=True)
class Endpoint:
    url: str  # the API's base URL, e.g. http://gpu-node:8000/v1
    model: str  # the served model name requests carry
    api_key: str | None = None


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
    base = url.rstrip("/")
    # One attempt: a wrong URL or key is reported at once. The answer is read raw, to quote it when it is no list;
    # on httpx (the client's default is httpx2), whose responses and errors this module reads.
    with openai.OpenAI(base_url=base, api_key=api_key or NO_KEY, timeout=30, max_retries=0,
                       default_headers=NO_ACCOUNT_HEADERS, http_client=httpx.Client()) as client:
        try:
            response = client.models.with_raw_response.list().http_response
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise SystemExit(f"{flag} {url}: cannot reach the server ({type(cause).__name__}: {cause}); "
                             "is it running?") from None
        except openai.APIStatusError as e:
            response = e.response
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
    return Endpoint(base, served_model or names[0], api_key)


class _CountingTransport(httpx.AsyncHTTPTransport):
    """Counts every failed attempt by what came back ("503", "timeout", "ConnectError"); `reply` counts the answer."""

    def __init__(self, answers: Counter, **kwargs):
        super().__init__(**kwargs)
        self.answers = answers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TimeoutException:
            self.answers["timeout"] += 1
            raise
        except httpx.TransportError as e:
            self.answers[type(e).__name__] += 1
            raise
        if not response.is_success:
            self.answers[str(response.status_code)] += 1
        return response


def open_client(endpoint: Endpoint, concurrency: int, max_attempts: int, answers: Counter) -> openai.AsyncOpenAI:
    """The client for `reply`: `concurrency` connections, `max_attempts` attempts a request, every failed attempt
    counted in `answers`. Close it (`async with`)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return openai.AsyncOpenAI(base_url=endpoint.url, api_key=endpoint.api_key or NO_KEY, timeout=TIMEOUT,
                              max_retries=max_attempts - 1, default_headers=NO_ACCOUNT_HEADERS,
                              http_client=httpx.AsyncClient(transport=_CountingTransport(answers, limits=limits)))


def _after(error: openai.APIError) -> str:
    # The client numbers the retries in this header of each request it sends.
    attempts = int(error.request.headers.get("x-stainless-retry-count", 0)) + 1
    return f" (after {attempts} attempts)" if attempts > 1 else ""


async def reply(client: openai.AsyncOpenAI, endpoint: Endpoint, row: Mapping, max_new_tokens: int,
                answers: Counter) -> str:
    """The row's reply; `answers` counts the answer ("ok" or "malformed_answer"), the client the failed attempts."""
    try:
        # Raw, to quote an answer that is no chat completion.
        raw = await client.chat.completions.with_raw_response.create(
            model=endpoint.model, messages=row_messages(row), max_tokens=row.get("max_new_tokens", max_new_tokens),
            temperature=0)
    except openai.APITimeoutError as e:
        raise RowFailed(f"no answer within {TIMEOUT.read:.0f} s{_after(e)}") from None
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise EndpointDown(f"{type(cause).__name__}: {cause}{_after(e)}") from None
    except openai.APIStatusError as e:
        error = f"HTTP {e.status_code}: {_error_message(e.response)}"
        if e.status_code in (401, 403):
            raise EndpointDown(f"the server refused the API key during the run ({error})") from None
        raise RowFailed(error + _after(e)) from None
    try:
        text = (raw.parse().choices[0].message.content or "").strip()
    except (ValueError, AttributeError, IndexError, TypeError):
        answers["malformed_answer"] += 1
        raise RowFailed(f"an answer that is no chat completion: {raw.http_response.text[:200]!r}") from None
    answers["ok"] += 1
    return text


async def _generate_side(endpoint: Endpoint, side: str, rows: Sequence[Mapping], concurrency: int,
                         max_new_tokens: int, max_attempts: int, journal: Journal, replies: dict[int, str],
                         failed: dict[int, str], answers: Counter) -> None:
    pending = iter(rows)  # shared by the workers: each takes the next row when its request is answered
    bar = tqdm(total=len(rows), unit="row", desc=f"{side} <- {endpoint.model}", smoothing=0.05)

    async def worker(client: openai.AsyncOpenAI) -> None:
        for row in pending:
            try:
                replies[key(row)] = text = await reply(client, endpoint, row, max_new_tokens, answers)
                journal.add(row, side, text)
            except RowFailed as e:
                question = f", question {row['question']}" if "question" in row else ""
                failed[key(row)] = f"row {row['index']} ({row['where']}{question}): {e}"
                bar.write(f"failed: {failed[key(row)]}")
            bar.set_postfix(errors=sum(answers.values()) - answers["ok"], failed=len(failed), refresh=False)
            bar.update()

    async with open_client(endpoint, concurrency, max_attempts, answers) as client:
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
