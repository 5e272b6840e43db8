"""Freshness: the one answer to "is this source unchanged, is this shard current, is
customer_profiles current", for every caller.

The runner, the assets' in-step skips, the sensors, the schedule and the checks all ask here, so
they cannot disagree. Each answer is a small frozen state object that says yes or no and why.

What is compared is what the warehouse recorded, in the same transaction as the data, against
what is on disk now:
- a source is unchanged when its staged version is this exact file (sha256), for this shard
  layout and staging code, the warehouse's `source_manifest` records that staging, the staged
  files still hold the recorded rows, and the source's checks pass on the recorded figures;
- a shard is current when its `shard_manifest` entry was written from the current staged inputs
  (their hash) and code;
- customer_profiles is current when every shard is, its `profiles_manifest` row was built from
  these shards and code, and the export on disk is the one it wrote (sha256).

Overrides are part of the answer. `--force` (settings.force) makes every source, shard and
customer_profiles not current, and CHAOS_FAIL_SHARD makes its shard not current: the drill is
about retrying real work. An overridden state is decided before anything is read (no file is
hashed, no warehouse opened) and names the override in `override` and `reason`. Callers that
watch rather than run (the sensors, the schedule) ask with `without_overrides(settings)`, and
`stale_shards` (the checks) and customer_profiles' own shard check strip them themselves: an
override is an instruction to a run, not a fact about the data.

`source_state(s)` -> SourceState, `shard_state(s)` -> ShardState, `profiles_state` ->
ProfilesState, `stale_shards`; `guess_shards_needed` is the runner's cheap guess, not an answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb

from etl_assets.lib import checks, files, staging, warehouse
from etl_assets.lib.declaration import Declaration
from etl_assets.lib.files import file_sha256
from etl_assets.lib.paths import duckdb_literals
from etl_assets.lib.rules import DECLARATION
from etl_assets.lib.schema import SourceSchema
from etl_assets.lib.settings import EtlSettings
from etl_assets.lib.validation import ReadReport, duplicate_reason

# Bump when staging output would change for the same input and declaration (types,
# validation, hashing): every source is then staged again. 4: the pointer records each slice
# file's sha256 (a version staged before has none, so nothing proves its files). The
# declaration's sources (their columns, kinds, ranges) are part of the staging key by themselves.
STAGING_VERSION = "4"
# Bump ENGINE_VERSION when the rows a shard writes would change for the same input and
# declaration (the engine's rules, the merge): every shard is then recomputed. The
# declaration's digest is part of CODE_VERSION, so editing a derived expression, a macro or a
# column recomputes every shard by itself.
ENGINE_VERSION = "1"


def code_version(decl: Declaration) -> str:
    """The shards' code version for a declaration: the engine's and the declaration's digest."""
    return f"{ENGINE_VERSION}-{decl.digest[:16]}"


CODE_VERSION = code_version(DECLARATION)  # the shipped pipeline's

SOURCE_SKIP_REASON = ("file sha256, shard layout and staging code unchanged since the last "
                      "staging (checked against the warehouse manifest)")


def staging_key(settings: EtlSettings) -> str:
    """The shard layout and staging code a source is staged for (in its version folder's name
    and in its manifest row)."""
    return f"n{settings.shard_count}-v{staging_code(settings.declaration)}"


def staging_code(decl: Declaration = DECLARATION) -> str:
    """The staging code: ours (STAGING_VERSION) and the declaration's sources."""
    return f"{STAGING_VERSION}-{decl.sources_digest[:12]}"


def without_overrides(settings: EtlSettings) -> EtlSettings:
    """The same settings with --force and the chaos shard off: the data as it is, which is what
    the sensors, the schedule and the checks judge."""
    return settings.replace(force=False, chaos_fail_shard=None)


def _force(settings: EtlSettings) -> str:
    return "--force" if settings.force else ""


@dataclass(frozen=True)
class SourceState:
    """Whether a source needs staging, and why.

    `unchanged`: nothing to do; the run skips the source's step. `reusable`: its staged version
    and warehouse record are exactly this file's, so staging it again reuses them (true even when
    its checks fail: then the step runs, reuses them, and its checks block again). The staged
    version and the recorded read come with the state when there are any.
    """

    name: str
    unchanged: bool
    reason: str
    reusable: bool = False
    override: str = ""
    # The file's sha256 as it is now; "" when not hashed (missing, never staged, overridden).
    file_sha256: str = ""
    # Its current staged version for this shard layout, if it has one.
    staged: staging.StagedSource | None = None
    # The read the warehouse recorded for that version, when `reusable`.
    recorded: ReadReport | None = None


