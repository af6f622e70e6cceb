"""Dynamic batching: one background thread generates for every request of the server.

Requests wait in a queue (at most `max_queue`). Between two steps the thread starts a batch of every waiting request
while fewer than `max_batch_size` rows run, and steps every running batch once in turn: a request that arrives while
a long reply is being generated starts at the next step and shares the steps with it, instead of waiting for the
long reply to end. (transformers' KV cache cannot take rows in the middle of a batch, so newcomers get a batch of
their own; vLLM's continuous batching merges them into one.) Each step gives every row its next token, which goes
straight into that request's own asyncio queue (one hand-over to the event loop per step, for all rows): the thread
never waits for a client, so a slow or stalled reader holds only its own (bounded) backlog. A request that is
cancelled (its client went away) or past its deadline leaves its batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from medtune.chat_format import ChatFormat
from medtune.decoding import new_batch
from medtune.generation import Reply, Sampling

log = logging.getLogger("medtune.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many requests waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One request, and the queue of the event loop that submitted it, which receives its events:
    ("text", str), then ("finish", Finish), ("timeout", None) or ("error", str)."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: Sampling, stop: tuple[str, ...] = (),
                 deadline: float = math.inf):
        self.prompt, self.max_tokens, self.sampling, self.stop = prompt, max_tokens, sampling, stop
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()  # unbounded: the generation thread must never block on it
        self.completion_tokens = 0
        self.cancelled = False
        self.done = False


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


@dataclass
class _Running:
    """A batch in progress: its jobs and replies, in the order of its prompts, and its decoding state."""

    jobs: list[Job]
    replies: list[Reply]
    batch: object  # medtune.decoding.new_batch's
    started: float


class Batcher:
    def __init__(self, model, fmt: ChatFormat, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model, self.fmt = model, fmt
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.stats = dict(batches=0, largest_batch=0, finished=0, cancelled=0, timed_out=0, failed=0, tokens=0)
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._outbox: list[tuple[Job, tuple]] = []  # events of this step, handed over together
        self._cond = threading.Condition()
        self._closing = False
        self._last_batch_s = 1.0
        self._thread = threading.Thread(target=self._loop, name="medtune-batcher", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(not j.done for j in self._active)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(retry_after=min(60, max(1, math.ceil(self._last_batch_s))))
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop generating for `job` (no-op once it is done): it leaves the queue now, or its batch at the next step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                self.stats["cancelled"] += 1
        job.cancelled = True

    def _loop(self) -> None:
        batches: list[_Running] = []
        while True:
            with self._cond:
                while not self._waiting and not batches and not self._closing:
                    self._cond.wait()
                if self._closing:
                    break
                jobs = self._admit(self.max_batch_size - sum(len(b.batch.rows) for b in batches))
            if jobs and (started := self._guarded(jobs, self._start, jobs)):
                batches.append(started)
            for running in batches:
                self._guarded(running.jobs, self._step, running)
            self._flush()  # the clients get this round's tokens while the next one is computed
            for ended in [b for b in batches if not b.batch.rows or all(j.done for j in b.jobs)]:
                self._last_batch_s = time.monotonic() - ended.started  # how long a wait for room may last
                ended.batch.close()
            batches = [b for b in batches if b.batch.rows and not all(j.done for j in b.jobs)]
            self._active = [j for b in batches for j in b.jobs]
        for running in batches:
            running.batch.close()
        self._end([j for j in [*self._active, *self._waiting] if not j.done], "failed",
                  ("error", "the server is shutting down"))
        self._flush()

    def _admit(self, free: int) -> list[Job]:
        """The waiting jobs to start now, in order: at most `free`, and for a llama.cpp model only as many as its
        free KV cells hold (prompt and max_tokens each); the next one waits for cells to come back."""
        cells = getattr(self.model, "cells_free", None)
        jobs: list[Job] = []
        while self._waiting and len(jobs) < free:
            need = len(self._waiting[0].prompt) + self._waiting[0].max_tokens
            if cells is not None:
                if need > cells:
                    break
                cells -= need
            jobs.append(self._waiting.popleft())
        return jobs

    def _guarded(self, jobs: list[Job], work, *args):
        """work(*args), or after a failure the end of `jobs` with an error: a failed batch fails its requests, never
        the server."""
        try:
            return work(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests and logged
            log.exception("generation failed")
            self._end([j for j in jobs if not j.done], "failed", ("error", f"generation failed: {e}"))
            return None

    def _start(self, jobs: list[Job]) -> _Running | None:
        """A batch of `jobs` (its prompts prefilled), or None when every one was cancelled while waiting."""
        self._end([j for j in jobs if j.cancelled and not j.done], "cancelled")
        jobs = [j for j in jobs if not j.done]
        if not jobs:
            return None
        self._active += jobs
        self.stats["batches"] += 1
        batch = new_batch(self.model, self.fmt, [j.prompt for j in jobs], [j.sampling for j in jobs],
                          [j.max_tokens for j in jobs])
        running = _Running(jobs, [Reply(self.fmt, j.max_tokens, j.stop) for j in jobs], batch, time.monotonic())
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        return running

    def _step(self, running: _Running) -> None:
        batch, jobs, replies = running.batch, running.jobs, running.replies
        tokens = batch.sample()
        self.stats["tokens"] += len(tokens)
        keep = [self._feed(jobs[r], replies[r], t) for r, t in zip(batch.rows, tokens)]
        batch.advance(tokens, keep)

    def _feed(self, job: Job, reply: Reply, token: int) -> bool:
        """Give `job` its next token; False once its reply has ended (or nobody wants it any more)."""
        if job.cancelled:
            return self._end([job], "cancelled")
        if time.monotonic() > job.deadline:
            return self._end([job], "timed_out", ("timeout", None))
        if text := reply.add(token):
            self._outbox.append((job, ("text", text)))
        job.completion_tokens = reply.tokens
        if reply.finish_reason is None:
            return True
        finish = Finish(reply.finish_reason, len(job.prompt), reply.tokens)
        return self._end([job], "finished", ("finish", finish))

    def _end(self, jobs: list[Job], outcome: str, event: tuple | None = None) -> bool:
        for job in jobs:
            job.done = True
            self.stats[outcome] += 1
            if event:
                self._outbox.append((job, event))
        return False

    def _flush(self) -> None:
        """Hand this step's events to the event loops of their requests: one call per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job.events, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
