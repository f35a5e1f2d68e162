"""Leases that make a job train in one place when two grids (or two users) run it at once.

A grid that is about to train a job *claims* it: a tag ``lease.<claim id>`` on the job's
MLflow run, whose value says who holds it and until when. The holder renews the claim
while the job trains; a holder that dies stops renewing and its claim expires. Before
training, a contender waits :data:`SETTLE_S`, reads every claim on the job's runs and
trains only if its own is the earliest live one; otherwise another live grid is training
the job, and it steps aside.

Why the wait makes this safe without a compare-and-set: a claim is stamped before it is
written, and counts only if its write completed within ``SETTLE_S`` of its stamp (a
slower write is withdrawn and made again with a new stamp). A contender reads at least
``SETTLE_S`` after its own stamp, so every claim stamped earlier is visible to it by then
and it steps aside; a claim stamped later sees the earlier one and steps aside. Clocks
must agree to well under ``SETTLE_S``.

This module is plain data and rules; :mod:`transfusion.tracking` stores the tags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

LEASE_TAG_PREFIX = "lease."
# A claim lives this long without renewal; its holder renews it three times as often.
LEASE_TTL_S = 90.0
# How long a contender waits between writing its claim and reading everyone's.
SETTLE_S = 2.0


def lease_ttl_s() -> float:
    """The lease's time to live: ``TRANSFUSION_LEASE_TTL_S`` (seconds > SETTLE_S), else :data:`LEASE_TTL_S`."""
    text = os.environ.get("TRANSFUSION_LEASE_TTL_S")
    if text is None:
        return LEASE_TTL_S
    try:
        ttl = float(text)
    except ValueError:
        ttl = float("nan")
    if not ttl > 2 * SETTLE_S:
        raise ValueError(f"TRANSFUSION_LEASE_TTL_S must be a number of seconds > {2 * SETTLE_S:g}, got {text!r}")
    return ttl


@dataclass(frozen=True)
class Claim:
    """One grid's claim on a job's run.

    Attributes:
        claim_id: Unique per attempt to train (the tag is ``lease.<claim_id>``).
        grid_run_id: The MLflow run of the grid that holds it.
        host: The holder's host name.
        pid: The holder's process id on that host.
        run_id: The job's MLflow run the claim is on.
        claimed_at: When it was first claimed (unix seconds, the holder's clock).
        expires: Until when it holds without another renewal.
    """

    claim_id: str
    grid_run_id: str
    host: str
    pid: int
    run_id: str
    claimed_at: float
    expires: float

    @property
    def tag(self) -> str:
        return LEASE_TAG_PREFIX + self.claim_id

    @property
    def holder(self) -> str:
        """Who holds it, for people."""
        return f"grid run {self.grid_run_id} ({self.host}, pid {self.pid})"

    def value(self) -> str:
        fields = ("grid_run_id", "host", "pid", "claimed_at", "expires")
        return json.dumps({name: getattr(self, name) for name in fields})

    def live(self, now: float) -> bool:
        """Unexpired, and its holder not known dead (a process of this host that is gone)."""
        if self.expires <= now:
            return False
        return self.host != socket.gethostname() or _process_exists(self.pid)

    def renewed(self, now: float, ttl: float) -> Claim:
        return dataclasses.replace(self, expires=now + ttl)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def new_claim(run_id: str, *, grid_run_id: str, now: float, ttl: float) -> Claim:
    """A fresh claim on ``run_id`` by this process for the grid run ``grid_run_id``."""
    return Claim(uuid.uuid4().hex[:16], grid_run_id, socket.gethostname(), os.getpid(), run_id, now, now + ttl)


def claims_in(run_id: str, tags: Mapping[str, str]) -> list[Claim]:
    """The claims recorded in a run's tags; a malformed value is no claim (it can hold nothing)."""
    claims = []
    for key, value in tags.items():
        if not key.startswith(LEASE_TAG_PREFIX):
            continue
        try:
            data = json.loads(value)
            claim = Claim(key.removeprefix(LEASE_TAG_PREFIX), str(data["grid_run_id"]), str(data["host"]),
                          int(data["pid"]), run_id, float(data["claimed_at"]), float(data["expires"]))  # fmt: skip
            claims.append(claim)
        except (ValueError, KeyError, TypeError):
            continue
    return claims


