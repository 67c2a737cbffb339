"""One reconciliation pass (see :mod:`nnoculation.online.repairs`), run by the worker and by
every API process; a short Redis lock lets only one of them act per interval."""

from __future__ import annotations

from models.store_base import BundleStore
from models.store_names import StoreError
from nnoculation.online.quarantine import Quarantine
from nnoculation.online.repairs import Repairs


def reconcile_once(
    repairs: Repairs,
    quarantine: Quarantine,
    store: BundleStore,
    n: int,
    holder: str,
    interval_s: float,
) -> list[str]:
    """Reconcile if no other process did within ~``interval_s``; returns the actions taken."""
    keys = repairs.keys
    if not repairs.client.set(keys.reconcile_lock, holder, nx=True, px=int(interval_s * 900)):
        return []

    def active() -> str | None:
        try:
            return store.active(keys.deployment)
        except StoreError:
            return None

    return repairs.reconcile(active, quarantine.pending_count, n)
