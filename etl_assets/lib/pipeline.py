"""Which declaration a run follows, and the names and folders that keep each pipeline its own.

The settings carry a declaration file (`pipeline`, ETL_PIPELINE, `--pipeline`; "" is the shipped
customers.yaml). It is loaded here once per process per file content, so every caller of
`settings.declaration` gets one object, and two declarations in one process never mix: each
engine function reads the declaration of the settings it is given.

A Dagster component instance (etl_assets.component) may hold its declaration inline in its
own `defs.yaml` (under `attributes.declaration`): that file is then the declaration file, read
at that field, and the pipeline is named after the instance's folder.

The shipped pipeline keeps every default path and name it always had. Another pipeline is
named after its file (`fleet.yaml` -> `fleet`, `fleet/defs.yaml` -> `fleet`) and defaults to
a folder of its own under the home (`<home>/pipelines/fleet/`) for its warehouse, staging,
export parts, export, spill folder and run lock; its Dagster assets carry its name as a key
prefix. The Dagster home is shared.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from etl_assets.lib import declaration_file
from etl_assets.lib.declaration import SHIPPED, Declaration, error
from etl_assets.lib.rules import DECLARATION, ENGINE_MACROS

# A pipeline's name is a folder, an asset key prefix and part of job names.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A component instance's file, and where in it an inline declaration is.
COMPONENT_FILE = "defs.yaml"
INLINE = ("attributes", "declaration")


def is_component_file(path: str) -> bool:
    """True when `path` is a component instance's defs.yaml holding its declaration inline."""
    return Path(path).name == COMPONENT_FILE


def is_shipped(path: str) -> bool:
    """True for the shipped declaration ("" or the package's customers.yaml)."""
    return not path or Path(path).resolve() == SHIPPED


def name(path: str) -> str:
    """The pipeline's name: its file's stem (the shipped one is `customers`), or a component's
    folder; SettingsError when that is not a name."""
    if is_component_file(path):
        stem, what = Path(path).parent.name, "folder"
    else:
        stem, what = (Path(path).stem if path else SHIPPED.stem), "file"
    if not _NAME.match(stem):
        raise error(f"{path}: the {what} name makes the pipeline's name, and {stem!r} is not one "
                    f"(letters, digits and _, not starting with a digit): rename the {what}")
    return stem


def declaration(path: str) -> Declaration:
    """The declaration at `path` ("" = shipped), checked; SettingsError in one line."""
    if is_shipped(path):
        return DECLARATION
    name(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        declaration_file.read(path)  # raises the one-line error naming the file
        raise
    return _load(path, text)


@functools.lru_cache(maxsize=16)
def _load(path: str, text: str) -> Declaration:
    """The declaration `text` read from `path`: loaded once per content, however often asked."""
    within = INLINE if is_component_file(path) else ()
    return declaration_file.check(declaration_file.parse(text, path, within), ENGINE_MACROS)


def folder(home: Path, path: str) -> Path:
    """Where a pipeline keeps what is its own: the home itself for the shipped one, else
    `<home>/pipelines/<name>`."""
    return home if is_shipped(path) else home / "pipelines" / name(path)


def profiles_table(path: str) -> str:
    """The merged table (and asset) of the pipeline: `customer_profiles` for the shipped one,
    `profiles` for another (in its own warehouse, under its own asset key prefix)."""
    return "customer_profiles" if is_shipped(path) else "profiles"


def key_prefix(path: str) -> list[str]:
    """The asset key prefix of the pipeline's assets: none for the shipped one."""
    return [] if is_shipped(path) else [name(path)]
