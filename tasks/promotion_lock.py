"""The lock under which a registered model's aliases move, across processes and across machines.

`promotion_lock(cfg)` gives a file lock beside a local store (sqlite or a path): only processes on
this machine can reach that store, and the kernel drops the lock the moment its holder dies. For a
remote tracking server it gives a lease kept in the server itself (`registry_lock`): two runs may
each talk to their own Prefect API (an ephemeral one, say), so the tracking server is the only thing
they are sure to share, and a lock kept anywhere else would not exclude them.

MLflow's REST API has no conditional update, but creating a registered model is a compare-and-set:
the name is the primary key of the server's `registered_models` table, so of two creates of one name
exactly one succeeds and the other gets RESOURCE_ALREADY_EXISTS. The lease is a chain of registered
models `NAME.promotion-lock.000000001`, `...2`, ...; holding the lock means having created the newest.
To take it, a run reads the newest link: if it is released, or its holder's heartbeat tag has not
changed for a whole lease on the reader's own clock (no clocks compared across machines), the run
creates the next number. Of all runs that judged the newest link free, the create lets exactly one
in. A stale holder is never deleted out from under anyone (a check-then-delete would be the same
race again): it is superseded, and learns so from `Lease.lost()` before it moves an alias.

Release tags the holder's own link released and deletes the links below it. The newest link is never
deleted, so a number is never taken twice unless someone deletes links by hand; even then a run that
creates a number below an existing one sees the newer link and backs off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from tunegate.config import RegistrySection
from tunegate.errors import PromotionError

log = logging.getLogger(__name__)

LEASE_S = 60.0  # how long a run killed inside the lock holds up the next one
HOLDER, BEAT, RELEASED = "tunegate.lock.holder", "tunegate.lock.beat", "tunegate.lock.released"
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class LockHeld(PromotionError):
    """Another run held the promotion lock for the whole timeout."""


class Lease(Protocol):
    def lost(self) -> str | None:
        """Why this process may no longer hold the lock (another run may have taken it), or None."""


Lock = Callable[[], contextlib.AbstractContextManager[Lease]]


def promotion_lock(cfg: RegistrySection, timeout_s: float = 600) -> Lock:
    """The lock for alias moves on `cfg.model_name`: a file lock for a local store, a lease in the
    tracking server for a remote one. Entering it raises LockHeld after `timeout_s`."""
    if local_store(cfg) is not None:
        return local_promotion_lock(cfg, timeout_s)
    return registry_lock(cfg, timeout_s)


def local_promotion_lock(cfg: RegistrySection, timeout_s: float = 600) -> Lock:
    """A file lock for alias moves on one registered model in a local store, across processes.

    Raises:
        PromotionError: the store is remote; a file lock here would not exclude another machine.
    """
    local = local_store(cfg)
    if local is None:
        raise PromotionError(
            f"{cfg.tracking_uri} is a remote store: promotion needs a cross-process lock that the tracking "
            "server holds (promotion_lock), not a local file lock"
        )

    @contextlib.contextmanager
    def file_lock() -> Iterator[Lease]:
        from filelock import Timeout

        try:
            with _file_lock(local, f"{cfg.model_name}.promote", timeout_s):
                yield _KEPT
        except Timeout as exc:
            raise LockHeld(
                f"another process held the promotion lock of {cfg.model_name} ({exc.lock_file}) for the "
                f"whole {timeout_s:g} s timeout"
            ) from None

    return file_lock


def registry_lock(
    cfg: RegistrySection, timeout_s: float = 600, lease_s: float = LEASE_S, poll_s: float = 1.0
) -> Lock:
    """A lease on `cfg.model_name`'s promotion kept in the tracking server (see the module docstring).

    Entering it waits, polling every `poll_s`, until the lock is free or its holder has not renewed its
    lease for `lease_s`; the holder renews it every quarter lease until it leaves.
    """

    @contextlib.contextmanager
    def registry_lease() -> Iterator[Lease]:
        held = _acquire(_client(cfg), f"{cfg.model_name}.promotion-lock.", timeout_s, lease_s, poll_s)
        try:
            yield held
        finally:
            held.release()

    return registry_lease


@contextlib.contextmanager
def store_setup_lock(cfg: RegistrySection, timeout_s: float = 300) -> Iterator[None]:
    """Serialise the first use of a local store: MLflow creates and migrates a new sqlite database on
    first contact, and two processes doing that at once fail."""
    local = local_store(cfg)
    if local is None:
        yield
        return
    with _file_lock(local, "setup", timeout_s):
        yield


def local_store(cfg: RegistrySection) -> Path | None:
    parsed = urlparse(cfg.tracking_uri)
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's form)
        return Path(cfg.tracking_uri.removeprefix("sqlite:///"))
    if parsed.scheme in ("file", ""):
        return Path(parsed.path if parsed.scheme else cfg.tracking_uri)
    return None


@contextlib.contextmanager
def _file_lock(store: Path, purpose: str, timeout_s: float) -> Iterator[None]:
    from filelock import FileLock

    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.parent / f".{store.name}.{purpose}.lock"), timeout=timeout_s):
        yield


class _Kept:
    """A kernel lock is never lost while its holder lives."""

    def lost(self) -> str | None:
        return None


_KEPT = _Kept()


class _RegistryLease:
    """One holding of a registry lock: the link this run created, and the heartbeat that renews it."""

    def __init__(self, client, name: str, token: str, lease_s: float, since: float) -> None:
        self.client, self.name, self.token, self.lease_s = client, name, token, lease_s
        # When the last renewal the server took was sent: a waiter can first have seen it only later,
        # so it cannot break the lease before since + lease_s.
        self._renewed = since
        self._lapsed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {name}", daemon=True)
        self._thread.start()

    def lost(self) -> str | None:
        quiet = time.monotonic() - self._renewed
        if not self._lapsed and quiet < self.lease_s / 2:
            return None
        return (
            f"the lease on {self.name} was last renewed {quiet:.0f} s ago (lease {self.lease_s:g} s): "
            "another run may have taken the promotion lock"
        )

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        self._stop.set()
        self._thread.join(timeout=self.lease_s)
        prefix, number = _split(self.name)
        try:
            self.client.set_registered_model_tag(self.name, RELEASED, "true")
            for older in sorted(n for n in _chain(self.client, prefix) if n < number):
                _delete(self.client, _link(prefix, older))
        except MlflowException as exc:
            # Raising here would hide how the promotion itself ended; the lease runs out on its own.
            log.warning(
                "could not release the promotion lock %s (%s); the next run takes it once its %g s lease "
                "has run out",
                self.name,
                exc,
                self.lease_s,
            )

    def _beat(self) -> None:
        from mlflow.exceptions import MlflowException

        beat = 0
        while not self._stop.wait(self.lease_s / 4):
            beat += 1
            sent = time.monotonic()
            try:
                self.client.set_registered_model_tag(self.name, BEAT, str(beat))
            except MlflowException as exc:
                log.warning("could not renew the lease on %s: %s", self.name, exc)
                continue
            if time.monotonic() - self._renewed >= self.lease_s / 2:
                # After half a lease of silence (a paused process, a slow server) a waiter may already
                # have broken the lease, and this renewal cannot undo that: the lease is over for good.
                self._lapsed = True
                log.warning("the lease on %s lapsed; this run no longer holds the promotion lock", self.name)
                return
            self._renewed = sent


def _acquire(client, prefix: str, timeout_s: float, lease_s: float, poll_s: float) -> _RegistryLease:
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout_s
    seen: dict[tuple, float] = {}  # (link, holder, beat) -> when this process first saw it
    while True:
        chain = _chain(client, prefix)
        newest = max(chain, default=0)
        if newest == 0 or _free(chain[newest], seen, lease_s):
            mine = _link(prefix, newest + 1)
            sent = time.monotonic()
            if _create(client, mine, token):
                if max(_chain(client, prefix), default=0) == newest + 1:
                    log.info("took the promotion lock %s", mine)
                    return _RegistryLease(client, mine, token, lease_s, sent)
                _delete(client, mine)  # a number below the newest (links were deleted by hand): not ours
            continue  # another run took that number first: look again
        if time.monotonic() > deadline:
            holder = chain[newest].tags.get(HOLDER, "?")
            raise LockHeld(
                f"another run ({holder}) held the promotion lock {_link(prefix, newest)} on the tracking "
                f"server for the whole {timeout_s:g} s timeout"
            )
        time.sleep(poll_s)


def _free(link, seen: dict[tuple, float], lease_s: float) -> bool:
    """Released, or its heartbeat has stood still for a whole lease as this process saw it."""
    if link.tags.get(RELEASED) == "true":
        return True
    first = seen.setdefault((link.name, link.tags.get(HOLDER), link.tags.get(BEAT)), time.monotonic())
    return time.monotonic() - first >= lease_s


def _create(client, name: str, token: str) -> bool:
    """Create the link; False when it already exists and is another run's."""
    from mlflow.exceptions import MlflowException

    model = name.rsplit(".promotion-lock.", 1)[0]
    try:
        client.create_registered_model(
            name,
            tags={HOLDER: token, BEAT: "0"},
            description=(
                f"tunegate's promotion lock for {model}, taken by {token}; the newest link is the lock. "
                "Do not delete it while a run may be promoting."
            ),
        )
        return True
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", *_NOT_FOUND):
            raise
    try:  # a create that the client retried after the server had already taken it is ours
        return client.get_registered_model(name).tags.get(HOLDER) == token
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return False
        raise


def _chain(client, prefix: str) -> dict[int, object]:
    """The links that exist now, by number (newest first in the server's answer)."""
    found = client.search_registered_models(
        filter_string=f"name LIKE '{prefix}%'", max_results=100, order_by=["name DESC"]
    )
    return {
        int(m.name[len(prefix) :]): m
        for m in found
        if m.name.startswith(prefix) and m.name[len(prefix) :].isdigit()  # LIKE's `_` matches any char
    }


def _delete(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _NOT_FOUND:
            raise


def _link(prefix: str, number: int) -> str:
    return f"{prefix}{number:09d}"  # fixed width: the server's name order is the numbers' order


def _split(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition(".")
    return f"{head}.", int(number)


def _client(cfg: RegistrySection):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
