"""Cross-process locks the flow hands to the registry stage: a file lock beside a local MLflow store,
a Prefect global concurrency limit (one slot per registered model) for a remote tracking server."""

from __future__ import annotations

import contextlib

from tasks.registry import Lock, local_promotion_lock, local_store
from tunegate.config import RegistrySection


def promotion_lock(cfg: RegistrySection, timeout_s: float = 600) -> Lock:
    if local_store(cfg) is not None:
        return local_promotion_lock(cfg, timeout_s)

    @contextlib.contextmanager
    def prefect_limit():
        from prefect.concurrency.sync import concurrency

        with concurrency(f"tunegate-promote-{cfg.model_name}", occupy=1, timeout_seconds=timeout_s):
            yield

    return prefect_limit