def source_state(
    schema: SourceSchema, settings: EtlSettings, sha: str | None = None
) -> SourceState:
    """Is this source unchanged since it was last staged? `sha`: the file's sha256, when the
    caller has just computed it (otherwise it is hashed here, and only if it was ever staged).

    A missing file counts as changed, so that the source's own step reports it; so does a
    source whose checks fail, so that its step blocks what depends on it again.
    """
    before = _before_hashing(schema, settings, sha)
    if isinstance(before, SourceState):
        return before
    path, staged = before
    return _after_hashing(schema, settings, staged, sha or file_sha256(path))


def _before_hashing(
    schema: SourceSchema, settings: EtlSettings, sha: str | None
) -> SourceState | tuple[Path, staging.StagedSource]:
    """The state of a source that no sha256 of its file can change (forced, no file, never
    staged, staged for another shard count), or the file and the staged version its sha256
    is to be compared with: the one place that decides whether a file is hashed."""
    name = schema.name
    override = _force(settings)
    if override:
        return SourceState(name, False, f"{override}: staged again whatever changed",
                           override=override)
    path = Path(settings.data_dir) / schema.filename
    if not path.is_file():
        return SourceState(name, False, f"{path} is not a file")
    try:
        staged = staging.read_pointer(settings.staging_dir, name)
    except staging.StagingError:
        return SourceState(name, False, "never staged (or its staged version is gone)",
                           file_sha256=sha or "")  # no need to hash
    if staged.shard_count != settings.shard_count:
        return SourceState(
            name, False, f"staged for {staged.shard_count} shards, not {settings.shard_count}",
            file_sha256=sha or "")
    return path, staged


def _after_hashing(
    schema: SourceSchema, settings: EtlSettings, staged: staging.StagedSource, sha: str
) -> SourceState:
    """The state of a source staged for this layout, given its file's sha256."""
    name = schema.name

    def changed(reason: str) -> SourceState:
        return SourceState(name, False, reason, file_sha256=sha, staged=staged)

    key = staging_key(settings)
    if staged.file_sha256 != sha:
        return changed("the file's content (sha256) changed since it was staged")
    if not Path(staged.version_dir).name.endswith(key):
        return changed("staged by other staging code")
    # Both halves: the staged pointer on disk and the manifest row the warehouse committed with
    # the rejected rows, so a deleted or replaced warehouse forces a re-read.
    with warehouse.read_only(settings.database, settings.lock_timeout_s) as con:
        if con is None:
            return changed("no warehouse: its staging is not recorded")
        row = warehouse.read_source_manifest(con, name)
        # The version's files must still be the ones recorded, holding the rows recorded for
        # it (names and Parquet footers only: a file's bytes are proven when it is read).
        on_disk = _staged_rows(con, staged)
    if row is None:
        return changed("the warehouse has no record of its staging")
    if (row["file_sha256"], row["staging_key"]) != (sha, key):
        return changed("the warehouse records another staging of it")
    if on_disk != staged.slice_rows or sum(on_disk.values()) != row["rows_accepted"]:
        return changed("its staged files do not hold the rows recorded for them")
    report = ReadReport(row["rows_read"], row["rows_accepted"], row["rows_rejected"],
                        Counter(json.loads(row["reasons"])), superseded=duplicate_reason(schema.key))
    failed = [c.name for c in checks.source_checks(schema, report, staged, settings) if not c.passed]
    return SourceState(
        name, not failed,
        f"staged and recorded, but its check(s) {', '.join(failed)} fail" if failed
        else SOURCE_SKIP_REASON,
        reusable=True, file_sha256=sha, staged=staged, recorded=report)


def source_states(settings: EtlSettings) -> dict[str, SourceState]:
    """Every source's state, in source order.

    The files that will be hashed (`_before_hashing` says which) are hashed first, two at a
    time: hashlib releases the GIL, so two cores hash two files at once
    (docs/performance.md#sources).
    """
    sources = {s.name: s for s in settings.declaration.sources}
    before = {name: _before_hashing(schema, settings, None) for name, schema in sources.items()}
    to_hash = {name: b for name, b in before.items() if not isinstance(b, SourceState)}

    def sha_or_none(path: Path) -> str | None:
        try:
            return file_sha256(path)
        except OSError:  # gone meanwhile: source_state looks again and says what it found
            return None

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="etl-hash") as pool:
        shas = dict(zip(to_hash, pool.map(sha_or_none, [p for p, _ in to_hash.values()]),
                        strict=True))
    states: dict[str, SourceState] = {}
    for name, schema in sources.items():
        state = before[name]
        if isinstance(state, SourceState):
            states[name] = state
        elif shas[name] is None:
            states[name] = source_state(schema, settings)
        else:
            states[name] = _after_hashing(schema, settings, state[1], shas[name])
    return states


