"""Cross-process locks the flow hands to the registry stage: a file lock beside a local MLflow store,
a Prefect global concurrency limit (one slot per registered model) for a remote tracking server."""

from __future__ import annotations

import contextlib

from tasks.registry import Lock, local_promotion_lock, local_store
from tunegate.config import RegistrySection


def promotion_lock(cfg: RegistrySection, timeout_s: float = 600) -> Lock:
    if local_store(cfg) is not None:
        return local_promotion_lock(cfg, timeout_s)

    name = f"tunegate-promote-{cfg.model_name}"

    @contextlib.contextmanager
    def prefect_limit():
        from prefect.concurrency.sync import concurrency

        _ensure_limit(name)  # Prefect skips a limit that does not exist: that would be no lock at all
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
            yield

    return prefect_limit


def _ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit `name` unless it exists (another run may create it
    at the same moment: that is fine)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
