"""Reading a declaration file: YAML (PyYAML's SafeLoader, the loader of safe_load) with each
field's line, then every structural rule of the format; `load` adds the SQL check.

Each rule fails with `Document.fail`: one line naming the file, the line and the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from etl_assets.lib import declaration_sql
from etl_assets.lib.declaration import (
    ENGINE_COLUMNS,
    ENGINE_RELATIONS,
    KINDS,
    NUMERIC_KINDS,
    Column,
    Declaration,
    Derived,
    Document,
    Macro,
    Path_,
    SourceSchema,
    error,
    field_name,
)

_TOP = ("key", "sources", "prefer", "macros", "derived", "export")
_SOURCE = ("file", "description", "columns", "not_greater_than")
_COLUMN = ("kind", "min", "max", "domain", "required")
_MACRO = ("params", "sql")
# Names go into SQL unquoted, hence plain identifiers only.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def read(path: str | Path) -> Document:
    """The file parsed as YAML (PyYAML's SafeLoader, as safe_load), duplicate keys refused."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = (exc.strerror or "cannot be read").lower() if isinstance(exc, OSError) \
            else "is not UTF-8 text"
        Document(name, None, {}).fail((), problem)
    return parse(text, name)


def parse(text: str, name: str, within: Path_ = ()) -> Document:
    """`text` parsed as a declaration file called `name` (see `read`). With `within` (a
    component's defs.yaml holds its declaration at `attributes.declaration`), the declaration
    is the value at that field of the file's first document holding one; each field's line
    is still its line in the file."""
    loader = yaml.SafeLoader(text)
    try:
        node = _node_within(loader, within, name) if within else loader.get_single_node()
        lines: dict[Path_, int] = {}
        duplicate = _walk(node, (), lines, set()) if node is not None else None
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: malformed YAML: {problem}") from None
    finally:
        loader.dispose()
    doc = Document(name, data, lines)
    if duplicate:
        path, first = duplicate
        doc.fail(path, f"duplicate name (first on line {first})")
    return doc


def _node_within(loader: yaml.SafeLoader, within: Path_, name: str) -> yaml.Node:
    """The node at `within` in the first of the stream's documents that has one."""
    while loader.check_node():
        node: yaml.Node | None = loader.get_node()
        for field in within:
            node = next((value for key, value in node.value
                         if isinstance(key, yaml.ScalarNode) and key.value == field), None) \
                if isinstance(node, yaml.MappingNode) else None
        if node is not None:
            return node
    raise error(f"{name}: {field_name(within)}: missing (the declaration this component hosts)")


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int],
          seen: set[int]) -> tuple[Path_, int] | None:
    """Record each field's line; return the first duplicate key (its path, the first line)."""
    if id(node) in seen:  # an alias: already walked where it was anchored
        return None
    seen.add(id(node))
    children: list[tuple[Path_, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            here = (*path, str(key))
            if key in first_line:
                lines[here] = key_node.start_mark.line + 1  # the error points at the second
                return here, first_line[key]
            first_line[key] = lines[here] = key_node.start_mark.line + 1
            children.append((here, value_node))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            children.append(((*path, i), item))
    for here, child in children:
        found = _walk(child, here, lines, seen)
        if found:
            return found
    return None


def load(path: str | Path, engine_macros: Sequence[str]) -> Declaration:
    """The declaration at `path`, checked in structure and in DuckDB against the engine's
    macros (`CREATE MACRO` statements its SQL may use); SettingsError on the first problem."""
    return check(read(path), engine_macros)


def check(doc: Document, engine_macros: Sequence[str]) -> Declaration:
    """`doc` as a Declaration: structure here, then its SQL in DuckDB (`declaration_sql`)."""
    return declaration_sql.check_sql(doc, structure(doc), engine_macros)


def structure(doc: Document) -> Declaration:
    """Every structural rule of the format; the derived columns' types are not known yet."""
    if doc.data is None:
        doc.fail((), "is empty (a declaration needs at least key and sources)")
    top = _mapping(doc, doc.data, (), _TOP, required=("key", "sources"))
    key = _name(doc, top["key"], ("key",))
    sources_raw = _mapping(doc, top["sources"], ("sources",))
    if not sources_raw:
        doc.fail(("sources",), "at least one source is needed")
    sources = tuple(_source(doc, name, sources_raw[name], key) for name in sources_raw)
    _one_kind_per_column(doc, sources)
    files: dict[str, str] = {}
    for s in sources:
        if s.filename in files:
            doc.fail(("sources", s.name, "file"), f"'{s.filename}' is also the file of {files[s.filename]}")
        files[s.filename] = s.name
    prefer = _prefer(doc, top.get("prefer"), key, sources)
    macros = tuple(_macro(doc, name, body) for name, body in
                   _mapping(doc, top.get("macros", {}), ("macros",)).items())
    _unique(doc, [(("macros", m.name), m.name) for m in macros])
    columns = [key, *(c.name for s in sources for c in s.data_columns)]
    derived = []
    for name, sql in _mapping(doc, top.get("derived", {}), ("derived",)).items():
        _name(doc, name, ("derived", name))
        if name.lower() in {c.lower() for c in columns}:
            doc.fail(("derived", name), "duplicate name: a source column is called that already")
        if name.lower() in ENGINE_COLUMNS:
            doc.fail(("derived", name), f"'{name}' is a column the engine adds")
        derived.append(Derived(name, _sql(doc, sql, ("derived", name))))
    _unique(doc, [(("derived", d.name), d.name) for d in derived])
    merged = list(dict.fromkeys(columns))
    default = (*merged, *(d.name for d in derived))
    export = _export(doc, top.get("export"), key, default) if "export" in top else default
    return Declaration(doc.name, key, sources, prefer, macros, tuple(derived), export)


def _repr(value: object) -> str:
    """`value` as written in an error: repr (one line whatever it holds), shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(value: object) -> str:
    return f"{type(value).__name__} {_repr(value)}" if value is not None else "nothing"


def _mapping(doc: Document, value: object, path: Path_, options: Sequence[str] = (),
             required: Sequence[str] = ()) -> dict[str, Any]:
    """`value` as a mapping with text keys (and only `options`, if given), or fail."""
    if not isinstance(value, dict):
        doc.fail(path, f"must be a mapping, got {_shown(value)}")
    for k in value:
        if not isinstance(k, str):
            doc.fail((*path, str(k)), "a name must be text (quote it in YAML)")
        if options and k not in options:
            doc.fail((*path, k), f"unknown option (one of {', '.join(options)})")
    for r in required:
        if r not in value:
            doc.fail(path, f"'{r}' is required")
    return value


def _name(doc: Document, value: object, path: Path_) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        doc.fail(path, f"{_repr(value)} is not a name (letters, digits and _, not starting with "
                       "a digit)")
    return value


def _sql(doc: Document, value: object, path: Path_) -> str:
    if not isinstance(value, str) or not value.strip():
        doc.fail(path, f"must be a DuckDB SQL expression (text), got {_shown(value)}")
    return value.strip()


def _unique(doc: Document, named: list[tuple[Path_, str]]) -> None:
    """Names DuckDB would take for one another (it ignores case) are duplicates."""
    first: dict[str, str] = {}
    for path, name in named:
        if name.lower() in first:
            doc.fail(path, f"duplicate name (as {first[name.lower()]})")
        first[name.lower()] = field_name(path)


def _source(doc: Document, name: str, raw: object, key: str) -> SourceSchema:
    path: Path_ = ("sources", name)
    _name(doc, name, path)
    if name.lower() in ENGINE_RELATIONS:
        doc.fail(path, f"'{name}' names a relation of the merge query ({', '.join(ENGINE_RELATIONS)}); "
                       "choose another name")
    body = _mapping(doc, raw, path, _SOURCE, required=("file", "columns"))
    filename = body["file"]
    if not isinstance(filename, str) or not re.fullmatch(r"[^/\\]+", filename) \
            or not filename.isprintable() or filename in (".", ".."):
        doc.fail((*path, "file"), f"{_repr(filename)} is not a file name (no folders: the data "
                                  "folder holds every source)")
    description = body.get("description", "")
    if not isinstance(description, str):
        doc.fail((*path, "description"), f"must be text, got {_shown(description)}")
    raw_columns = _mapping(doc, body["columns"], (*path, "columns"))
    columns = [_column(doc, (*path, "columns", c), c, spec, key) for c, spec in raw_columns.items()]
    _unique(doc, [((*path, "columns", c.name), c.name) for c in columns])
    names = {c.name for c in columns}
    if key not in names:
        doc.fail((*path, "columns"), f"no key column '{key}' (every source carries the key)")
    for c in columns:
        for prefix in ("v_", "m_"):
            if c.name.startswith(prefix) and c.name[2:] in names:
                doc.fail((*path, "columns", c.name), f"validation names its working column for "
                         f"{c.name[2:]} so; rename one of them")
    pairs = _not_greater_than(doc, body.get("not_greater_than", []), path, {c.name: c for c in columns})
    ordered = sorted(columns, key=lambda c: c.name != key)  # the key first, the rest as declared
    return SourceSchema(name, filename, tuple(ordered), description.strip(), pairs)


def _column(doc: Document, path: Path_, name: str, raw: object, key: str) -> Column:
    _name(doc, name, path)
    if name.lower() in ENGINE_COLUMNS:
        doc.fail(path, f"'{name}' is a column the engine adds (one of {', '.join(ENGINE_COLUMNS)})")
    spec = _mapping(doc, raw, path, _COLUMN, required=("kind",))
    kind = spec["kind"]
    if kind not in KINDS:
        doc.fail((*path, "kind"), f"unknown kind {_repr(kind)} (one of {', '.join(KINDS)})")
    if name == key and kind != "id":
        doc.fail((*path, "kind"), f"the key ({key}) is of kind id")
    if kind == "id" and name != key:
        doc.fail((*path, "kind"), f"id is the key's kind ({key}); use text")
    bounds: dict[str, float] = {}
    for option in ("min", "max"):
        if option in spec:
            value = spec[option]
            if kind not in NUMERIC_KINDS:
                doc.fail((*path, option), f"a range is for {', '.join(NUMERIC_KINDS)} columns, "
                                          f"not {kind}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                doc.fail((*path, option), f"must be a number, got {_shown(value)}")
            bounds[option] = value
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        doc.fail((*path, "max"), f"{bounds['max']} is below min {bounds['min']}")
    domain = _domain(doc, spec.get("domain"), (*path, "domain"), kind)
    required = spec.get("required", False)
    if not isinstance(required, bool):
        doc.fail((*path, "required"), f"must be true or false, got {_shown(required)}")
    return Column(name, kind, bounds.get("min"), bounds.get("max"), domain, required)


def _domain(doc: Document, raw: object, path: Path_, kind: str) -> tuple[str, ...]:
    if raw is None:
        if kind == "category":
            doc.fail(path[:-1], "a category needs its domain (the values it may take)")
        return ()
    if kind != "category":
        doc.fail(path, f"a domain is for category columns, not {kind}")
    if not isinstance(raw, list) or not raw:
        doc.fail(path, f"must be a list of values, got {_shown(raw)}")
    for i, value in enumerate(raw):
        # YAML reads yes/no/on/off as booleans and 1.0 as a number: a value must be written
        # as the text it is.
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            doc.fail((*path, i), f"{_repr(value)} is not a value (text without surrounding spaces; "
                                 "quote it in YAML)")
    if len(set(raw)) != len(raw):
        doc.fail(path, "a value is listed twice")
    return tuple(raw)


def _not_greater_than(doc: Document, raw: object, path: Path_,
                      columns: dict[str, Column]) -> tuple[tuple[str, str], ...]:
    path = (*path, "not_greater_than")
    if not isinstance(raw, list):
        doc.fail(path, f"must be a list of [left, right] pairs, got {_shown(raw)}")
    pairs = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
            doc.fail((*path, i), f"must be a pair of two columns [left, right], got {_repr(pair)}")
        kinds = set()
        for side in pair:
            if side not in columns:
                doc.fail((*path, i), f"{_repr(side)} is not a column of this source")
            kinds.add("date" if columns[side].kind == "date" else columns[side].kind in NUMERIC_KINDS)
        if kinds not in ({True}, {"date"}):
            doc.fail((*path, i), "compares two numbers or two dates")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _one_kind_per_column(doc: Document, sources: tuple[SourceSchema, ...]) -> None:
    """A column several sources carry is merged into one: it has one kind."""
    first: dict[str, tuple[str, str]] = {}
    for s in sources:
        for c in s.data_columns:
            if c.name in first and first[c.name][1] != c.kind:
                other, kind = first[c.name]
                doc.fail(("sources", s.name, "columns", c.name, "kind"),
                         f"{c.kind}, but {other} declares {c.name} as {kind} (a column several "
                         "sources carry has one kind)")
            first.setdefault(c.name, (s.name, c.kind))


def _prefer(doc: Document, raw: object, key: str,
            sources: tuple[SourceSchema, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every shared column with its sources in preference order (declaration order unless
    `prefer` names it)."""
    given = _mapping(doc, raw if raw is not None else {}, ("prefer",))
    carried: dict[str, list[str]] = {}
    for s in sources:
        for c in s.data_columns:
            carried.setdefault(c.name, []).append(s.name)
    for column, order in given.items():
        path: Path_ = ("prefer", column)
        if column == key:
            doc.fail(path, "the key is every source's: there is nothing to prefer")
        if column not in carried:
            doc.fail(path, f"no source declares a column {_repr(column)}")
        if len(carried[column]) < 2:
            doc.fail(path, f"only {carried[column][0]} carries {column} (prefer is for a column "
                           "several sources carry)")
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(carried[column]):
            doc.fail(path, f"must list the sources that carry {column}, each once, the "
                           f"preferred first: {', '.join(carried[column])} in some order")
    return tuple((column, tuple(given.get(column, names)))
                 for column, names in carried.items() if len(names) > 1)


def _macro(doc: Document, name: str, raw: object) -> Macro:
    path: Path_ = ("macros", name)
    _name(doc, name, path)
    body = _mapping(doc, raw, path, _MACRO, required=("sql",))
    params = body.get("params", [])
    if not isinstance(params, list):
        doc.fail((*path, "params"), f"must be a list of names, got {_shown(params)}")
    for i, p in enumerate(params):
        _name(doc, p, (*path, "params", i))
    _unique(doc, [((*path, "params", i), p) for i, p in enumerate(params)])
    return Macro(name, tuple(params), _sql(doc, body["sql"], (*path, "sql")))


def _export(doc: Document, raw: object, key: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(raw, list):
        doc.fail(("export",), f"must be a list of column names, got {_shown(raw)}")
    for i, name in enumerate(raw):
        if name not in columns:
            doc.fail(("export", i), f"no source or derived column is called {_repr(name)}")
        if name in raw[:i]:
            doc.fail(("export", i), f"{name} is listed twice")
    if not raw or raw[0] != key:
        doc.fail(("export",), f"the export starts with the key ({key})")
    missing = [c for c in columns if c not in raw]
    if missing:
        doc.fail(("export",), f"missing {', '.join(missing)} (the export lists every column once)")
    return tuple(raw)
