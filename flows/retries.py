"""Which stage failures Prefect retries, decided by an error's type and fields: a store or the network
out of reach is retried; out of memory, bad data, a failed gate, a config or training error end the run
at once. Out of memory is recognised, and explained, in `tunegate.out_of_memory`."""

from __future__ import annotations

import errno
import logging
import sys

from tunegate.errors import TunegateError
from tunegate.out_of_memory import causes, out_of_memory_link

log = logging.getLogger(__name__)

# 501 Not Implemented and 505 HTTP Version Not Supported say the request itself will never work.
PERMANENT_5XX = frozenset({501, 505})
NETWORK_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EHOSTDOWN})
SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def retry_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry a stage only when its failure may not happen again (see
    `is_transient`)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failure under judgement
        transient = is_transient(exc)
        if transient:
            log.warning("transient failure, retrying: %s: %s", type(exc).__name__, exc)
        return transient
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` may not happen again on a retry: a store or the network out of reach.

    Decided by type and structured fields along the chain of causes, never by wording alone:
    ConnectionError and TimeoutError (builtins, so socket.timeout and flows.placement.WorkerLost);
    requests' ConnectionError and Timeout; urllib3's ProtocolError, NewConnectionError, timeouts and
    MaxRetryError; httpx's transport errors; an HTTP error whose response status is 5xx (requests,
    httpx, Prefect, MLflow); sqlite's busy or locked database.

    Never transient: a TunegateError (tunegate's own verdict; its causes were judged when it was
    raised), and out of memory anywhere in the chain. A sqlite error in the chain decides on its own:
    a busy or locked database is transient, any other (a missing table, a file it cannot open) not.
    """
    if isinstance(exc, TunegateError):
        return False
    chain = []
    for link in causes(exc):
        if isinstance(link, TunegateError):
            break
        chain.append(link)
    if any(out_of_memory_link(link) for link in chain):
        return False
    for link in chain:
        if (locked := _sqlite_locked(link)) is not None:
            return locked
    return any(_transient(link) for link in chain)


def _sqlite_locked(exc: BaseException) -> bool | None:
    """True for sqlite's busy or locked database, False for any other sqlite error, None otherwise."""
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is None or not isinstance(exc, sqlite3.OperationalError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:  # extended codes (SQLITE_BUSY_SNAPSHOT, ...) keep the primary in the low byte
        return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS:
        return True
    return (
        _requests_transient(exc) or _urllib3_transient(exc) or _httpx_transient(exc) or _mlflow_transient(exc)
    )


def _transient_status(status: object) -> bool:
    return isinstance(status, int) and 500 <= status <= 599 and status not in PERMANENT_5XX


def _requests_transient(exc: BaseException) -> bool:
    rex = sys.modules.get("requests.exceptions")
    if rex is None:
        return False
    if isinstance(exc, rex.HTTPError):
        return _transient_status(getattr(exc.response, "status_code", None))
    # An SSLError is a ConnectionError to requests, but a certificate that fails fails again.
    return isinstance(exc, rex.ConnectionError | rex.Timeout) and not isinstance(exc, rex.SSLError)


def _urllib3_transient(exc: BaseException) -> bool:
    u3 = sys.modules.get("urllib3.exceptions")
    if u3 is None:
        return False
    if isinstance(exc, u3.MaxRetryError):
        # No reason, or a ResponseError: the retried statuses kept coming (the caller's list, 5xx);
        # otherwise the last failure decides (a certificate error is not an outage).
        reason = exc.reason
        return reason is None or isinstance(reason, u3.ResponseError) or _transient(reason)
    return isinstance(exc, u3.ProtocolError | u3.NewConnectionError | u3.TimeoutError)


def _httpx_transient(exc: BaseException) -> bool:
    httpx = sys.modules.get("httpx")
    if httpx is None:
        return False
    if isinstance(exc, httpx.HTTPStatusError):  # prefect's PrefectHTTPStatusError too
        return _transient_status(exc.response.status_code)
    # An unsupported scheme or a request this side got wrong is no outage.
    return isinstance(exc, httpx.TransportError) and not isinstance(
        exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError
    )


def _mlflow_transient(exc: BaseException) -> bool:
    mex = sys.modules.get("mlflow.exceptions")
    if mex is None or not isinstance(exc, mex.MlflowException):
        return False
    # MLflow gives its errors an HTTP status through their error code. TEMPORARILY_UNAVAILABLE (503)
    # and DEADLINE_EXCEEDED (504) say the store is out of reach. 500 is also the status of
    # INTERNAL_ERROR, the default code of any MlflowException raised on this side, so it counts only
    # when a server answered it (RestException); INVALID_STATE and DATA_LOSS (500 too) are verdicts.
    status = exc.get_http_status_code()
    if status in (503, 504):
        return True
    return status == 500 and isinstance(exc, mex.RestException) and exc.error_code == "INTERNAL_ERROR"
