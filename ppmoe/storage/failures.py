"""Why a checkpoint write or read failed, told apart (a full disk from the rest) and summed up in one line,
across the ranks: DCP raises the same CheckpointException on every rank, naming the ranks where the write
really failed, and a rank whose own file write failed must still tell the others."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed.checkpoint as dcp

from ..errors import CheckpointError

# A file system out of space (or out of this user's quota): the save can succeed elsewhere.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# torch.save reports a failed write of its zip container as a RuntimeError that carries no errno; while
# writing a checkpoint its usual cause is a full disk.
TORCH_WRITE_FAILED = "enforce fail at inline_container.cc"
NO_SPACE_TEXT = "no space left on device"
# Every exception a DCP call or a file write may raise. DCP's CheckpointException (every rank's failures,
# gathered) derives from BaseException, so `except Exception` alone would let it through.
SAVE_OR_LOAD_FAILURES = (Exception, dcp.CheckpointException)


class WriteFailure(NamedTuple):
    """What one rank reports to the others when its part of a save failed."""

    rank: int
    out_of_space: bool
    summary: str


# ---- failures ------------------------------------------------------------------------------------------
def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, what caused it, and what failed on other ranks inside a DCP CheckpointException."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        if isinstance(current, dcp.CheckpointException):
            pending += [wrapped[0] for wrapped in current.failures.values()]


def is_out_of_space(error: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in SPACE_ERRNOS or TORCH_WRITE_FAILED in str(e)
               or NO_SPACE_TEXT in str(e).lower() for e in exception_chain(error))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def summarize(error: BaseException) -> str:
    """One line for a message: the out-of-space error if there is one, else the innermost failure (DCP's
    CheckpointException only wraps the real one, with a traceback per rank)."""
    chain = [e for e in exception_chain(error) if not isinstance(e, dcp.CheckpointException)]
    space = [e for e in chain if isinstance(e, OSError) and e.errno in SPACE_ERRNOS]
    return first_line((space or chain[-1:] or [error])[0])


def failures_by_rank(error: BaseException, rank: int) -> list[tuple[int, BaseException]]:
    """(rank, exception) of every failure behind `error`, raised on `rank`: a DCP CheckpointException is
    raised on every rank but names the ranks where the write actually failed."""
    for current in exception_chain(error):
        if isinstance(current, dcp.CheckpointException) and current.failures:
            return [(where, wrapped[0]) for where, wrapped in sorted(current.failures.items())]
    return [(rank, error)]


def describe_failure(error: BaseException, rank: int) -> WriteFailure:
    """What to tell the other ranks: the first out-of-space failure behind `error`, else the first one."""
    failures = failures_by_rank(error, rank)
    where, cause = next(((r, e) for r, e in failures if is_out_of_space(e)), failures[0])
    return WriteFailure(where, is_out_of_space(cause), summarize(cause))


def attempt(fn: Callable, *args) -> tuple[Any, BaseException | None]:
    """(fn(*args), None), or (None, the error) when it fails: a rank that failed must still join the
    collective that tells the other ranks, or they would wait for it forever."""
    try:
        return fn(*args), None
    except SAVE_OR_LOAD_FAILURES as error:
        return None, error


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Report a failure to read `what` from checkpoint `path` (DCP's or torch.load's, from a damaged file)
    as a CheckpointError that says where and what to do."""
    try:
        yield
    except CheckpointError:
        raise
    except SAVE_OR_LOAD_FAILURES as error:
        raise CheckpointError(f"cannot read {what} from checkpoint {path} ({summarize(error)}): it is damaged or "
                              f"was saved for another model shape; resume from another checkpoint "
                              f"(train.resume=auto skips damaged ones)") from error
