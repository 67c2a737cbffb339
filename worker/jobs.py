"""The RQ job: ``run_repair(deployment, repair_id, attempt)`` repairs one deployment version
from its claimed quarantine and publishes the result.

Steps, each safe to re-run after a crash at any point:

1. the record must be in flight and carry this ``attempt`` (else a newer attempt owns it);
2. the version's pending quarantine is *claimed* (a retried attempt finds the same claim);
3. the library's repair engine runs through its store path (the same as ``nnoculation repair
   --store``, which holds the store's repair lock, so two jobs never repair at once): progress
   goes to the record and the job's meta every epoch, a heartbeat thread proves the job alive,
   a cancellation request stops it at the next epoch, and the CycleGAN checkpoints every epoch
   into the work dir, so a retry resumes where the killed attempt stopped;
4. the gate's verdict: a refused repair keeps its nets as a *rejected candidate* store version
   (never activated; the record names it as ``candidate_version``), archives its claim and
   records why (the active version is untouched); a passed one is published atomically as a
   new store version (its id from the store), recorded at once (a retry after this point does
   not publish twice), activated if the repaired version is still the active one, and
   announced to every API process;
5. the claim is archived under the repair's id and the record closed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from rq import get_current_job

from models.store_base import BundleStore
from models.store_names import RepairLockedError
from nnoculation.deployment import resolve_device
from nnoculation.online.announce import announce_activation
from nnoculation.online.connection import connect
from nnoculation.online.keys import Keys
from nnoculation.online.quarantine import Quarantine
from nnoculation.online.repairs import (
    CANCEL_REQUESTED,
    CANCELLED,
    FAILED,
    GATED,
    PUBLISHED,
    RUNNING,
    TERMINAL,
    Repairs,
)
from nnoculation.repair.engine import (
    RepairCancelled,
    RepairOutcome,
    RepairProgress,
    repair_in_store,
)
from worker import metrics
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a job needs, built from the worker's settings."""

    settings: WorkerSettings
    store: BundleStore
    quarantine: Quarantine
    repairs: Repairs

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Context:
        client = connect(settings.redis_url, settings.redis_timeout_s, retries=3)
        keys = Keys(settings.key_prefix, settings.deployment)
        return cls(
            settings,
            settings.open_store(),
            Quarantine(client, keys, settings.quarantine_cap),
            Repairs(client, keys, settings.repair_timeout_s),
        )


class Heartbeat:
    """Refreshes the repair's heartbeat key from a thread while the job runs."""

    def __init__(self, repairs: Repairs, repair_id: str, ttl_s: float) -> None:
        self.repairs = repairs
        self.repair_id = repair_id
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repair-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.repairs.beat(self.repair_id, self.ttl_s, self.holder)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.repairs.beat(self.repair_id, self.ttl_s, self.holder)
            except Exception as err:  # keep beating: Redis may come back
                logger.warning("repair heartbeat failed: %s", err)


def run_repair(deployment: str, repair_id: str, attempt: int) -> dict[str, Any]:
    """RQ entry point (plain arguments only); settings come from the worker's environment."""
    settings = WorkerSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if deployment != settings.deployment:
        raise ValueError(
            f"job for deployment {deployment!r} reached a worker of {settings.deployment!r}"
        )
    return execute(Context.from_settings(settings), repair_id, attempt)


def execute(ctx: Context, repair_id: str, attempt: int) -> dict[str, Any]:
    """Run one attempt of a repair (importable and testable without RQ)."""
    skipped = _stale(ctx, repair_id, attempt)
    if skipped:
        return {"repair_id": repair_id, "skipped": skipped}
    started = time.perf_counter()
    with Heartbeat(ctx.repairs, repair_id, ctx.settings.heartbeat_ttl_s):
        try:
            result = _attempt(ctx, repair_id, attempt)
        except RepairLockedError:
            # Another attempt of this repair is running (its heartbeat keeps it alive); this
            # one leaves the record alone.
            return {"repair_id": repair_id, "skipped": "another process holds the repair lock"}
        except RepairCancelled:
            ctx.quarantine.release(repair_id)
            ctx.repairs.finish(
                repair_id, CANCELLED, backoff_s=ctx.settings.repair_backoff_s,
                reason="cancelled by an operator",
            )  # fmt: skip
            result = {"repair_id": repair_id, "status": CANCELLED}
        except Exception as err:
            logger.exception("repair %s failed", repair_id)
            ctx.quarantine.release(repair_id)
            ctx.repairs.finish(
                repair_id, FAILED, backoff_s=ctx.settings.repair_backoff_s,
                reason=f"{type(err).__name__}: {err}",
            )  # fmt: skip
            metrics.finished(FAILED, time.perf_counter() - started)
            raise
    metrics.finished(str(result["status"]), time.perf_counter() - started)
    shutil.rmtree(ctx.settings.checkpoint_dir(repair_id), ignore_errors=True)
    return result


def _stale(ctx: Context, repair_id: str, attempt: int) -> str | None:
    """Why this attempt must not run (None when it should)."""
    record = ctx.repairs.get(repair_id)
    if record is None or record["status"] in TERMINAL:
        return "no repair in flight with this id"
    if int(record["attempt"]) != attempt:
        return f"attempt {attempt} is stale (the record is at attempt {record['attempt']})"
    return None


