"""Run policy declared where Prefect shows it (retries, tags), not hand-made in task bodies."""


def test_prepare_dataset_retries_what_a_retry_can_fix_and_not_bad_settings():
    from prefect.states import Completed, Failed

    from tasks.training import prepare_dataset_task, retry_transient

    assert prepare_dataset_task.retries == 2
    assert retry_transient(None, None, Failed(data=OSError("connection reset"))) is True
    assert retry_transient(None, None, Failed(data=ValueError("data_size 500 is larger than ..."))) is False
    assert retry_transient(None, None, Completed(data=None)) is False
