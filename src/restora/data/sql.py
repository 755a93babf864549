"""SQL Create Context metrics: exact match after normalisation, and execution match.

Exact match compares token sequences after normalising whitespace (token-wise), keyword case
(upper), string-literal quote style ("x" and 'x' become 'x') and a trailing semicolon.
Identifiers keep their case.

Execution match follows the fuzzing idea of test-suite accuracy (Zhong, Yu & Klein 2020,
"Semantic Evaluation for Text-to-SQL with Distilled Test Suites"): build small random
databases from the row's CREATE TABLE context, run the gold and the predicted query on each,
and call them equal only if the results agree on every database.

  * databases live only in memory (sqlite3.connect(":memory:")); after they are filled an
    authorizer allows nothing but reads, so a predicted ATTACH / INSERT / PRAGMA fails
  * cell values are deterministic from a seed and typed by the declared column type
    (INT/REAL/NUM-like -> numbers, otherwise short text); a shared small value pool makes
    join keys meet; the gold query's literals (numbers with neighbours v-1, v, v+1) are
    mixed in, preferably into the column they are compared with, and each such literal is
    planted at least once, so WHERE clauses select rows and off-by-one conditions differ
  * columns are not unique (there are no key constraints in the contexts), so a gold query
    selecting bare columns under GROUP BY (SQLite picks an arbitrary row) can disagree with
    an equivalent rewrite; gold against itself always agrees
  * results are compared as multisets of rows (column order matters); if the gold query
    has a top-level ORDER BY, as ordered lists. Numbers are compared after rounding to 6
    decimals, so 2 == 2.0. Ties under ORDER BY may order differently between equivalent
    queries; on these tiny databases we accept that rare false mismatch.
  * each query runs under a wall-clock cap enforced by a progress handler
  * the prediction erroring (syntax, unknown column, timeout) is a mismatch; the gold
    erroring (about 8% of contexts lack a column the answer uses) makes the row
    unscorable: sql_execution_match returns None
  * tables named twice in one context with different case (Spider artefact) are merged
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "sql_tokens", "normalize_sql", "sql_exact_match", "parse_schema", "build_database",
    "run_query", "QueryError", "sql_execution_match", "gold_literals", "Literals",
]

_TOKEN = re.compile(
    r"""'(?:[^']|'')*'            # single-quoted string
      | "(?:[^"]|"")*"            # double-quoted string (a string in this data set)
      | `[^`]*` | \[[^\]]*\]      # quoted identifiers
      | \d+\.?\d*(?:[eE][+-]?\d+)? | \.\d+
      | [A-Za-z_][A-Za-z0-9_$]*
      | <> | != | >= | <= | == | \|\|
      | \S""",
    re.VERBOSE,
)

_NUMBER = re.compile(r"\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+")

KEYWORDS = frozenset(
    """select from where and or not in is null like glob between exists distinct all as on join
    inner left right full outer cross natural using group by having order asc desc limit offset
    union intersect except case when then else end count sum avg min max cast collate escape
    with recursive values""".split()
)


def sql_tokens(sql: str) -> list[str]:
    """Tokens of a SQL string (strings, identifiers, numbers, operators); whitespace dropped."""
    return _TOKEN.findall(sql)


def _is_string(token: str) -> bool:
    return len(token) >= 2 and token[0] == token[-1] and token[0] in "'\""


def _string_value(token: str) -> str:
    quote = token[0]
    return token[1:-1].replace(quote * 2, quote)


def normalize_sql(sql: str) -> str:
    """Canonical text: tokens joined by one space, keywords upper-case, strings single-quoted."""
    out = []
    for token in sql_tokens(sql.strip().rstrip(";")):
        if _is_string(token):
            out.append("'" + _string_value(token).replace("'", "''") + "'")
        elif token.lower() in KEYWORDS:
            out.append(token.upper())
        else:
            out.append(token)
    return " ".join(out)


def sql_exact_match(prediction: str, gold: str) -> bool:
    """Exact match of normalize_sql(prediction) and normalize_sql(gold)."""
    return normalize_sql(prediction) == normalize_sql(gold)


# --- schema and databases -------------------------------------------------------------------

_CREATE = re.compile(r"CREATE\s+TABLE\s+([`\"\[]?\w+[`\"\]]?)\s*\(([^)]*)\)", re.IGNORECASE)
_NUMERIC_TYPE = re.compile(r"INT|REAL|NUM|FLOA|DOUB|DEC", re.IGNORECASE)
_TEXT_POOL = ("1", "2", "3", "a", "b")  # shared by all text columns so join keys meet
_INT_POOL = tuple(range(0, 6))


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, declared type)


def parse_schema(context: str) -> list[Table]:
    """Tables of a CREATE TABLE context; same-named tables (any case) are merged."""
    tables: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {}
    for match in _CREATE.finditer(context):
        name = match.group(1).strip('`"[]')
        _, columns = tables.setdefault(name.lower(), (name, {}))
        for part in match.group(2).split(","):
            words = part.split()
            if words:
                col, ctype = words[0].strip('`"[]'), " ".join(words[1:]) or "TEXT"
                columns.setdefault(col.lower(), (col, ctype))
    if not tables:
        raise ValueError(f"SQL context has no CREATE TABLE statement: {context[:80]!r}")
    return [Table(name, tuple(cols.values())) for name, cols in tables.values()]


@dataclass(frozen=True)
class Literals:
    """Literals of a gold query: all of them, and those compared with a named column."""

    strings: tuple[str, ...]
    numbers: tuple[int | float, ...]  # each literal v with its neighbours v-1, v+1
    by_column: dict[str, tuple[Any, ...]]  # lower-case column name -> its literals (and neighbours)


