"""The README and docs/: the column tables and the rules come from the declaration, links
resolve, tables are whole.

Fast and Dagster-free: it reads Markdown files and calls `columns_markdown()` and
`rules_markdown()`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from etl_assets.lib.rules import rules_markdown
from etl_assets.lib.schema import columns_markdown

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12 * 1024

BEGIN, END = "<!-- columns:begin -->", "<!-- columns:end -->"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title").
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CELL_SEPARATOR = re.compile(r"(?<!\\)\|")
DELIMITER_ROW = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
        else:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        without_code = re.sub(r"(`+).*?\1", "", line)
        out += [(number, m.group(1)) for m in LINK.finditer(without_code)]
    return out


def tables(path: Path) -> list[tuple[int, list[tuple[int, str]]]]:
    """Every Markdown table outside code: (line of its header, [(line, row), ...] incl. header)."""
    lines = prose_lines(path.read_text(encoding="utf-8"))
    found, i = [], 0
    while i < len(lines) - 1:
        (number, line), (next_number, following) = lines[i], lines[i + 1]
        if "|" in line and next_number == number + 1 and "|" in following \
                and DELIMITER_ROW.match(following):
            rows = [(number, line), (next_number, following)]
            i += 2
            while i < len(lines) and lines[i][0] == rows[-1][0] + 1 and "|" in lines[i][1] \
                    and lines[i][1].strip():
                rows.append(lines[i])
                i += 1
            found.append((number, rows))
        else:
            i += 1
    return found


def cell_count(row: str) -> int:
    """Cells in a table row: split on unescaped `|` (GitHub splits inside backticks too)."""
    cells = CELL_SEPARATOR.split(row.strip())
    if cells and cells[0].strip() == "":
        cells = cells[1:]
    if cells and cells[-1].strip() == "" and row.strip().endswith("|"):
        cells = cells[:-1]
    return len(cells)


def _generated(page: Path, begin: str, end: str, expected: str, source: str) -> None:
    """`page` holds exactly one `begin`/`end` pair, and between them the text `source` gives."""
    text = page.read_text(encoding="utf-8")
    assert text.count(begin) == 1 and text.count(end) == 1, (
        f"{_rel(page)} must hold exactly one {begin} and one {end} marker")
    between = text.split(begin, 1)[1].split(end, 1)[0]
    assert between.strip() == expected.strip(), (
        f"{_rel(page)}: the text between {begin} and {end} differs from {source}; paste its "
        "output there")


def test_the_column_tables_are_generated_from_the_declaration():
    _generated(REPO / "docs" / "rules.md", BEGIN, END, columns_markdown(),
               "etl_assets.lib.schema.columns_markdown()")


def test_the_rules_page_shows_the_declared_rules():
    """docs/rules.md's scores are the declaration's expressions and macros, not a retelling."""
    _generated(REPO / "docs" / "rules.md", "<!-- rules:begin -->", "<!-- rules:end -->",
               rules_markdown(), "etl_assets.lib.rules.rules_markdown()")


def test_readme_is_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto, ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{_rel(page)}:{number}: {target} -> no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{_rel(page)}:{number}: {target} -> no heading "
                          f"#{anchor} in {linked.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_table_row_has_as_many_cells_as_its_header(page: Path):
    bad = []
    for header_line, rows in tables(page):
        expected = cell_count(rows[0][1])
        for number, row in rows[1:]:
            if cell_count(row) != expected:
                bad.append(f"{_rel(page)}:{number}: {cell_count(row)} cells, the header "
                           f"(line {header_line}) has {expected}")
    assert not bad, "malformed tables:\n" + "\n".join(bad)


def test_the_checker_sees_links_tables_and_anchors():
    """Guards the guards: the helpers find what the pages really contain."""
    readme_links = [target for _, target in links(README)]
    assert "docs/operations.md" in readme_links
    assert "docs/img/asset_graph.png" in readme_links
    assert len(tables(README)) >= 3 and len(tables(REPO / "docs" / "rules.md")) >= 4
    assert "bring-your-own-data" in anchors(README)
    assert slug("`<path>: file not found`") == "path-file-not-found"
    assert slug("Words used here") == "words-used-here"
    assert cell_count("| a | `b \\| c` | d |") == 3
    assert cell_count("| a | b | c | d |") == 4


def test_every_setting_is_documented_where_its_reader_looks():
    """User settings in the README's configuration table; test hooks in contributing.md."""
    from etl_assets.lib.settings import ENV_VARS

    hooks = {"CHAOS_FAIL_SHARD", "CHAOS_FAIL_MODE", "ETL_CRASH_AT", "ETL_CRASH_MODE"}
    readme = README.read_text(encoding="utf-8")
    contributing = (REPO / "docs" / "contributing.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert {v for v in ENV_VARS if f"| `{v}` |" not in table} == hooks
    assert [v for v in sorted(hooks) if f"`{v}" not in contributing] == []


def test_the_declaration_pages_example_is_the_one_the_end_to_end_test_runs(tmp_path):
    """docs/declaration.md's fleet example loads and type-checks, and is the declaration
    test_other_domain runs through real etl-assets runs."""
    from etl_assets.lib import pipeline
    from etl_assets_tests.test_other_domain import FLEET

    text = (REPO / "docs" / "declaration.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert example == FLEET
    path = tmp_path / "fleet.yaml"
    path.write_text(example, encoding="utf-8")
    declared = pipeline.declaration(str(path))
    assert declared.key == "vehicle_id"
    assert [source.name for source in declared.sources] == ["vehicles", "trips", "services"]