def _staged_rows(con: duckdb.DuckDBPyConnection, staged: staging.StagedSource) -> dict[int, int]:
    """Rows per shard in a staged version's files; {} if any shard's slice is missing, or the
    files are not those whose sha256 the pointer recorded.

    One query over every slice (counts come from the Parquet footers), not one per shard: it
    runs for every source on every run's skip decision.
    """
    shard_ids = list(range(staged.shard_count))
    try:
        files = staging.all_slice_files({staged.source: staged}, shard_ids)
        root = Path(staged.version_dir)
        if {str(Path(f).relative_to(root)) for f in files} != set(staged.file_sha256s):
            return {}
        counts = dict(con.execute(
            "SELECT shard_id, count(*) FROM read_parquet($files, hive_partitioning = true, "
            "hive_types = {'shard_id': INTEGER}) GROUP BY shard_id",
            {"files": duckdb_literals(files)}).fetchall())
    except (staging.StagingError, OSError, duckdb.Error):
        return {}
    return {k: int(counts.get(k, 0)) for k in shard_ids}


def _shard_override(settings: EtlSettings, shard_id: int) -> str:
    if settings.force:
        return "--force"
    if settings.chaos_fail_shard == shard_id:
        # The chaos drill is about retrying real work, never a skip.
        return f"CHAOS_FAIL_SHARD={shard_id}"
    return ""


@dataclass(frozen=True)
class ShardState:
    """Whether a shard's warehouse rows are current, and why.

    `input_hash`: what the shard would be built from now (its source_data_hash); `entry`: its
    shard_manifest entry, when the warehouse has one. Both are "" / None when overridden.
    """

    shard_id: int
    current: bool
    reason: str
    override: str = ""
    input_hash: str = ""
    entry: dict | None = None


def shard_states(
    settings: EtlSettings, con: duckdb.DuckDBPyConnection | None = None,
    shard_ids: list[int] | None = None,
) -> dict[int, ShardState]:
    """The state of every shard (or of `shard_ids`), by shard id. StagingError if a source is
    not staged for this layout (and a shard that is judged needs it).

    Judged against the manifest written in the same transaction as the shard's rows, so a
    replaced or deleted warehouse can never pass for current. `con`, if given, must have the
    warehouse attached; otherwise it is opened read-only here.
    """
    shard_ids = settings.shard_ids if shard_ids is None else shard_ids
    overrides = {k: _shard_override(settings, k) for k in shard_ids}
    states = {k: ShardState(k, False, f"{o}: recomputed whatever changed", override=o)
              for k, o in overrides.items() if o}
    judged = [k for k in shard_ids if k not in states]
    if judged:
        staged = staging.current_sources(settings)
        if con is None:
            with warehouse.read_only(settings.database, settings.lock_timeout_s) as own:
                manifest = {} if own is None else warehouse.read_manifest(own, settings.shard_count)
        else:
            manifest = warehouse.read_manifest(con, settings.shard_count)
        code = code_version(settings.declaration)
        for k in judged:
            states[k] = _shard_state(k, staging.shard_input_hash(staged, k), manifest.get(k), code)
    return dict(sorted(states.items()))


def _shard_state(shard_id: int, input_hash: str, entry: dict | None, code: str) -> ShardState:
    if entry is None:
        reason = "not in the warehouse manifest"
    elif entry["code_version"] != code:
        reason = f"written by code version {entry['code_version']}, not {code}"
    elif entry["source_data_hash"] != input_hash:
        reason = "its staged input slices changed since it was written"
    else:
        return ShardState(shard_id, True, (
            f"input slice hash and code version unchanged since run {entry['run_id']} "
            "(warehouse manifest)"), input_hash=input_hash, entry=entry)
    return ShardState(shard_id, False, reason, input_hash=input_hash, entry=entry)


def shard_state(settings: EtlSettings, shard_id: int) -> ShardState:
    """One shard's state (see `shard_states`); an overridden one reads nothing."""
    return shard_states(settings, shard_ids=[shard_id])[shard_id]


def stale_shards(
    settings: EtlSettings, con: duckdb.DuckDBPyConnection | None = None
) -> list[int]:
    """Shards whose warehouse rows were not written from the current staged inputs and code.

    The data as it is: overrides do not make a shard stale here (the checks ask this after a
    --force run, whose shards are all current).
    """
    return [k for k, state in shard_states(without_overrides(settings), con).items()
            if not state.current]


PROFILES_SKIP_REASON = ("every shard and the code are unchanged since the last rebuild, and the "
                        "export and snapshot on disk are the ones it wrote (sha256, and no WAL "
                        "beside the snapshot)")


