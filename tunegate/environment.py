"""Environment variables lent for a block and given back: for the libraries that read a setting only
from the environment (MLflow's HTTP limits, an LLM judge's key, secrets from Prefect blocks)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def lent_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` in `os.environ` for the block, then restore each variable as it was (unset ones
    are removed again), whatever the block raises. Process-wide: not for concurrent threads."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
