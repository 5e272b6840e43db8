"""Sensors evaluated with build_sensor_context on a real temporary instance and real runs."""

from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.definitions import build_defs
from etl_assets.defs.contracts import LAUNCHED_BY_TAG, RERUN_ATTEMPT_TAG, SHARDS_JOB
from etl_assets.defs.resources import resources_for
from etl_assets.defs.sensors import evaluate_failed_shards
from etl_assets.lib.sharding import shard_of
from etl_assets.tools.runner import run_pipeline
from etl_assets_tests.conftest import edit_crm

# Four shards prove every sensor decision as well as ten, at less than half the Dagster runs.
SHARDS = 4


def _tick(defs, settings, instance, cursor=None):
    sensor = defs.get_sensor_def("source_files_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                      resources=resources_for(settings))
    return sensor.evaluate_tick(context)


def _execute(defs, request, instance):
    assets = [a for a in defs.assets]
    return dg.materialize(
        assets, selection=list(request.asset_selection), partition_key=request.partition_key,
        resources=defs.resources, instance=instance, tags=request.tags,
    )


@pytest.fixture
def built(ran_sample):
    """A home where the sample ran on SHARDS shards, and its definitions."""
    settings = ran_sample(SHARDS)
    return settings, build_defs(settings)


# Here the sample and the instance are those of the home that ran.
@pytest.fixture
def sample_dir(built):
    return Path(built[0].data_dir)


@pytest.fixture
def instance(built):
    with dg.DagsterInstance.get() as inst:
        yield inst


def test_one_changed_row_requests_exactly_its_shard_once(built, sample_dir, instance):
    settings, defs = built
    quiet = _tick(defs, settings, instance)
    assert quiet.run_requests == [] and "unchanged" in quiet.skip_message

    edit_crm(sample_dir, {"cust_00000042": 4242})
    first = _tick(defs, settings, instance, quiet.cursor)
    assert first.run_requests == [] and "waiting for crm.csv to settle" in first.skip_message
    second = _tick(defs, settings, instance, first.cursor)
    [request] = second.run_requests
    assert request.partition_key == str(shard_of("cust_00000042", SHARDS))
    assert request.tags[LAUNCHED_BY_TAG] == "sensor:source_files_sensor"
    assert {k.to_user_string() for k in request.asset_selection} == {
        "crm", "shard_inputs", "shard_profiles", "customer_profiles"}
    again = _tick(defs, settings, instance, second.cursor)
    assert again.run_requests == []  # same content never triggers twice

    result = _execute(defs, request, instance)
    assert result.success
    con = duckdb.connect(settings.database, read_only=True)
    assert con.execute("SELECT employee_count FROM customer_profiles WHERE customer_id = ?",
                       ["cust_00000042"]).fetchone() == (4242,)
    con.close()
    fresh = _tick(defs, settings, instance)  # even with no cursor: nothing to do
    assert fresh.run_requests == [] and "every shard current" in fresh.skip_message


def test_a_file_still_changing_waits_until_it_settles(built, sample_dir, instance):
    settings, defs = built
    edit_crm(sample_dir, {"cust_00000007": 1})
    t1 = _tick(defs, settings, instance)
    edit_crm(sample_dir, {"cust_00000007": 2})  # changed again between ticks
    t2 = _tick(defs, settings, instance, t1.cursor)
    assert t1.run_requests == [] and t2.run_requests == []
    t3 = _tick(defs, settings, instance, t2.cursor)
    assert [r.partition_key for r in t3.run_requests] == [str(shard_of("cust_00000007", SHARDS))]


def test_several_shards_sources_first_then_exactly_the_stale_shards(built, sample_dir, instance):
    settings, defs = built
    ids = ["cust_00000001", "cust_00000004", "cust_00000005"]
    expected = sorted({str(shard_of(c, SHARDS)) for c in ids})
    assert len(expected) > 1
    edit_crm(sample_dir, {c: 77 for c in ids})
    t1 = _tick(defs, settings, instance)
    [sources_run] = _tick(defs, settings, instance, t1.cursor).run_requests
    assert [k.to_user_string() for k in sources_run.asset_selection] == ["crm", "shard_inputs"]
    assert sources_run.partition_key is None
    assert _execute(defs, sources_run, instance).success
    shards = _tick(defs, settings, instance, t1.cursor).run_requests
    assert sorted(r.partition_key for r in shards) == expected
    assert all([k.to_user_string() for k in r.asset_selection] == ["shard_profiles"] for r in shards)
    assert {r.tags[LAUNCHED_BY_TAG] for r in [sources_run, *shards]} == {
        "sensor:source_files_sensor"}
    # The daily schedule asks for the same stale shards, tagged as its own.
    schedule = defs.get_schedule_def("stale_partitions_schedule")
    # As a context manager: the instance it opens is closed on exit (see test_freshness).
    with dg.build_schedule_context(instance=instance, resources=resources_for(settings),
                                   repository_def=defs.get_repository_def()) as context:
        daily = schedule.evaluate_tick(context)
    assert sorted(r.partition_key for r in daily.run_requests) == expected
    assert {r.tags[LAUNCHED_BY_TAG] for r in daily.run_requests} == {
        "schedule:stale_partitions_schedule"}


def test_a_missing_file_requests_nothing_and_says_why(built, sample_dir, instance):
    settings, defs = built
    (sample_dir / "support.csv").unlink()
    tick = _tick(defs, settings, instance)
    assert tick.run_requests == [] and "support.csv missing" in tick.skip_message


def _fail_shard(settings, instance, partition, tags=None):
    # Retry waits from 0.05 s (SHARD_RETRY_DELAY_S): the same four attempts, without 11 s of sleep.
    failing = settings.replace(chaos_fail_shard=int(partition), chaos_fail_mode="always",
                               shard_retry_delay_s=0.05)
    job = build_defs(failing).resolve_job_def(SHARDS_JOB)
    result = job.execute_in_process(instance=instance, partition_key=partition,
                                    raise_on_error=False, tags=tags or {})
    assert not result.success
    return result


def test_failed_shard_is_rerun_within_bound_with_new_keys(built, instance):
    settings, _ = built
    bounded = settings.replace(rerun_max_attempts=1, rerun_base_wait_s=100)
    first = _fail_shard(settings, instance, "2")
    waiting = evaluate_failed_shards(bounded, instance)
    assert waiting.run_requests == [] and "rerun of shard 2 in" in waiting.skip_reason
    end = instance.get_run_record_by_id(first.run_id).end_time
    [rerun] = evaluate_failed_shards(bounded, instance, now=end + 100).run_requests
    assert rerun.partition_key == "2" and rerun.tags[RERUN_ATTEMPT_TAG] == "1"
    assert rerun.run_key == f"rerun:2:{first.run_id}"
    # The sensor itself (no wait configured) requests the same rerun, tagged as its own.
    defs = build_defs(settings)
    tick = defs.get_sensor_def("failed_shard_sensor").evaluate_tick(dg.build_sensor_context(
        instance=instance, definitions=defs,
        resources=resources_for(bounded.replace(rerun_base_wait_s=0))))
    [request] = tick.run_requests
    assert request.run_key == rerun.run_key
    assert request.tags[LAUNCHED_BY_TAG] == "sensor:failed_shard_sensor"
    automation = defs.get_sensor_def("profiles_automation_sensor")
    assert automation.run_tags[LAUNCHED_BY_TAG] == "sensor:profiles_automation_sensor"

    _fail_shard(settings, instance, "2", tags=rerun.tags)  # the rerun fails too
    done = evaluate_failed_shards(bounded, instance, now=end + 10_000)
    assert done.run_requests == [] and "left failed" in done.skip_reason and "2" in done.skip_reason


def test_not_retryable_failures_are_not_rerun(built, instance):
    settings, _ = built
    other_layout = settings.replace(shard_count=3)  # sources staged for 4
    job = build_defs(other_layout).resolve_job_def(SHARDS_JOB)
    result = job.execute_in_process(instance=instance, partition_key="1", raise_on_error=False)
    assert not result.success
    evaluation = evaluate_failed_shards(settings.replace(rerun_base_wait_s=0),
                                        instance)
    assert evaluation.run_requests == [] and "left failed" in evaluation.skip_reason


def _input_versions(instance, shard_count=SHARDS):
    versions = {}
    for k in range(shard_count):
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("shard_inputs"), asset_partitions=[str(k)]),
            limit=1).records
        versions[k] = record.asset_materialization.tags["dagster/data_version"]
    return versions


def test_shard_inputs_versions_change_only_for_the_changed_shard(built, sample_dir, instance):
    """Each shard_inputs partition carries its own slice hash, so restaging after one changed
    row gives exactly that customer's partition a new data version."""
    settings, defs = built
    before = _input_versions(instance)
    assert len(set(before.values())) == SHARDS
    edit_crm(sample_dir, {"cust_00000042": 4242})
    assert run_pipeline(settings, echo=lambda line: None).ok
    after = _input_versions(instance)
    assert {k for k in before if before[k] != after[k]} == {shard_of("cust_00000042", SHARDS)}
