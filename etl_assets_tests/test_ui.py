"""The Dagster UI as users drive it: a real `dagster dev`, real headless Chromium, real GraphQL.

Chromium comes from Debian (`apt-get install chromium`, done by `.ci/run`); locally the browser
test skips only when it is absent, and never under CI=true.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from etl_assets.defs.contracts import LAUNCHED_BY_TAG
from etl_assets.lib import limits
from etl_assets.lib.sharding import shard_of
from etl_assets_tests.conftest import edit_crm, free_port, process_group, wait_for_webserver

# One `dagster dev` (webserver + daemon) serves every test here, in file order: under xdist the
# module goes to one worker whole (conftest.ONE_WORKER).
pytestmark = pytest.mark.daemon

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Where the screenshots go; the README's images are made with ETL_SCREENSHOT_DIR=docs/img.
SHOTS = os.environ.get("ETL_SCREENSHOT_DIR")
# Four shards keep a UI "Materialize all" to six runs; the README's screenshots show the
# default ten.
SHARDS = 10 if SHOTS else 4
ASSETS = ["crm", "billing", "product", "support", "shard_inputs", "shard_profiles",
          "customer_profiles"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`dagster dev` from workspace.yaml on a free port, temp home/warehouse, sources staged
    (the sources job: the four sources and shard_inputs)."""
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    shutil.copytree(REPO / "data", data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAOS_", "SHARD_COUNT"))}
    # Sensors off so that only what the test launches runs; shard 3 fails once (chaos) so the
    # run page shows a retry.
    env.update(DAGSTER_HOME=str(root / "dagster_home"), ETL_HOME=str(root / "var"),
               DATA_DIR=str(data), ETL_AUTOMATION="off", CHAOS_FAIL_SHARD="3",
               SHARD_COUNT=str(SHARDS))
    subprocess.run([str(BIN / "etl-assets"), "home"], env=env, check=True, capture_output=True)
    port = free_port()
    with process_group([str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
                        "-h", "127.0.0.1", "-p", str(port)],
                       root / "dev.log", env=env, cwd=root) as proc:
        # Staged while the server starts (the two only share the instance's storage).
        staged = subprocess.run(
            [str(BIN / "dagster"), "job", "execute", "-m", "etl_assets.definitions", "-j",
             "sources_job"],
            env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert staged.returncode == 0, staged.stdout[-2000:] + staged.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"
        wait_for_webserver(url, proc, root / "dev.log")
        yield {"url": url, "root": root, "home": root / "dagster_home", "env": env,
               "db": root / "var" / "warehouse.duckdb", "log": root / "dev.log"}


def _runs(home: Path, partition: str | None = None) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tags = {"dagster/partition": partition} if partition else {}
        return list(instance.get_runs(dg.RunsFilter(tags=tags)))


def _wait_run(home: Path, partition: str, log: Path, timeout: float = 180) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(home, partition)
        if runs and runs[0].is_finished:
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished run for partition {partition}\n" + log.read_text()[-3000:])


def _shot(page, name: str, tmp: Path) -> Path:
    target = Path(SHOTS) if SHOTS else tmp
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    return path


@pytest.mark.browser
def test_materialize_one_shard_from_the_ui(server, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI: .ci/run must install it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        # The asset graph: both groups and all six assets (customer_profiles and its upstream).
        page.goto(server["url"] + "/assets/customer_profiles?view=lineage&lineageScope=upstream"
                  "&lineageDepth=5", wait_until="networkidle", timeout=60_000)
        with contextlib.suppress(Exception):  # a first-visit dialog, when there is one
            page.get_by_role("button", name="Skip").click(timeout=8_000)
        for name in ASSETS + ["sources", "profiles"]:
            page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
        _shot(page, "asset_graph.png", tmp_path)

        # shard_profiles: ten partitions, then launch partition 3 from the Materialize dialog.
        page.goto(server["url"] + "/assets/shard_profiles?view=partitions",
                  wait_until="networkidle")
        page.get_by_text(f"{SHARDS} Partitions Selected").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs")
        dialog.get_by_text("Select a partition or create one").click()
        page.keyboard.type("3")
        page.get_by_role("menuitem").filter(has_not_text="Select all").first.click()
        dialog.get_by_role("button", name="Launch 1 run").click()

        run = _wait_run(server["home"], "3", server["log"])
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags[LAUNCHED_BY_TAG] == "ui"  # recorded by the instance's run coordinator
        con = duckdb.connect(str(server["db"]), read_only=True)
        try:
            shards = con.execute("SELECT shard_id, count(*) FROM shard_profiles "
                                 "GROUP BY shard_id").fetchall()
        finally:
            con.close()
        assert len(shards) == 1 and shards[0][0] == 3 and shards[0][1] > 50

        # The run page: shard 3 failed on attempt 1 (chaos) and the retry succeeded.
        page.goto(server["url"] + f"/runs/{run.run_id}", wait_until="networkidle")
        page.get_by_text("shard_profiles").first.wait_for(timeout=30_000)
        page.wait_for_timeout(2_000)
        _shot(page, "shard_retry_timeline.png", tmp_path)
        browser.close()
    with dg.DagsterInstance.from_config(str(server["home"])) as instance:
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(run.run_id)
                 if e.dagster_event]
    assert "STEP_UP_FOR_RETRY" in kinds and "STEP_RESTARTED" in kinds


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(url + "/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
STATUS = """
query Status($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
  }
}"""
CHECKS = """
query Checks {
  assetNodes(assetKeys: [{path: ["customer_profiles"]}]) {
    assetChecksOrError {
      ... on AssetChecks {
        checks { name executionForLatestMaterialization { status evaluation { success } } }
      }
    }
  }
}"""


def test_materialize_all_through_graphql(server):
    params = {"assetSelection": [{"path": [name]} for name in ASSETS], "allPartitions": True,
              "title": "materialize all (test)"}
    launched = _graphql(server["url"], LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.monotonic() + 420
    status = None
    while time.monotonic() < deadline:
        status = _graphql(server["url"], STATUS, {"id": launched["backfillId"]})[
            "partitionBackfillOrError"]["status"]
        if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
            break
        time.sleep(3)
    assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, server["log"].read_text()[-3000:])
    # The backfill keeps the graph's order: no shard run started before the sources were staged.
    runs = _runs(server["home"])
    backfill = [r for r in runs if r.tags.get("dagster/backfill") == launched["backfillId"]]
    with dg.DagsterInstance.from_config(str(server["home"])) as instance:
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(
            dg.RunsFilter(run_ids=[r.run_id for r in backfill]))}
    sources = [records[r.run_id] for r in backfill if dg.AssetKey("crm") in (r.asset_selection or ())]
    shards = [records[r.run_id] for r in backfill if r.tags.get("dagster/partition")]
    assert len(sources) == 1 and len(shards) == SHARDS, [r.asset_selection for r in backfill]
    assert min(r.start_time for r in shards) >= sources[0].end_time
    assert {r.tags[LAUNCHED_BY_TAG] for r in backfill} == {"backfill"}
    # The queue let at most max_concurrent_runs run at once, each DuckDB on its share of cores.
    with dg.DagsterInstance.from_config(str(server["home"])) as instance:
        slots = instance.get_concurrency_config().run_queue_config.max_concurrent_runs
        events = instance.fetch_materializations(dg.AssetKey("shard_profiles"), limit=100)
    threads = {e.asset_materialization.metadata["duckdb_threads"].value for e in events.records
               if e.run_id in records and "duckdb_threads" in e.asset_materialization.metadata}
    memory = os.environ.get("DUCKDB_MEMORY_LIMIT") or limits.DEFAULT_MEMORY_LIMIT
    assert slots == limits.run_slots(limits.cores(), limits.ram_bytes(), memory)
    edges = sorted([(r.start_time, 1) for r in records.values()] +
                   [(r.end_time, -1) for r in records.values()])
    running = [sum(step for _, step in edges[:i + 1]) for i in range(len(edges))]
    assert 1 <= max(running) <= slots
    assert threads == {limits.threads_per_run(limits.cores(), slots)}
    [node] = _graphql(server["url"], CHECKS)["assetNodes"]
    checks = {c["name"]: c["executionForLatestMaterialization"]
              for c in node["assetChecksOrError"]["checks"]}
    assert set(checks) == {"row_count_matches_sources", "no_duplicate_customer_id",
                           "idempotency_keys_unique", "shards_current", "export_matches_table"}
    assert all(c["status"] == "SUCCEEDED" and c["evaluation"]["success"] for c in checks.values()), checks
    con = duckdb.connect(str(server["db"]), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM customer_profiles").fetchone()[0] == 1000
        assert con.execute("SELECT count(DISTINCT shard_id) FROM shard_profiles").fetchone()[0] \
            == SHARDS
    finally:
        con.close()


STALE = """
query Stale($partitions: [String!]) {
  assetNodes(assetKeys: [{path: ["shard_profiles"]}]) {
    staleStatusByPartition(partitions: $partitions)
    staleCausesByPartition(partitions: $partitions) { reason key { path } dependency { path } }
  }
}"""


def _stale_by_partition(url: str) -> dict[str, tuple[str, list[str]]]:
    keys = [str(k) for k in range(SHARDS)]
    [node] = _graphql(url, STALE, {"partitions": keys})["assetNodes"]
    def cause(c: dict) -> str:
        return f"{(c['dependency'] or c['key'])['path'][0]}: {c['reason']}"

    return {k: (status, [cause(c) for c in causes])
            for k, status, causes in zip(keys, node["staleStatusByPartition"],
                                         node["staleCausesByPartition"], strict=False)}


def test_ui_marks_exactly_the_changed_shard_stale(server):
    """After everything is built, one changed CRM row + staging the sources marks exactly
    that customer's shard partition stale in the UI's own API, naming shard_inputs."""
    before = _stale_by_partition(server["url"])
    assert {status for status, _ in before.values()} == {"FRESH"}, before
    edit_crm(server["root"] / "data", {"cust_00000042": 4242})
    staged = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "etl_assets.definitions", "-j",
         "sources_job"], env=server["env"], cwd=server["root"], capture_output=True, text=True,
        timeout=300)
    assert staged.returncode == 0, staged.stdout[-2000:] + staged.stderr[-2000:]
    after = _stale_by_partition(server["url"])
    changed = str(shard_of("cust_00000042", SHARDS))
    assert after[changed][0] == "STALE", after
    assert any(c.startswith("shard_inputs:") for c in after[changed][1]), after
    assert {k for k, (status, _) in after.items() if status != "FRESH"} == {changed}, after


RESOURCES = """
query Resources($repo: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $repo) {
    __typename
    ... on ResourceDetailsList {
      results { name resourceType configuredValues { key value type } assetKeysUsing { path } }
    }
  }
}"""


def test_the_resource_page_shows_each_typed_resource_and_its_variables(server):
    """What the UI's resource page reads: the four resources, the warehouse on dagster-duckdb,
    and a value the environment set shown as that variable (DATA_DIR), not a copy of it."""
    repo = {"repositoryLocationName": "etl_assets", "repositoryName": "__repository__"}
    found = _graphql(server["url"], RESOURCES, {"repo": repo})["allTopLevelResourceDetailsOrError"]
    assert found["__typename"] == "ResourceDetailsList", found
    by_name = {r["name"]: r for r in found["results"]}
    assert set(by_name) == {"warehouse", "staging", "faults", "automation"}
    assert by_name["warehouse"]["resourceType"].endswith("WarehouseResource")
    values = {v["key"]: (v["type"], v["value"]) for v in by_name["staging"]["configuredValues"]}
    assert values["data_dir"] == ("ENV_VAR", "DATA_DIR")
    using = {"/".join(k["path"]) for k in by_name["warehouse"]["assetKeysUsing"]}
    assert {"crm", "shard_profiles", "customer_profiles"} <= using
