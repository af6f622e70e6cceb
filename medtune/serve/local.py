"""The in-process backend: the model loaded here, generation through the dynamic batcher."""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

from medtune.inference.chat_format import ChatFormat, RowError
from medtune.inference.generation import Sampling
from medtune.serve.batcher import Batcher, Job, QueueFull
from medtune.serve.errors import APIError, timeout_error
from medtune.serve.protocol import ChatParams, chunk, completion_body, sse, usage


class LocalBackend:
    def __init__(self, model, fmt: ChatFormat, name: str = "medtune", max_batch_size: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None):
        self.fmt, self.name = fmt, name
        self.batcher = Batcher(model, fmt, max_batch_size, max_queue)
        limit = getattr(model.config, "max_position_embeddings", None)
        self.context_size = min(filter(None, (limit, max_model_len)), default=None)

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        self.batcher.close()

    def health(self) -> dict:
        stats = self.batcher.stats
        return {"model": self.name, "waiting": self.batcher.waiting, "running": self.batcher.running,
                "requests": {k: stats[k] for k in ("finished", "cancelled", "timed_out", "failed")}}

    async def models(self) -> list[dict]:
        # max_model_len: vLLM's field for the context size; the page trims the conversation to fit it.
        return [{"id": self.name, "object": "model", "created": 0, "owned_by": "medtune",
                 "max_model_len": self.context_size}]

    def _submit(self, params: ChatParams, deadline: float, stream: bool) -> Job:
        try:
            prompt = self.fmt.prompt_ids(params.messages)
        except (RowError, ValueError) as e:  # e.g. a template that requires alternating roles
            raise APIError(400, f"the model's chat template refused the conversation: {e}", "messages") from None
        max_tokens = params.max_tokens
        if self.context_size:
            room = self.context_size - len(prompt)
            if params.fit_to_context:
                max_tokens = min(max_tokens, room)
            if max_tokens < 1 or len(prompt) + max_tokens > self.context_size:
                raise APIError(400, f"the conversation ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                    f"the context size ({self.context_size})", "messages", "context_length_exceeded")
        job = Job(prompt, max_tokens, Sampling(params.temperature, params.top_p), params.stop, deadline, stream)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job

    async def complete(self, params: ChatParams, meta: dict, triage: dict, deadline: float) -> dict:
        job = self._submit(params, deadline, stream=False)
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "finish":
                    return completion_body({**meta, "model": self.name}, triage, value.text, value.finish_reason,
                                           usage(value.prompt_tokens, value.completion_tokens))
                raise _event_error(kind, value)
        finally:  # also when the caller gives up (client gone, timeout): the batcher drops the row
            self.batcher.cancel(job)

    async def stream(self, params: ChatParams, meta: dict, triage: dict,
                     deadline: float) -> tuple[AsyncIterator[str], Callable[[], Awaitable[None]]]:
        """The chunks to send, and a cleanup (idempotent) that stops the generation."""
        job = self._submit(params, deadline, stream=True)  # before the first byte: errors still get their HTTP status

        async def cleanup() -> None:
            self.batcher.cancel(job)

        return self._events(job, {**meta, "model": self.name}, triage, params.include_usage), cleanup

    async def _events(self, job: Job, meta: dict, triage: dict, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield chunk(meta, {"role": "assistant", "content": ""}, triage=triage)
            while True:
                events = [await job.events.get()]  # the app ends the stream at the deadline (medtune.serve.app)
                while not job.events.empty():  # what else has arrived: one write for a client that lags behind
                    events.append(job.events.get_nowait())
                out, ended = [], False
                for kind, value in events:
                    if kind == "text":
                        out.append(chunk(meta, {"content": value}))
                        continue
                    if kind == "finish":
                        out.append(chunk(meta, {}, value.finish_reason))
                        if include_usage:
                            out.append(chunk(meta, None, usage=usage(value.prompt_tokens, value.completion_tokens)))
                        out.append(sse("[DONE]"))
                    else:  # headers are sent: the error goes in the stream, and no [DONE] follows
                        out.append(sse(_event_error(kind, value).body()))
                    ended = True
                    break
                yield "".join(out)
                if ended:
                    return
        finally:  # also on client disconnect (Starlette cancels the stream): the batcher drops the row
            self.batcher.cancel(job)


def _event_error(kind: str, value) -> APIError:
    """The error a batcher event other than text or finish stands for: its timeout, or a failed generation."""
    return timeout_error() if kind == "timeout" else APIError(500, value, type="server_error")
