"""The job pool's rules without Ray: hand-out, attempts, restarts, retirement, close."""

import pytest

from transfusion.job_broker import (
    STOP,
    WAIT,
    AfterError,
    JobBrokerState,
    JobStatus,
    Restart,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _job(run_id: str) -> dict:
    return {"run_id": run_id, "spec": {}}


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def broker(clock) -> JobBrokerState:
    return JobBrokerState(slots=1, clock=clock)


def test_jobs_go_to_members_one_after_another_and_report_launch_time(broker, clock):
    assert broker.submit(_job("a"), max_failures=1) == [0]  # a member must start for the first job
    assert broker.submit(_job("b"), max_failures=1) == []  # one slot: b waits for member 0
    assert broker.restart(0) == Restart(1)  # first start: nothing to resume
    clock.now += 2.5
    assert broker.take(0, 1).request == _job("a")
    broker.finish(0, 1, {"steps": 6.0})
    end = broker.outcome("a")
    assert end.status is JobStatus.FINISHED and end.metrics == {"steps": 6.0} and end.launch_s == 2.5
    assert broker.take(0, 1).request == _job("b")
    assert broker.outcome("b") is None  # running
    broker.finish(0, 1, {"steps": 6.0})
    assert broker.take(0, 1) == WAIT  # nothing queued: the member waits


def test_a_restarted_member_resumes_its_job_until_attempts_run_out(broker):
    broker.submit(_job("a"), max_failures=1)
    broker.restart(0)
    assert broker.take(0, 1).request == _job("a")
    assert broker.restart(0) == Restart(2, _job("a"))  # died mid-job: continues a (1 failure <= 1)
    assert broker.restart(0) == Restart(3)  # a second failure: a is given up
    end = broker.outcome("a")
    assert end.failed and end.reason == "gave up after 2 failures: the worker process died"


def test_a_stale_wait_from_before_a_restart_takes_nothing(broker):
    broker.submit(_job("a"), max_failures=1)
    broker.restart(0)
    broker.restart(0)  # restarted before start 1 asked for work
    assert broker.take(0, 1) == STOP  # start 1's caller is gone
    assert broker.take(0, 2).request == _job("a")
    broker.finish(0, 1, {"steps": 1.0})  # a stale finish changes nothing
    assert broker.outcome("a") is None
    assert broker.job_error(0, 1, "ValueError: stale") is AfterError.NEXT_JOB
    assert broker.outcome("a") is None


def test_a_raised_error_restarts_while_attempts_remain_then_fails_the_job(broker):
    broker.submit(_job("b"), max_failures=1)
    broker.restart(0)
    broker.take(0, 1)
    assert broker.job_error(0, 1, "ValueError: bad") is AfterError.RESTART  # one restart left
    assert broker.restart(0) == Restart(2, _job("b"))
    assert broker.job_error(0, 2, "ValueError: bad") is AfterError.NEXT_JOB  # none left: failed now
    end = broker.outcome("b")
    assert end.failed and end.reason == "ValueError: bad (after 1 restarts)"
    assert broker.take(0, 2) == WAIT  # the member is healthy and asks for the next job


def test_an_error_that_a_restart_cannot_fix_fails_the_job_at_once(broker):
    broker.submit(_job("n"), max_failures=3)
    broker.restart(0)
    broker.take(0, 1)
    assert broker.job_error(0, 1, "NonFiniteLossError: nan", retryable=False) is AfterError.NEXT_JOB
    assert broker.outcome("n").reason == "NonFiniteLossError: nan"


def test_an_idle_member_retires_and_a_later_job_starts_a_new_one(broker):
    broker.submit(_job("a"), max_failures=0)
    broker.restart(0)
    broker.take(0, 1)
    broker.finish(0, 1, {})
    assert broker.take(0, 1) == WAIT
    assert broker.take(0, 1, idle_expired=True) == STOP  # idle past the timeout: member 0 retires ...
    assert 0 not in broker.members
    assert broker.submit(_job("c"), max_failures=0) == [1]  # ... so a new job starts a new member
    assert broker.restart(1) == Restart(1)
    assert broker.take(1, 1, idle_expired=True).request == _job("c")  # queued work wins over retiring


def test_a_lost_worker_group_requeues_its_job_for_a_new_member(broker):
    broker.submit(_job("d"), max_failures=1)
    broker.restart(0)
    broker.take(0, 1)
    assert broker.member_gone(0, "WorkerGroupError: lost") == [1]
    broker.restart(1)
    assert broker.take(1, 1).request == _job("d")
    assert broker.member_gone(1, "WorkerGroupError: lost again") == []  # second failure: given up
    end = broker.outcome("d")
    assert end.failed
    assert end.reason == "gave up after 2 failures: the Ray Train worker group stopped: WorkerGroupError: lost"


def test_close_fails_queued_jobs_and_stops_members(broker):
    broker.submit(_job("d"), max_failures=1)
    broker.submit(_job("e"), max_failures=1)
    broker.restart(0)
    broker.close()
    for run_id in ("d", "e"):
        assert broker.outcome(run_id).reason == "the job pool was closed before the job started"
    assert broker.take(0, 1) == STOP
    with pytest.raises(RuntimeError, match="closed"):
        broker.submit(_job("f"), max_failures=1)
    assert broker.member_gone(0, None) == []  # nothing is started after close


def test_members_that_never_take_a_job_stop_being_replaced(broker):
    assert broker.submit(_job("a"), max_failures=1) == [0]
    assert broker.member_gone(0, "RuntimeError: cannot start") == [1]
    assert broker.member_gone(1, "RuntimeError: cannot start") == [2]
    assert broker.member_gone(2, "RuntimeError: cannot start") == []  # the third in a row: give up
    assert "3 pool members in a row failed before taking a job" in broker.outcome("a").reason


def test_more_slots_start_more_members_and_forgotten_jobs_are_gone():
    broker = JobBrokerState(slots=2)
    assert broker.submit(_job("a"), max_failures=0) == [0]
    assert broker.submit(_job("b"), max_failures=0) == [1]
    assert broker.submit(_job("c"), max_failures=0) == []
    broker.slots = 3
    assert broker.submit(_job("d"), max_failures=0) == [2]
    broker.forget("a")
    assert "a" not in broker.jobs
