"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


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
