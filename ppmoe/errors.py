"""The errors ppmoe reports to a user as a message rather than a traceback (the command line prints them
and exits non-zero). Each message says what is wrong, where, and what to do."""

from __future__ import annotations


class PpmoeError(Exception):
    """Base of the errors the command line reports as one message."""

    exit_code = 2


class ConfigError(PpmoeError, ValueError):
    """A config that cannot run; the message says which key and what to change. Also a ValueError, as
    it always was, so callers that catch bad values keep catching it."""


class DataError(PpmoeError):
    """A prepared dataset that cannot be trained on as it is (missing, damaged, too small, wrong vocabulary)."""


class CheckpointError(PpmoeError):
    """A checkpoint that cannot be saved or loaded (damaged, incomplete, not a checkpoint, disk full)."""


class RunDirError(PpmoeError):
    """The run directory is in use by another run, or holds a run this one would silently destroy."""


class NonFiniteError(PpmoeError):
    """Training produced non-finite losses or gradients more often than train.nonfinite allows."""

    exit_code = 3
