"""Checks that the tables of the results READMEs are what their CSVs say.

  python -m tools.check_results [DIR ...] [--update]

DIR defaults to docs/results/README.md and every study under docs/results/;
every README.md under a DIR (sub-folders too) is read. A Markdown table is marked with an HTML comment
right above it (blank lines between are allowed) that names its source and
gives the template of its rows:

  <!-- table: summary.csv
  where: noise_rate > 0
  let minutes = wall_seconds / 60
  | {noise_rate:.0%} | {peak_test_accuracy:.3f} ({peak_test_step:,}) | {minutes:.1f} |
  -->

- `table: FILE`: the CSV (relative to the README's folder); the table has a
  row per CSV row, in the CSV's order. Without FILE (`table:` alone) the rows
  are the `row` lines only.
- `row KEY` or `row KEY: LABEL` (any number): the rows, in this order, are
  the CSV rows whose key column (`key: COLUMN`, default the CSV's first
  column) is KEY; `{key}` and `{label}` (KEY when no LABEL is given) can be
  used in the template.
- `where: EXPR`: only the CSV rows for which the Python expression is true.
- `in: FOLDER`: paths are relative to FOLDER (itself relative to the
  README's folder), for a table that copies a study's into another README.
- `let NAME = EXPR` (any number, in order): a value the template can use.
- `| ... |`: one cell per column of the table, each a Python f-string
  (`{expression:format}`) over the row's columns (numbers parsed, an empty
  CSV cell is MISSING, which formats as "-"; `row` is the row as a dict) and
  the helpers below (a column of the same name hides a helper).

`<!-- table: text -->` marks a table that holds no data (not checked).

Helpers (paths relative to the README's folder): csv(PATH, **match) the rows
of a CSV whose columns equal the given values; one(PATH, COLUMN, **match) the
value of COLUMN in the one such row; first_step(PATH, LEVEL, column="mean",
**match) the `step` of the first such row (in file order) whose COLUMN is at
least LEVEL, MISSING if none is; mean(values) (MISSING ones left out);
json(PATH); fmt(VALUE, SPEC, missing="-") VALUE formatted, `missing` for
MISSING; MISSING.

The check regenerates each marked table and compares it with the published
one cell by cell, after collapsing runs of spaces. Numbers are formatted by
Python's format specs, the same as cg_tf.measure.report (so a value is
rounded, never truncated, to the printed digits: the value the CSV stores,
so 0.5185, stored as 0.51849999..., prints as 0.518), and a published number
with other digits than the template's, or truncated instead of rounded, is a
mismatch. Every mismatch names the README, the line, the row, the column,
the published text and the text the CSV gives; a row missing from the table
or one the CSV does not have is an error too, and so is a table without a
marker in a README found under a DIR, except under an `in_progress/` folder
(a study still running; a README named as a file, e.g. the project's
README.md, which copies some of the studies' tables, is checked where
marked). Exit status 1 on any error.

--update rewrites the rows of every marked table from its CSV (the header and
separator are kept) instead of checking them.

Templates are Python evaluated with a few builtins: READMEs are code of this
repository, as trusted as its modules.
"""

import argparse
import csv as csv_module
import dataclasses
import glob
import json as json_module
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
INDEX = os.path.join(RESULTS, "README.md")  # the studies' tables copied, with their summaries
IN_PROGRESS = "in_progress"


class Missing:
    """An empty CSV cell: formats as "-", and arithmetic with it stays missing."""

    def __format__(self, spec: str) -> str:
        return "-"

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def _missing(self, *_):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _missing
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __neg__ = __abs__ = _missing
    __pow__ = __rpow__ = _missing

    def __lt__(self, other):
        return False

    __le__ = __gt__ = __ge__ = __lt__


MISSING = Missing()

SAFE_BUILTINS = {name: __builtins__[name] if isinstance(__builtins__, dict)
                 else getattr(__builtins__, name)
                 for name in ("abs", "all", "any", "dict", "enumerate", "float", "int", "len",
                              "list", "max", "min", "range", "round", "sorted", "str", "sum",
                              "tuple", "zip")}


def parse_value(text: str):
    """A CSV cell as a number where it is one, MISSING where it is empty."""
    if text == "":
        return MISSING
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class CheckError(Exception):
    """A marker that cannot be read or evaluated."""


