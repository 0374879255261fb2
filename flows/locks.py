"""The promotion lock the flow hands to the registry stage: `tasks.promotion_lock.promotion_lock`, a
file lock beside a local MLflow store and a lease held in the tracking server for a remote one.

Not a Prefect global concurrency limit: two runs may each talk to their own Prefect API (ephemeral
ones, or two servers), and then each gets a limit of its own and both promote. The tracking server
is the one thing every run that can move the alias shares, so the lock lives there.
"""

from __future__ import annotations

from tasks.promotion_lock import Lock, promotion_lock

__all__ = ["Lock", "promotion_lock"]
