"""Dynamic batching: one background thread generates for every request of the server.

Requests wait in a queue (at most `max_queue`). Between two steps the thread prefills the waiting requests that fit
(fewer than `max_batch_size` rows in all) and joins them to the running batch, as vLLM's continuous batching does: a
request that arrives while a long reply is being generated starts at the next step and shares one forward pass per
step with it, instead of waiting for the long reply to end; when more wait than fit, they are taken once half a
batch is free, so that one prefill pass serves several. Each step gives every row its next token; a streamed
request's text goes straight into its own asyncio queue (one hand-over to the event loop per step, for all rows), a
plain request gets its reply when it ends. The thread never waits for a client, so a slow or stalled reader holds
only its own (bounded) backlog. A request that is cancelled (its client went away) or past its deadline leaves its
batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from medtune.inference.chat_format import ChatFormat
from medtune.inference.decoding import new_batch, room
from medtune.inference.generation import Reply, Sampling

log = logging.getLogger("medtune.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many requests waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request, and the queue of the event loop that submitted it, which receives its events: when `stream`,
    ("text", str) as the reply grows; then ("finish", medtune.inference.generation.Completion), ("timeout", None) or
    ("error", str). A plain request gets only the last: waking its handler once per token costs the generation
    thread the GIL at every step."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: Sampling, stop: tuple[str, ...] = (),
                 deadline: float = math.inf, stream: bool = True):
        self.prompt, self.max_tokens, self.sampling, self.stop = prompt, max_tokens, sampling, stop
        self.stream = stream
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()  # unbounded: the generation thread must never block on it
        self.completion_tokens = 0
        self.cancelled = False
        self.done = False
        self.started = math.inf  # when it began generating


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


@dataclass
class _Running:
    """The batch in progress, and the job and reply of each of its rows (by row index)."""

    batch: object  # medtune.inference.decoding.new_batch's
    jobs: dict[int, Job]
    replies: dict[int, Reply]


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
        self._last_reply_s = 1.0
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
                raise QueueFull(retry_after=min(60, max(1, math.ceil(self._last_reply_s))))
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
        running: _Running | None = None
        while True:
            with self._cond:
                while not self._waiting and not running and not self._closing:
                    self._cond.wait()
                if self._closing:
                    break
                jobs = self._admit(self.max_batch_size - (len(running.batch.rows) if running else 0), not running)
            if jobs and (started := self._guarded(jobs, self._start, jobs)):
                if not running:
                    running = started
                elif not self._guarded(list(started.jobs.values()), self._join, running, started):
                    started.batch.close()  # the newcomers failed; the running batch is as it was
            if running:
                self._guarded(list(running.jobs.values()), self._step, running)
            self._flush()  # the clients get this round's tokens while the next one is computed
            if running and (not running.batch.rows or all(j.done for j in running.jobs.values())):
                running.batch.close()
                running = None
            self._active = list(running.jobs.values()) if running else []
        if running:
            running.batch.close()
        self._end([j for j in [*self._active, *self._waiting] if not j.done], "failed",
                  ("error", "the server is shutting down"))
        self._flush()

    def _admit(self, free: int, idle: bool) -> list[Job]:
        """The waiting jobs to start now, in order: at most `free`, and for a llama.cpp model only as many as its
        free sequences and KV cells hold (prompt and max_tokens each); the next one waits for room to come back. An
        `idle` server starts the first one anyway: one that can never fit fails, with the engine's reason."""
        if not idle and len(self._waiting) > free and free < self.max_batch_size / 2:
            return []  # more wait than fit: take them when half a batch is free, one prefill pass for them all
        waiting = list(self._waiting)[:free]
        n = room(self.model, [len(j.prompt) + j.max_tokens for j in waiting])
        if idle and waiting and not n:
            n = 1
        return [self._waiting.popleft() for _ in range(n)]

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
        for job in jobs:
            job.started = time.monotonic()
        batch = new_batch(self.model, self.fmt, [j.prompt for j in jobs], [j.sampling for j in jobs],
                          [j.max_tokens for j in jobs])
        return _Running(batch, dict(enumerate(jobs)), {i: Reply(self.fmt, j.max_tokens, j.stop)
                                                       for i, j in enumerate(jobs)})

    def _join(self, running: _Running, newcomers: _Running) -> _Running:
        offset = running.batch.size
        running.batch.join(newcomers.batch)
        running.jobs.update({offset + r: j for r, j in newcomers.jobs.items()})
        running.replies.update({offset + r: reply for r, reply in newcomers.replies.items()})
        return running

    def _step(self, running: _Running) -> None:
        batch, jobs, replies = running.batch, running.jobs, running.replies
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
        tokens = batch.sample()
        self.stats["tokens"] += len(tokens)
        keep = [self._feed(jobs[r], replies[r], t) for r, t in zip(batch.rows, tokens)]
        for r, k in zip(list(batch.rows), keep):
            if not k:  # its job has ended: nothing of it is needed any more
                del jobs[r], replies[r]
        batch.advance(tokens, keep)

    def _feed(self, job: Job, reply: Reply, token: int) -> bool:
        """Give `job` its next token; False once its reply has ended (or nobody wants it any more)."""
        if job.cancelled:
            return self._end([job], "cancelled")
        if time.monotonic() > job.deadline:
            return self._end([job], "timed_out", ("timeout", None))
        if (text := reply.add(token)) and job.stream:
            self._outbox.append((job, ("text", text)))
        job.completion_tokens = reply.tokens
        if reply.finish_reason is None:
            return True
        self._last_reply_s = time.monotonic() - job.started  # how long a wait for room may last
        return self._end([job], "finished", ("finish", reply.completion(len(job.prompt))))

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