_SKIP_BACK = {"=", "==", "<>", "!=", ">", "<", ">=", "<=", "like", "glob", "not", "in", "(", ",", "between", "and"}


def gold_literals(gold: str) -> Literals:
    """Literals of the gold query, bound to the column they are compared with when there is one.

    `col = 'x'`, `col > 5`, `col IN ('a', 'b')`, `col BETWEEN 1 AND 3` bind to `col`; the
    binding walks back over operators and other literals to the nearest identifier.
    """
    tokens = sql_tokens(gold)
    strings: list[str] = []
    numbers: list[int | float] = []
    by_column: dict[str, list[Any]] = {}
    for i, token in enumerate(tokens):
        if _is_string(token):
            values: list[Any] = [_string_value(token)]
            strings.extend(values)
        elif _NUMBER.fullmatch(token):
            value = float(token) if any(c in token for c in ".eE") else int(token)
            values = [value - 1, value, value + 1]
            numbers.extend(values)
        else:
            continue
        for back in tokens[max(0, i - 8):i][::-1]:
            low = back.lower()
            if low in _SKIP_BACK or _is_string(back) or _NUMBER.fullmatch(back):
                continue
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*|`[^`]*`|\[[^\]]*\]", back) and low not in KEYWORDS:
                by_column.setdefault(back.strip("`[]").lower(), []).extend(values)
            break
    return Literals(tuple(strings), tuple(numbers), {k: tuple(v) for k, v in by_column.items()})


def _cell(rng: random.Random, col: str, ctype: str, literals: Literals) -> Any:
    numeric = bool(_NUMERIC_TYPE.search(ctype))
    bound = literals.by_column.get(col.lower(), ())
    anywhere = literals.numbers if numeric else (*literals.strings, *map(str, literals.numbers))
    if rng.random() < 0.08:
        return None
    if bound and rng.random() < 0.6:
        return rng.choice(bound)
    if anywhere and rng.random() < 0.25:
        return rng.choice(anywhere)
    return rng.choice(_INT_POOL if numeric else _TEXT_POOL)


def build_database(tables: Sequence[Table], literals: Literals, rows: int, seed: str) -> sqlite3.Connection:
    """An in-memory database with `rows` deterministic rows per table, then made read-only.

    A cell is NULL (8%), else one of its column's bound literals (60% when it has some), else
    any gold literal of its type (25% when there are some), else a value of the shared pool.
    Each bound literal is then planted in at least one random row (if rows allow).
    """
    rng = random.Random(seed)  # str seeds hash with sha512: stable across runs and platforms
    conn = sqlite3.connect(":memory:")
    for table in tables:
        cols = ", ".join(f'"{c}" {t}' for c, t in table.columns)
        conn.execute(f'CREATE TABLE "{table.name}" ({cols})')
        marks = ", ".join("?" for _ in table.columns)
        cells = [[_cell(rng, col, ctype, literals) for col, ctype in table.columns] for _ in range(rows)]
        for j, (col, _) in enumerate(table.columns):  # plant every bound literal at least once
            bound = literals.by_column.get(col.lower(), ())
            for i, value in zip(rng.sample(range(rows), min(rows, len(bound))), bound):
                cells[i][j] = value
        conn.executemany(f'INSERT INTO "{table.name}" VALUES ({marks})', cells)
    conn.commit()
    conn.set_authorizer(_read_only)
    return conn


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_only(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


# --- running and comparing ------------------------------------------------------------------


class QueryError(RuntimeError):
    """A query failed: SQL error, denied action, time cap or row cap."""


def run_query(conn: sqlite3.Connection, sql: str, timeout_ms: float = 200.0, max_rows: int = 100_000) -> list[tuple]:
    """All result rows of one statement, aborted after `timeout_ms` of wall time."""
    deadline = time.perf_counter() + timeout_ms / 1000.0
    conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 1000)  # every 1000 VM steps
    try:
        cursor = conn.execute(sql.strip().rstrip(";"))
        result = cursor.fetchmany(max_rows + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
        if time.perf_counter() > deadline:
            raise QueryError(f"query exceeded the {timeout_ms:g} ms time cap") from None
        raise QueryError(str(e)) from None
    finally:
        conn.set_progress_handler(None, 0)
    if len(result) > max_rows:
        raise QueryError(f"query returned more than {max_rows} rows")
    return result


def _canon(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(float(value), 6)
    return value


def _has_top_level_order_by(sql: str) -> bool:
    depth, prev = 0, ""
    for token in sql_tokens(sql):
        low = token.lower()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0 and prev == "order" and low == "by":
            return True
        prev = low
    return False


def _same(gold_rows: list[tuple], pred_rows: list[tuple], ordered: bool) -> bool:
    gold_c = [tuple(map(_canon, r)) for r in gold_rows]
    pred_c = [tuple(map(_canon, r)) for r in pred_rows]
    return gold_c == pred_c if ordered else Counter(gold_c) == Counter(pred_c)


def sql_execution_match(
    prediction: str,
    gold: str,
    context: str,
    databases: int = 3,
    rows: int = 16,
    seed: int = 0,
    timeout_ms: float = 200.0,
) -> bool | None:
    """Whether prediction and gold give the same results on `databases` generated databases.

    Returns None when the gold query itself fails (the row cannot be scored by execution).
    """
    tables = parse_schema(context)
    literals = gold_literals(gold)
    ordered = _has_top_level_order_by(gold)
    for db in range(databases):
        conn = build_database(tables, literals, rows, seed=f"{seed}:{db}")
        try:
            try:
                gold_rows = run_query(conn, gold, timeout_ms)
            except QueryError:
                return None
            try:
                pred_rows = run_query(conn, prediction, timeout_ms)
            except QueryError:
                return False
            if not _same(gold_rows, pred_rows, ordered):
                return False
        finally:
            conn.close()
    return True
