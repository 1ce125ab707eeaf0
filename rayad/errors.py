"""User-facing errors: the CLI prints their message on one line and exits with code 2; and stop signals."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RayadError(ValueError):
    """A mistake in user input (path, flag, config value, data); the message names what is wrong."""


class ConfigError(RayadError):
    """A bad configuration key or value."""


class DataError(RayadError):
    """Missing, empty, corrupt or inconsistent data."""


class ArtifactError(RayadError):
    """A model artifact that cannot be used (missing, corrupt, inconsistent); the message names the file."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a job whose state is saved: what it had done, and the command that resumes it (the CLI
    prints both and exits with 130)."""

    def __init__(self, done: str, resume: str):
        super().__init__(f"{done}; the state is saved: resume with {resume}")
        self.done, self.resume = done, resume


def stop_on_sigterm() -> None:
    """Make SIGTERM (what Kubernetes, systemd and `kill` send) stop this process as Ctrl-C does, through the
    SIGINT handler of the moment: Ray Tune's and Ray Train's save their state. ray.init installs Ray's own
    SIGTERM handler, which dumps a C++ stack trace and aborts, so this runs again after it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(_signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (a background job of a shell, nohup): SIGTERM still stops
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextmanager
def sigint_restored() -> Iterator[None]:
    """Around Ray Tune's and Ray Train's `fit()`: each installs a SIGINT handler that stops its run, and leaves it
    in place after, where Ctrl-C (and SIGTERM, passed to it) then did nothing, or ended the process with code 0,
    while the best model was exported or the model calibrated."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