def profiles_code(decl: Declaration = DECLARATION) -> str:
    """The code that shapes the table and the export: our rules and DuckDB's CSV writer."""
    return f"{code_version(decl)}-duckdb{duckdb.__version__}"


def shards_hash(states: dict[int, ShardState]) -> str:
    """One hash over every shard's manifest entry: what customer_profiles is built from."""
    text = "|".join(
        f"{k}:{s.entry['source_data_hash']}:{s.entry['code_version']}:{s.entry['record_count']}"
        for k, s in sorted(states.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ProfilesState:
    """Whether customer_profiles (table and export) is current, and why.

    `stale_shards`: shards not current (customer_profiles must not be built from them);
    `shards_hash`: what it would be built from now, when every shard is current; `entry`: its
    last build's profiles_manifest row, if any; `damaged`: the export or snapshot on disk that
    is not what the last publish wrote (another sha256, or a WAL beside the snapshot), which
    the next publish replaces.
    """

    current: bool
    reason: str
    override: str = ""
    stale_shards: tuple[int, ...] = ()
    shards_hash: str = ""
    entry: dict | None = None
    damaged: str = ""


def profiles_state(
    settings: EtlSettings, con: duckdb.DuckDBPyConnection | None = None
) -> ProfilesState:
    """Is customer_profiles current? `con`, if given, must have the warehouse attached;
    otherwise it is opened read-only here. StagingError as for `shard_states`."""
    override = _force(settings)
    if override:
        return ProfilesState(False, f"{override}: rebuilt and exported again whatever changed",
                             override=override)
    if con is None:
        with warehouse.read_only(settings.database, settings.lock_timeout_s,
                                 settings.duckdb_limits) as own:
            if own is not None:
                return profiles_state(settings, own)
        return ProfilesState(False, "no warehouse", stale_shards=tuple(stale_shards(settings)))
    # Its shards as they are: the chaos shard is not stale for customer_profiles.
    shards = shard_states(without_overrides(settings), con)
    stale = tuple(k for k, state in shards.items() if not state.current)
    if stale:
        return ProfilesState(False, f"shards {list(stale)} are not current with the staged "
                             "sources", stale_shards=stale)
    built_from = shards_hash(shards)
    entry = warehouse.read_profiles_manifest(con, settings.shard_count)
    export, snapshot = Path(settings.export_path), Path(settings.snapshot_path)
    damaged = ""
    if entry is None:
        reason = "never built for this shard layout"
    elif (entry["shards_hash"], entry["code_version"]) != (built_from,
                                                           profiles_code(settings.declaration)):
        reason = "its shards or code changed since it was built"
    elif entry["export_path"] != settings.export_path:
        reason = f"last exported to {entry['export_path']}"
    elif not _intact(export, entry["export_sha256"]):
        reason = "the export on disk is not the one it wrote"
        damaged = str(export) if export.is_file() else ""
    # Absent in a manifest written before snapshots existed: never intact then.
    elif not _intact(snapshot, entry.get("snapshot_sha256")):
        reason = "the snapshot on disk is not the one it wrote"
        damaged = str(snapshot) if snapshot.is_file() and entry.get("snapshot_sha256") else ""
    elif files.wal_files(snapshot):
        # Its bytes are the ones published, but a reader would replay the log onto them.
        reason = ("a write-ahead log beside the snapshot holds changes made to it since it was "
                  "published, which its readers see")
        damaged = str(snapshot)
    else:
        return ProfilesState(True, PROFILES_SKIP_REASON, shards_hash=built_from, entry=entry)
    return ProfilesState(False, reason, shards_hash=built_from, entry=entry, damaged=damaged)


def _intact(path: Path, sha256: str | None) -> bool:
    """True if `path` is a file whose sha256 is `sha256` (hashed without opening it in DuckDB,
    so a reader holding the file never delays the decision)."""
    return sha256 is not None and path.is_file() and file_sha256(path) == sha256


def guess_shards_needed(settings: EtlSettings) -> bool:
    """A cheap GUESS, before the sources are judged, whether a run will build any shard.

    Not an answer: nothing is hashed and the warehouse is not read. It only decides when the
    runner starts its worker processes (early, so their imports overlap the sources, or when
    first needed); what runs is decided by `shard_states` once the sources are staged. A data
    file modified after its source was last staged, a source never staged or staged for another
    shard layout, and the overrides (--force, the chaos shard) guess yes.
    """
    if any(_shard_override(settings, k) for k in settings.shard_ids):
        return True
    try:
        staging.current_sources(settings)
        for schema in settings.declaration.sources:
            data = Path(settings.data_dir) / schema.filename
            if data.stat().st_mtime_ns > staging.pointer_mtime_ns(settings.staging_dir,
                                                                  schema.name):
                return True
    except (staging.StagingError, OSError):
        return True
    return False
