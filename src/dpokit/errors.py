"""Errors that dpokit reports to the user as one clear message (no traceback) and a non-zero exit."""


class DpokitError(Exception):
    """Base class for every error the CLI turns into a one-line message and exit code 2."""


class DataError(DpokitError):
    """Bad input data: the message names the file, the line or row, and the field."""


class ConfigError(DpokitError):
    """An invalid option or combination of options."""


class TrainingError(DpokitError):
    """Training cannot go on (a non-finite gradient, say); the message says what to change."""


class DpokitWarning(UserWarning):
    """Something dpokit chose for the user (a slower but exact path, say); the CLI prints it as one line."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (the CLI exits with EXIT_INTERRUPTED)."""

    def __init__(self, signal: str, step: int, checkpoint) -> None:
        super().__init__(f"stopped by {signal} after step {step}; checkpoint written: {checkpoint}")
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped cleanly, resumable; distinct from errors (2) and Ctrl-C twice (130)
