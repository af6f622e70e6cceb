"""Stop signals (SIGUSR1 ahead of a Slurm time limit, SIGTERM on preemption or scancel), remembered from process start.

`listen()` runs first thing in launch/train.py, before torch is imported, so that a signal during imports, data
preparation or model loading is remembered instead of being lost (the Slurm per-node launcher ignores USR1, and
its children inherit that) or fatal (SIGTERM's default). Training acts on it at a step boundary
(medtune.training.preemption). Standard library only, to be importable that early.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: signal.Signals | None = None
_previous: dict[signal.Signals, object] = {}


def _record(signum: int, frame) -> None:
    global _received
    _received = signal.Signals(signum)  # acted on at the next step boundary, never inside a step or collective


def listen() -> None:
    """From now on, record STOP_SIGNALS instead of dying of (or ignoring) them. Calling it again changes nothing."""
    for sig in STOP_SIGNALS:
        if sig not in _previous:
            _previous[sig] = signal.signal(sig, _record)


def received() -> signal.Signals | None:
    """The last stop signal this process received since `listen()`, or None."""
    return _received


def restore() -> None:
    """Give the stop signals their previous handlers back and forget a received one (end of an in-process run)."""
    global _received
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received = None
