"""DCP on one process, on purpose (export, import): its warning that it assumes one process says nothing
new to the user, so it is silenced here and only here."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def one_process_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
