"""Which stage failures Prefect retries: transient ones only."""

from __future__ import annotations

import logging

from tunegate.errors import TunegateError

log = logging.getLogger(__name__)

TRANSIENT = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
    "database is locked",
    "timed out",
    "remotedisconnected",
    "max retries exceeded",
    "503",
    "502",
    "504",
    "preempt",
)


def retry_transient(task, task_run, state) -> bool:
    """Retry a stage only when its failure may not happen again: a store or the network unreachable,
    a worker preempted. Bad data, a failed gate, a config or training error end the run at once."""
    try:
        state.result()
    except TunegateError:
        return False
    except (ConnectionError, TimeoutError) as exc:
        log.warning("transient failure, retrying: %s", exc)
        return True
    except Exception as exc:  # noqa: BLE001 - classify by what it says
        transient = is_transient(exc)
        if transient:
            log.warning("transient failure, retrying: %s", exc)
        return transient
    return False


def is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(m in text for m in TRANSIENT)
