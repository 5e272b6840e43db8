"""One freshness model: every caller that decides what is stale gives the same answer.

The on-disk states are built from a real run of the sample (ran_sample); each caller is asked
the way it asks in production: the runner's decision helpers, the file sensor through Dagster's
build_sensor_context, the schedule through build_schedule_context, and the checks through
profile_facts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.definitions import build_defs
from etl_assets.defs.resources import resources_for
from etl_assets.lib import freshness
from etl_assets.lib.checks import NoWarehouseError, profile_facts
from etl_assets.lib.schema import SOURCES
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.sharding import shard_of
from etl_assets.lib.sources import stage_source
from etl_assets.tools.runner import shards_to_run, sources_to_stage
from etl_assets_tests.conftest import edit_crm

SHARDS = 2
EDITED = "cust_00000042"
ALL_SOURCES = set(SOURCES)
ALL_SHARDS = set(range(SHARDS))

# Answer = (sources to stage, stale shards); None where the caller does not judge: the checks
# judge no source, and the sensor and the schedule judge no shard while a source is to be
# staged (sources first, by design).
Answer = tuple[set[str] | None, set[int] | None]


def _fresh(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    pass


def _changed_file(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    edit_crm(Path(settings.data_dir), {EDITED: 4242})


def _new_staging_code(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freshness, "STAGING_VERSION", "test-next")


def _deleted_warehouse(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(settings.database).unlink()


def _replaced_warehouse(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(settings.database).unlink()
    duckdb.connect(settings.database).close()  # a new, empty warehouse file


def _half_staged(settings: EtlSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that died after staging crm: staged and recorded, its shard not rebuilt."""
    edit_crm(Path(settings.data_dir), {EDITED: 4242})
    stage_source(SOURCES["crm"], settings)


# state -> what it must look like to everyone: (changed sources, stale shards)
STATES = {
    "fresh": (_fresh, set(), set()),
    "changed_file": (_changed_file, {"crm"}, set()),  # shards judged against what is staged
    "new_staging_code": (_new_staging_code, ALL_SOURCES, set()),
    "deleted_warehouse": (_deleted_warehouse, ALL_SOURCES, ALL_SHARDS),
    "replaced_warehouse": (_replaced_warehouse, ALL_SOURCES, ALL_SHARDS),
    "half_staged": (_half_staged, set(), {shard_of(EDITED, SHARDS)}),
}


def _from_requests(requests: list[dg.RunRequest]) -> Answer:
    """What a sensor's or schedule's run requests say is changed and stale."""
    keys = {k.to_user_string() for r in requests for k in r.asset_selection}
    sources = keys & ALL_SOURCES
    if sources:
        return sources, None
    return set(), {int(r.partition_key) for r in requests}


def _freshness(settings: EtlSettings) -> Answer:
    states = freshness.source_states(settings)
    for state in states.values():
        assert state.reason and not state.override
    return ({name for name, s in states.items() if not s.unchanged},
            {k for k, s in freshness.shard_states(settings).items() if not s.current})


def _runner(settings: EtlSettings) -> Answer:
    todo, _ = shards_to_run(settings, echo=lambda line: None)
    return set(sources_to_stage(settings, echo=lambda line: None)), set(todo)


def _sensor(defs: dg.Definitions, settings: EtlSettings, instance: dg.DagsterInstance) -> Answer:
    """Two ticks, as the sensor needs for a change to settle; the second one decides."""
    sensor = defs.get_sensor_def("source_files_sensor")
    cursor = None
    for _ in range(2):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                          resources=resources_for(settings))
        tick = sensor.evaluate_tick(context)
        cursor = tick.cursor
    return _from_requests(tick.run_requests)


