"""SLURM's warning before a preemption or time-out becomes a state commit.

SLURM sends USR2 a little before it preempts or times out a job (submitit asks for it, and
handles it by requeueing the job and exiting). A training loop that is running when it comes
writes every run's ``state.pt`` at the next epoch boundary and only then hands the signal on
to whoever handled it before: submitit (requeue and exit), the default action (the process
ends, as it would have), or nothing when it was ignored. Outside a training loop the signal
is handed on at once. Only the main thread can install the handler; elsewhere this is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

SIGNAL = signal.SIGUSR2
_state: dict[str, Any] = {"armed": 0, "pending": None, "previous": None}


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum: int, frame: Any) -> None:
    if _state["armed"]:
        _state["pending"] = signum
    else:
        _hand_on(signum, frame)


def _hand_on(signum: int, frame: Any) -> None:
    previous = _state["previous"]
    if callable(previous):
        previous(signum, frame)
    elif previous in (None, signal.SIG_DFL):   # end the process by the signal, as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """While a training loop runs: USR2 is remembered for the loop (``requested``) instead of
    acting at once. The outermost loop puts the previous handler back when it leaves, and
    hands on a signal still pending."""
    if not _main_thread():
        yield
        return
    if not _state["armed"]:
        _state["previous"] = signal.getsignal(SIGNAL)
        signal.signal(SIGNAL, _handler)
    _state["armed"] += 1
    try:
        yield
    finally:
        _state["armed"] -= 1
        if not _state["armed"]:   # the handler from before, then the signal if one came
            signal.signal(SIGNAL, _state["previous"] if _state["previous"] is not None
                          else signal.SIG_DFL)
            hand_on()


def requested() -> bool:
    """Whether USR2 came and waits for the loop to write its state."""
    return _state["pending"] is not None


def hand_on() -> None:
    """After the state is written: act on a pending USR2 as its previous handler would."""
    signum, _state["pending"] = _state["pending"], None
    if signum is not None:
        _hand_on(signum, None)
