"""Job leases: one job trains in one place when two grids run it at once (rules, without MLflow)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from transfusion.job_lease import (
    Claim,
    LeaseKeeper,
    being_claimed,
    claims_in,
    contend,
    first_live_claim,
    held_elsewhere,
    lease_ttl_s,
    new_claim,
)


class ClaimsInMemory:
    """A :class:`transfusion.job_lease.ClaimStore` kept in a dict (the tags of one job's runs)."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()

    def write(self, claim: Claim) -> None:
        with self.lock:
            self.tags.setdefault(claim.run_id, {})[claim.tag] = claim.value()

    def drop(self, claim: Claim) -> None:
        with self.lock:
            self.tags.get(claim.run_id, {}).pop(claim.tag, None)

    def claims(self) -> list[Claim]:
        with self.lock:
            return [claim for run_id, tags in self.tags.items() for claim in claims_in(run_id, dict(tags))]


def _claim(run_id: str, at: float, *, ttl: float = 60.0, host: str = "node-a", pid: int = 1) -> Claim:
    return Claim(f"c-{run_id}-{at}", "grid", host, pid, run_id, at, at + ttl)


def test_two_grids_that_claim_at_once_elect_one_and_the_other_steps_aside():
    store = ClaimsInMemory()
    first, second = _claim("run-1", 100.0), _claim("run-2", 100.5)
    # Both write before either reads (the worst interleaving): both see both, and agree.
    results = {}
    results["second"] = contend(store, second, sleep=lambda _: store.write(first), clock=lambda: 101.0).holder
    results["first"] = contend(store, first, sleep=lambda _: None, clock=lambda: 101.0).holder
    assert results == {"first": None, "second": first}
    assert [c.claim_id for c in store.claims()] == [first.claim_id]  # the loser dropped its claim


def test_a_later_claim_sees_the_earlier_one_and_loses():
    store = ClaimsInMemory()
    early = _claim("run-1", 100.0)
    assert contend(store, early, sleep=lambda _: None, clock=lambda: 100.1).won
    late = _claim("run-1", 103.0)
    assert contend(store, late, sleep=lambda _: None, clock=lambda: 103.1).holder == early


class SlowFirstWrite(ClaimsInMemory):
    """A store whose first write lands ``delay`` seconds late (a loaded tracking server)."""

    def __init__(self, clock: list[float], delay: float) -> None:
        super().__init__()
        self.clock, self.delay, self.writes = clock, delay, 0

    def write(self, claim: Claim) -> None:
        self.writes += 1
        if self.writes == 1:
            self.clock[0] += self.delay
        super().write(claim)


def test_a_claim_written_slower_than_the_settle_is_made_again_and_two_grids_never_both_win():
    # A stamps at 100.0 but its write lands at 103.0; B stamps at 100.5, writes at once and reads
    # at 102.5: B saw no A and won. A's stale stamp (earlier than B's) must not win as well.
    now = [100.0]
    store = SlowFirstWrite(now, delay=3.0)
    a = _claim("run-1", 100.0)
    b = _claim("run-1", 100.5)

    def time_passes(seconds: float) -> None:
        now[0] += seconds

    b_store = ClaimsInMemory()
    b_store.tags = store.tags  # one store, two views: B's writes are fast
    b_result = contend(b_store, b, sleep=lambda s: None, clock=lambda: 100.6)
    assert b_result.won
    a_result = contend(store, a, sleep=time_passes, clock=lambda: now[0])
    assert not a_result.won and a_result.holder == b
    assert a_result.mine.claim_id != a.claim_id and a_result.mine.claimed_at > b.claimed_at  # stamped again
    assert [c.claim_id for c in store.claims()] == [b.claim_id]  # A's claims are gone, B's holds


def test_a_slow_write_with_no_contender_wins_on_its_second_claim():
    now = [100.0]
    store = SlowFirstWrite(now, delay=5.0)
    result = contend(store, _claim("run-1", 100.0), sleep=lambda s: now.__setitem__(0, now[0] + s),
                     clock=lambda: now[0])  # fmt: skip
    assert result.won and store.writes == 2
    assert [c.claim_id for c in store.claims()] == [result.mine.claim_id]


def test_expired_malformed_and_dead_local_claims_hold_nothing():
    expired = _claim("run-1", 0.0, ttl=10.0)
    assert first_live_claim([expired], now=11.0) is None
    assert claims_in("run-1", {"lease.x": "not json", "lease.y": '{"host": "h"}', "other": "1"}) == []
    # A holder on this host whose process is gone is dead at once, not after its time to live.
    gone = subprocess_pid_that_exited()
    dead = _claim("run-1", 0.0, host=socket.gethostname(), pid=gone)
    alive = _claim("run-2", 1.0, host=socket.gethostname(), pid=os.getpid())
    assert first_live_claim([dead, alive], now=2.0) == alive
    assert held_elsewhere([alive], now=2.0, mine=alive.claim_id) is None


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_claims_round_trip_through_their_tag():
    claim = new_claim("run-9", grid_run_id="grid-1", now=50.0, ttl=30.0)
    (back,) = claims_in("run-9", {claim.tag: claim.value()})
    assert back == claim and back.holder == f"grid run grid-1 ({socket.gethostname()}, pid {os.getpid()})"


def test_the_keeper_renews_while_held_and_drops_the_claim_at_the_end():
    store = ClaimsInMemory()
    claim = new_claim("run-1", grid_run_id="g", now=time.time(), ttl=1.5)
    store.write(claim)
    with LeaseKeeper(store, claim, ttl=1.5):
        time.sleep(2.0)  # past the first time to live: only renewals keep it
        (held,) = store.claims()
        assert held.live(time.time()) and held.expires > claim.expires
    assert store.claims() == []


def test_lease_time_to_live_is_validated(monkeypatch):
    monkeypatch.setenv("TRANSFUSION_LEASE_TTL_S", "1")
    with pytest.raises(ValueError, match=r"TRANSFUSION_LEASE_TTL_S must be a number of seconds > 4, got '1'"):
        lease_ttl_s()
    monkeypatch.setenv("TRANSFUSION_LEASE_TTL_S", "30")
    assert lease_ttl_s() == 30.0


def test_the_keeper_leaves_at_once_on_an_interrupt_without_touching_the_store():
    class Unreachable(ClaimsInMemory):
        def drop(self, claim: Claim) -> None:
            raise AssertionError("an interrupted job must not wait on the tracking server")

    store = Unreachable()
    claim = new_claim("run-1", grid_run_id="g", now=time.time(), ttl=60.0)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), LeaseKeeper(store, claim, ttl=60.0):
        raise KeyboardInterrupt
    # Waiting for the renewal thread would take its 20 s tick.
    assert time.perf_counter() - started < 10.0


def test_a_fresh_unclaimed_run_is_another_grids_about_to_be_claimed_and_is_not_taken_over():
    now, ttl = time.time(), 90.0
    assert being_claimed(status="RUNNING", started_at=now - 1, claims=[], now=now, ttl=ttl)
    # Unclaimed for a whole lease: its grid died before claiming it; it may be taken over.
    assert not being_claimed(status="RUNNING", started_at=now - 91, claims=[], now=now, ttl=ttl)
    # Claimed (live or not, the lease rules decide) or ended: not this rule's business.
    dead = new_claim("run-1", grid_run_id="g", now=now - 200, ttl=ttl)
    assert not being_claimed(status="RUNNING", started_at=now - 1, claims=[dead], now=now, ttl=ttl)
    assert not being_claimed(status="KILLED", started_at=now - 1, claims=[], now=now, ttl=ttl)