def _schedule(defs: dg.Definitions, settings: EtlSettings, instance: dg.DagsterInstance) -> Answer:
    schedule = defs.get_schedule_def("stale_partitions_schedule")
    # As a context manager: the instance it opens from `instance`'s ref is closed on exit
    # (left open, it stays Dagster's current one after the test).
    with dg.build_schedule_context(instance=instance, resources=resources_for(settings),
                                   repository_def=defs.get_repository_def()) as context:
        return _from_requests(schedule.evaluate_tick(context).run_requests or [])


def _checks(settings: EtlSettings) -> Answer:
    """The shards_current check's stale shards. Without a warehouse, or with one that has no
    customer_profiles table, the check step itself fails: no shard is shown current."""
    try:
        return None, set(profile_facts(settings).stale_shards)
    except (NoWarehouseError, duckdb.CatalogException):
        return None, ALL_SHARDS


@pytest.mark.parametrize("state", list(STATES))
def test_every_caller_agrees_on_what_is_stale(ran_sample, monkeypatch, state):
    settings = ran_sample(SHARDS)
    build, sources, shards = STATES[state]
    build(settings, monkeypatch)
    defs = build_defs(settings)
    with dg.DagsterInstance.get() as instance:
        answers = {
            "freshness": _freshness(settings),
            "runner": _runner(settings),
            "sensor": _sensor(defs, settings, instance),
            "schedule": _schedule(defs, settings, instance),
            "checks": _checks(settings),
        }
    wrong = {caller: answer for caller, answer in answers.items()
             if answer[0] not in (None, sources) or answer[1] not in (None, shards)}
    assert not wrong, (f"{state}: expected sources {sources} to stage and shards {shards} "
                       f"stale; these callers disagree: {wrong}")
    # Only the sensor and the schedule may leave shards unjudged, and only while sources change.
    assert all(answers[c][1] is not None for c in ("freshness", "runner", "checks"))
    assert sources or all(answer[1] is not None for answer in answers.values())
    # customer_profiles is current exactly when every shard is (the export was not touched).
    assert freshness.profiles_state(settings).current == (not shards), state


def test_force_recomputes_everything_and_reads_nothing(ran_sample):
    settings = ran_sample(SHARDS)
    Path(settings.database).unlink()  # an overridden answer does not need the warehouse
    forced = settings.replace(force=True)
    assert all(s.override == "--force" and not s.unchanged and not s.reusable
               for s in freshness.source_states(forced).values())
    assert all(s.override == "--force" and not s.current
               for s in freshness.shard_states(forced).values())
    assert freshness.profiles_state(forced).override == "--force"
    assert not freshness.profiles_state(forced).current
    assert set(sources_to_stage(forced, echo=lambda line: None)) == ALL_SOURCES
    assert shards_to_run(forced, echo=lambda line: None) == (sorted(ALL_SHARDS), {})
    assert freshness.guess_shards_needed(forced)
    # Watchers judge the data, not the instruction to a run.
    watched = freshness.without_overrides(forced)
    assert not watched.force and watched.chaos_fail_shard is None


def test_the_chaos_shard_is_always_recomputed(ran_sample):
    settings = ran_sample(SHARDS)
    chaos = settings.replace(chaos_fail_shard=1)
    states = freshness.shard_states(chaos)
    assert states[0].current and not states[0].override
    assert not states[1].current and states[1].override == "CHAOS_FAIL_SHARD=1"
    todo, skipped = shards_to_run(chaos, echo=lambda line: None)
    assert todo == [1] and list(skipped) == [0]
    assert freshness.guess_shards_needed(chaos)
    # It is not stale data: the checks and customer_profiles still find every shard current.
    assert freshness.stale_shards(chaos) == []
    assert freshness.profiles_state(chaos).current
    # Sources are not overridden by the chaos drill.
    assert all(s.unchanged for s in freshness.source_states(chaos).values())
    # The shard step's question about its own shard is decided before anything is read.
    shutil.rmtree(settings.staging_dir)
    assert freshness.shard_state(chaos, 1).override == "CHAOS_FAIL_SHARD=1"