def _progress(ctx: Context, repair_id: str) -> Any:
    job = get_current_job()

    def on_progress(p: RepairProgress) -> None:
        fields = {"stage": p.stage, "epoch": p.epoch, "epochs": p.epochs, "losses": p.losses}
        # A stage's start has no epoch: blank the previous stage's ("" is kept, None skipped).
        blanked = {k: "" if v is None else v for k, v in fields.items()}
        ctx.repairs.update(repair_id, **blanked, elapsed_s=round(p.elapsed_s, 1))
        if job is not None:  # the same for RQ's own tools (rq info, dashboards)
            job.meta.update({k: v for k, v in fields.items() if v is not None})
            job.meta["elapsed_s"] = p.elapsed_s
            job.save_meta()

    return on_progress


def _cancel_check(ctx: Context, repair_id: str) -> Any:
    def should_cancel() -> bool:
        record = ctx.repairs.get(repair_id)
        return record is not None and record["status"] == CANCEL_REQUESTED

    return should_cancel


def _attempt(ctx: Context, repair_id: str, attempt: int) -> dict[str, Any]:
    record = ctx.repairs.get(repair_id)
    assert record is not None
    parent = str(record["version"])
    if record["status"] == CANCEL_REQUESTED:
        raise RepairCancelled("cancelled before it started")
    ctx.repairs.update(repair_id, status=RUNNING, stage="claim", worker=socket.gethostname())
    published = record.get("result_version")
    if not published and record.get("candidate_version"):  # a retry after keeping the candidate
        return _gated(ctx, repair_id, str(record["candidate_version"]), record.get("reason"))
    if not published:  # (a retry after the publish only activates and closes)
        if ctx.quarantine.claim(parent, repair_id) <= 0:
            raise ValueError(f"no quarantined inputs of {parent} to repair from")
        images = ctx.quarantine.claimed_images(repair_id)
        ctx.repairs.update(repair_id, entries=int(images.shape[0]))
        # The library's store path, as `nnoculation repair --store` runs it: the repair lock,
        # the engine, the gate, and a publish whose version id the store allocates.
        done = repair_in_store(
            ctx.store,
            ctx.settings.deployment,
            images,
            ctx.settings.repair_config(ctx.settings.checkpoint_dir(repair_id)),
            version=parent,
            activate=False,
            progress=False,
            on_progress=_progress(ctx, repair_id),
            should_cancel=_cancel_check(ctx, repair_id),
            device=resolve_device(ctx.settings.device),
        )
        report = _summary(done.outcome)
        if done.version is None:
            reason = done.outcome.reason
            # Recorded at once, so a retry after this point does not keep a second candidate.
            ctx.repairs.update(
                repair_id, reason=reason, candidate_version=done.candidate,
                candidate_error=done.candidate_error, **report,
            )  # fmt: skip
            return _gated(ctx, repair_id, done.candidate, reason)
        published = done.version
        ctx.repairs.update(repair_id, result_version=published, stage="publish", **report)
    activated = _activate(ctx, repair_id, parent, str(published))
    ctx.quarantine.archive(repair_id)
    ctx.repairs.finish(repair_id, PUBLISHED, result_version=published, activated=activated)
    return {"repair_id": repair_id, "status": PUBLISHED, "version": published,
            "activated": activated}  # fmt: skip


def _gated(
    ctx: Context, repair_id: str, candidate: str | None, reason: str | None
) -> dict[str, Any]:
    """Close a repair the gate refused: its inputs archived, its candidate (never activated)
    named in the record."""
    ctx.quarantine.archive(repair_id)
    ctx.repairs.finish(repair_id, GATED, reason=reason, candidate_version=candidate)
    logger.warning(
        "repair %s refused by the gate (rejected candidate %s): %s", repair_id, candidate, reason
    )
    return {"repair_id": repair_id, "status": GATED, "reason": reason, "candidate": candidate}


def _activate(ctx: Context, repair_id: str, parent: str, version: str) -> bool:
    """Activate ``version`` if ``parent`` is still active (an operator who activated something
    else meanwhile is not overruled), and announce it."""
    deployment = ctx.settings.deployment
    active = ctx.store.active(deployment)
    if active == version:
        activated = True
    elif active == parent:
        ctx.store.activate(deployment, version)
        activated = True
    else:
        logger.warning(
            "repaired %s as %s, but %s is active now: not activating", parent, version, active
        )
        return False
    ctx.repairs.update(repair_id, announced=repr(time.time()))
    announce_activation(ctx.repairs.client, ctx.repairs.keys, version, "repair")
    logger.info("activated and announced %s (repair of %s)", version, parent)
    return activated


def _summary(outcome: RepairOutcome) -> dict[str, Any]:
    return {
        "holdout": outcome.holdout,
        "seconds": outcome.seconds,
        "purify": outcome.purified.report(),
        "trigger_effect": outcome.trigger_effect,
        "relapse": outcome.relapse,
        "relapse_basis": outcome.relapse_basis,  # which suspects: targets or one-to-one pairs
    }
