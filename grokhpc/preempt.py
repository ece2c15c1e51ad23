"""Signals that end a training process become a state commit first.

SLURM sends USR2 a little before it preempts or times out a job (submitit asks for it, and
handles it by requeueing the job and exiting), and SIGTERM when it ends one; Ctrl-C sends
SIGINT. A training loop that is running when one comes writes every run's ``state.pt`` at the
next epoch boundary and only then hands the signal on to whoever handled it before: submitit
(requeue and exit, or ignore SIGTERM), Python's own SIGINT handler (KeyboardInterrupt, which
``python -m grokhpc.train`` turns into one line and exit status 130), the default action (the
process ends, as it would have), or nothing when it was ignored. Outside a training loop a
signal is handed on at once. Only the main thread can install the handlers; elsewhere this is
a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

SIGNAL = signal.SIGUSR2   # SLURM's warning
SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
_state: dict[str, Any] = {"armed": 0, "pending": [], "previous": {}}


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum: int, frame: Any) -> None:
    if _state["armed"]:
        if signum not in _state["pending"]:
            _state["pending"].append(signum)
    else:
        _hand_on(signum, frame)


def _hand_on(signum: int, frame: Any) -> None:
    previous = _state["previous"].get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous in (None, signal.SIG_DFL):   # end the process by the signal, as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """While a training loop runs: USR2, SIGTERM and SIGINT are remembered for the loop
    (``requested``) instead of acting at once. The outermost loop puts the previous handlers
    back when it leaves, and hands on a signal still pending."""
    if not _main_thread():
        yield
        return
    if not _state["armed"]:
        _state["previous"] = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, _handler)
    _state["armed"] += 1
    try:
        yield
    finally:
        _state["armed"] -= 1
        if not _state["armed"]:   # the handlers from before, then the signals that came
            for s in SIGNALS:
                previous = _state["previous"].get(s)
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            hand_on()


def requested() -> bool:
    """Whether a signal came and waits for the loop to write its state."""
    return bool(_state["pending"])


def hand_on() -> None:
    """After the state is written: act on each pending signal as its previous handler would
    (in the order they came; one that ends the process or raises ends it there)."""
    pending, _state["pending"] = _state["pending"], []
    for signum in pending:
        _hand_on(signum, None)