def first_live_claim(claims: Iterable[Claim], now: float) -> Claim | None:
    """The claim that trains the job: the earliest live one (ties broken by claim id), or None."""
    live = [claim for claim in claims if claim.live(now)]
    return min(live, key=lambda claim: (claim.claimed_at, claim.claim_id), default=None)


def held_elsewhere(claims: Iterable[Claim], now: float, *, mine: str | None = None) -> Claim | None:
    """A live claim by someone other than ``mine`` (a claim id), the earliest; None if there is none."""
    return first_live_claim((claim for claim in claims if claim.claim_id != mine), now)


def being_claimed(*, status: str, started_at: float, claims: Iterable[Claim], now: float, ttl: float) -> bool:
    """A RUNNING run with no claim yet, younger than a lease: another grid made it and is about
    to claim it, so it is not taken over (a run whose grid died unclaimed is, once a lease's
    time has passed)."""
    return status == "RUNNING" and not list(claims) and now - started_at < ttl


class ClaimStore(Protocol):
    """Where one job's claims live (the job's MLflow runs, :class:`transfusion.tracking.JobClaims`)."""

    def write(self, claim: Claim) -> None: ...

    def drop(self, claim: Claim) -> None: ...

    def claims(self) -> list[Claim]:
        """Every claim on the job's RUNNING runs."""
        ...


@dataclass(frozen=True)
class Contest:
    """How :func:`contend` ended: ``mine`` is this contender's claim as last written (a slow
    write makes it again with a new stamp); ``holder`` is another live grid's claim that
    trains the job, or None when ``mine`` does."""

    mine: Claim
    holder: Claim | None

    @property
    def won(self) -> bool:
        return self.holder is None


def contend(
    store: ClaimStore,
    claim: Claim,
    *,
    settle: float = SETTLE_S,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Contest:
    """Writes ``claim``, waits ``settle`` and reads every claim: this one trains the job when it
    is the earliest live claim; otherwise it is dropped.

    A write that completes more than ``settle`` after the claim's stamp may have landed after
    a contender with a later stamp read the claims and decided; the claim is then withdrawn
    and made again, freshly stamped, after a pause of ``settle``.
    """
    ttl = claim.expires - claim.claimed_at
    store.write(claim)
    while (late := clock() - claim.claimed_at) > settle:
        log.warning("lease %s: the claim took %.1f s to write (> %g s); claiming again", claim.claim_id, late, settle)
        store.drop(claim)
        sleep(settle)
        now = clock()
        claim = dataclasses.replace(claim, claim_id=uuid.uuid4().hex[:16], claimed_at=now, expires=now + ttl)
        store.write(claim)
    sleep(settle)
    first = first_live_claim(store.claims(), clock())
    if first is None or first.claim_id == claim.claim_id:
        return Contest(claim, None)
    store.drop(claim)
    return Contest(claim, first)


class LeaseKeeper:
    """Renews a won claim every third of its time to live while the job trains; drops it at the end.

    A renewal that fails (the tracking server away for a while) is retried at the next
    tick; the claim only lapses if renewals fail for a whole time to live. Leaving on an
    exception (an interrupt) neither waits for a renewal in flight nor drops the claim:
    the run it is on ends (KILLED, FAILED), and an ended run's claim holds nothing.
    """

    def __init__(self, store: ClaimStore, claim: Claim, *, ttl: float, clock: Callable[[], float] = time.time):
        self.store, self.claim, self.ttl, self.clock = store, claim, ttl, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{claim.claim_id}", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.claim = self.claim.renewed(self.clock(), self.ttl)
                self.store.write(self.claim)
            except Exception:  # noqa: BLE001  (the next tick tries again)
                log.warning("lease %s: renewal failed", self.claim.claim_id, exc_info=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self._stop.set()
        if exc_type is not None:
            return
        self._thread.join(timeout=self.ttl / 3)
        try:
            self.store.drop(self.claim)
        except Exception:  # noqa: BLE001  (an ended run's claim holds nothing)
            log.debug("lease %s: could not drop the claim", self.claim.claim_id, exc_info=True)