class Study:
    """The CSVs and JSON files of one README's folder, read once."""

    def __init__(self, folder: str):
        self.folder = folder
        self._csv: dict[str, list[dict]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def rows(self, name: str) -> list[dict]:
        if name not in self._csv:
            path = self.path(name)
            if not os.path.isfile(path):
                raise CheckError(f"no file {path}")
            with open(path, newline="") as f:
                self._csv[name] = [{k: parse_value(v) for k, v in row.items()}
                                   for row in csv_module.DictReader(f)]
        return self._csv[name]

    def helpers(self) -> dict:
        def csv(name, /, **match):
            return [r for r in self.rows(name) if all(r.get(k) == v for k, v in match.items())]

        def one(name, column, /, **match):
            found = csv(name, **match)
            if len(found) != 1:
                raise CheckError(f"one({name!r}, {column!r}, {match}): {len(found)} rows match")
            return found[0][column]

        def first_step(name, level, /, column="mean", **match):
            return next((r["step"] for r in csv(name, **match)
                         if not isinstance(r[column], Missing) and r[column] >= level), MISSING)

        def mean(values):
            values = [v for v in values if not isinstance(v, Missing)]
            return sum(values) / len(values) if values else MISSING

        def json(name, /):
            with open(self.path(name)) as f:
                return json_module.load(f)

        def fmt(value, spec, missing="-"):
            return missing if isinstance(value, Missing) else format(value, spec)

        return {"csv": csv, "one": one, "first_step": first_step, "mean": mean, "json": json,
                "fmt": fmt, "MISSING": MISSING}


@dataclasses.dataclass
class Marker:
    line: int  # 1-based line of the comment's first line
    source: str | None
    key: str | None = None
    folder: str = ""  # `in:`, relative to the README's folder
    rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    where: str | None = None
    lets: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    template: list[str] | None = None
    text: bool = False  # a table without data


@dataclasses.dataclass
class Table:
    line: int  # 1-based line of the header
    header: list[str]
    rows: list[list[str]]
    marker: Marker | None
    end: int  # 0-based index of the line after the table


def split_row(line: str, template: bool = False) -> list[str]:
    """The cells of a Markdown table row (`\\|` is a bar inside a cell); of a
    template row with `template`, where a `|` inside a `{...}` expression
    belongs to it."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif depth and ch in "'\"":
            quote = ch
        elif template and (ch == "{" or depth and ch in "[("):
            depth += 1
        elif depth and ch in "}])":
            depth -= 1
        elif ch == "|" and not depth and not (i and line[i - 1] == "\\"):
            cells.append(line[start:i])
            start = i + 1
    cells.append(line[start:])
    return [c.strip() for c in cells]


MARKER_START = re.compile(r"^\s*<!--\s*table:(.*)$")


def parse_marker(lines: list[str], start: int) -> tuple[Marker, int]:
    """The marker whose comment opens at lines[start]; and the index past it."""
    body, i = [], start
    first = MARKER_START.match(lines[start]).group(1)
    while True:
        text = first if i == start else lines[i]
        if "-->" in text:
            body.append(text[:text.index("-->")])
            break
        body.append(text)
        i += 1
        if i == len(lines):
            raise CheckError(f"line {start + 1}: the table marker's comment is not closed")
    source = body[0].strip()
    marker = Marker(start + 1, source or None)
    if source == "text":
        return Marker(start + 1, None, text=True), i + 1
    for n, raw in enumerate(body[1:], start + 2):
        text = raw.strip()
        if not text:
            continue
        if text.startswith("|"):
            if marker.template is not None:
                raise CheckError(f"line {n}: a second template row")
            marker.template = split_row(text, template=True)
        elif text.startswith("key:"):
            marker.key = text[4:].strip()
        elif text.startswith("in:"):
            marker.folder = text[3:].strip()
        elif text.startswith("where:"):
            marker.where = text[6:].strip()
        elif text.startswith("row "):
            key, _, label = text[4:].partition(": ")
            marker.rows.append((key.strip(), label.strip() or key.strip()))
        elif text.startswith("let "):
            name, eq, expr = text[4:].partition("=")
            if not eq or not name.strip().isidentifier():
                raise CheckError(f"line {n}: `let NAME = EXPRESSION`, got {text!r}")
            marker.lets.append((name.strip(), expr.strip()))
        else:
            raise CheckError(f"line {n}: not a marker line (key:, in:, row, where:, let, "
                             f"| template |): {text!r}")
    if marker.template is None:
        raise CheckError(f"line {start + 1}: the table marker has no `| template |` row")
    if marker.source is None and not marker.rows:
        raise CheckError(f"line {start + 1}: a marker without a CSV needs `row` lines")
    return marker, i + 1


SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def read_tables(text: str) -> list[Table]:
    """The Markdown tables of a README (outside code blocks), each with the
    marker right above it, if any."""
    lines = text.split("\n")
    tables, marker, fenced, i = [], None, False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        if fenced:
            i += 1
            continue
        if MARKER_START.match(line):
            marker, i = parse_marker(lines, i)
            continue
        if (line.lstrip().startswith("|") and i + 1 < len(lines)
                and SEPARATOR.match(lines[i + 1])):
            end = i + 2
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            tables.append(Table(i + 1, split_row(line), [split_row(r) for r in lines[i + 2:end]],
                                marker, end))
            marker, i = None, end
            continue
        if line.strip() and marker is not None:
            raise CheckError(f"line {marker.line}: the table marker is not followed by a table")
        i += 1
    if marker is not None:
        raise CheckError(f"line {marker.line}: the table marker is not followed by a table")
    return tables


def evaluate(expr: str, scope: dict, where: str):
    try:
        return eval(expr, scope)  # noqa: S307 (the repository's own READMEs)
    except CheckError:
        raise
    except Exception as e:  # a template's error, named with where it is
        raise CheckError(f"{where}: {expr!r}: {type(e).__name__}: {e}") from e


def cell_text(template: str, scope: dict, where: str) -> str:
    if '"""' in template:
        raise CheckError(f"{where}: a template cell cannot hold three double quotes")
    return " ".join(evaluate('f"""' + template + '"""', scope, where).split())


def expected_rows(marker: Marker, study: Study) -> list[tuple[str, list[str]]]:
    """(the row's name, its cells) for every row the marker's source gives."""
    where = f"marker at line {marker.line}"
    helpers = study.helpers()
    if marker.source:
        rows = study.rows(marker.source)
        key = marker.key or (next(iter(rows[0])) if rows else None)
        if marker.rows:
            chosen = []
            for k, label in marker.rows:
                found = [r for r in rows if str(r.get(key)) == k]
                if len(found) != 1:
                    raise CheckError(f"{where}: `row {k}`: {len(found)} rows of "
                                     f"{marker.source} have {key} = {k}")
                chosen.append((found[0], k, label))
        else:
            chosen = [(r, str(r.get(key)), str(r.get(key))) for r in rows]
    else:
        chosen = [({}, k, label) for k, label in marker.rows]
    out = []
    for row, k, label in chosen:
        scope = {"__builtins__": SAFE_BUILTINS, **helpers, **row, "key": k, "label": label,
                 "row": row}
        if marker.where and not evaluate(marker.where, scope, f"{where}, where"):
            continue
        for name, expr in marker.lets:
            scope[name] = evaluate(expr, scope, f"{where}, let {name}")
        out.append((k, [cell_text(t, scope, f"{where}, row {k}, column {c + 1}")
                        for c, t in enumerate(marker.template)]))
    return out


NUMBER = re.compile(r"^([+-]?)([\d,]*\.?\d*)(%?)$")


def truncated(published: str, computed: str) -> bool:
    """Whether a published number is the computed one cut off instead of
    rounded: as many digits, one unit less in the last place."""
    p, c = NUMBER.match(published), NUMBER.match(computed)
    if not (p and c and p.group(2) and c.group(2)) or p.group(1, 3) != c.group(1, 3):
        return False
    decimals = [len(m.group(2).partition(".")[2]) for m in (p, c)]
    if decimals[0] != decimals[1]:
        return False
    a, b = (float(m.group(2).replace(",", "")) for m in (p, c))
    return abs(b - a - 10 ** -decimals[0]) < 10 ** -decimals[0] / 2


def compare(readme: str, table: Table, expected: list[tuple[str, list[str]]]) -> list[str]:
    """Every difference between a published table and the rows its CSV gives."""
    errors, source = [], table.marker.source or "its marker"
    width = len(table.header)
    if len(table.marker.template) != width:
        return [f"{readme}:{table.marker.line}: the template has {len(table.marker.template)} "
                f"cells, the table at line {table.line} {width} columns"]
    published = [[" ".join(c.split()) for c in row] for row in table.rows]
    if len(published) == len(expected):
        pairs = list(zip(range(len(published)), expected))
    else:  # a row missing or added: pair the rows by their first cell
        firsts = [row[0] for row in published]
        pairs = []
        for name, cells in expected:
            if cells[0] in firsts:
                pairs.append((firsts.index(cells[0]), (name, cells)))
            else:
                errors.append(f"{readme}:{table.line}: row {name} of {source} is missing "
                              f"from the table: | {' | '.join(cells)} |")
        shown = {cells[0] for _, cells in expected}
        errors += [f"{readme}:{table.line + 2 + i}: the table's row "
                   f"| {' | '.join(row)} | is not in {source}"
                   for i, row in enumerate(published) if row[0] not in shown]
    for index, (name, cells) in pairs:
        row = published[index]
        line = table.line + 2 + index
        if len(row) != width:
            errors.append(f"{readme}:{line}: row {name} has {len(row)} cells, the header {width}")
            continue
        for header, have, want in zip(table.header, row, cells):
            if have != want:
                why = " (truncated, not rounded)" if truncated(have, want) else ""
                errors.append(f"{readme}:{line}: row {name}, column '{header}': published "
                              f"'{have}', {source} gives '{want}'{why}")
    return errors


def readmes(dirs: list[str]) -> list[tuple[str, bool]]:
    """(README, whether each of its tables needs a marker): every README.md
    under the folders of `dirs` (but under an `in_progress/` folder) needs
    them; a file named in `dirs` is checked where marked."""
    out = []
    for d in dirs:
        if os.path.isfile(d):
            out.append((d, False))
        else:
            out += [(p, not in_progress(p)) for p in
                    sorted(glob.glob(os.path.join(d, "**", "README.md"), recursive=True))]
    return out


def in_progress(path: str) -> bool:
    return IN_PROGRESS in os.path.normpath(path).split(os.sep)[:-1]


def check_readme(path: str, update: bool = False, require_markers: bool = True
                 ) -> tuple[list[str], int]:
    """The errors of one README (an empty list if its tables hold; a table
    without a marker is one with `require_markers`), and how many of its
    tables were checked. With `update`, rewrites its marked tables from their
    CSVs instead."""
    shown = os.path.relpath(path)
    with open(path) as f:
        text = f.read()
    try:
        tables = read_tables(text)
    except CheckError as e:
        return [f"{shown}: {e}"], 0
    studies, errors, checked = {}, [], 0
    lines = text.split("\n")
    for table in reversed(tables):  # from the end: rewriting keeps earlier lines in place
        if table.marker is None:
            if require_markers:
                errors.append(f"{shown}:{table.line}: a table without a marker naming its CSV "
                              f"(<!-- table: FILE ... -->; <!-- table: text --> for one "
                              f"without data)")
            continue
        if table.marker.text:
            continue
        folder = os.path.normpath(os.path.join(os.path.dirname(path), table.marker.folder))
        study = studies.setdefault(folder, Study(folder))
        try:
            expected = expected_rows(table.marker, study)
        except CheckError as e:
            errors.append(f"{shown}:{table.marker.line}: {e}")
            continue
        checked += 1
        if update:
            lines[table.line + 1:table.end] = ["| " + " | ".join(cells) + " |"
                                               for _, cells in expected]
        else:
            errors += compare(shown, table, expected)
    if update:
        new = "\n".join(lines)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
    return sorted(errors, key=_line_order), checked


def _line_order(error: str):
    m = re.match(r"^(.*?):(\d+):", error)
    return (m.group(1), int(m.group(2))) if m else (error, 0)


def check(dirs: list[str] | None = None, update: bool = False) -> tuple[list[str], int]:
    """The errors of every README under `dirs` (default docs/results' index
    and every study under it) and the number of tables checked."""
    found = readmes(dirs) if dirs else [(INDEX, True)] + readmes(
        sorted(d for d in glob.glob(os.path.join(RESULTS, "*")) if os.path.isdir(d)))
    errors, checked = [], 0
    for path, require_markers in found:
        e, n = check_readme(path, update, require_markers)
        errors += e
        checked += n
    return errors, checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check the results READMEs' tables against their CSVs.",
        epilog="Markers and helpers: see the module docstring (python -m pydoc "
               "tools.check_results).")
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="study folders or README files (default: docs/results/*/)")
    parser.add_argument("--update", action="store_true",
                        help="rewrite the marked tables from their CSVs instead of checking")
    args = parser.parse_args(argv)
    errors, checked = check(args.dirs, args.update)
    for e in errors:
        print(e, file=sys.stderr)
    verb = "rewrote" if args.update else "checked"
    print(f"{verb} {checked} table{'s' if checked != 1 else ''}; "
          f"{len(errors)} error{'s' if len(errors) != 1 else ''}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
