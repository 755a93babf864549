"""Data side: task loading, bad input, splits, metrics (GSM8K, SQL exact/execution), CIs, label masking."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from restora.data import (
    IGNORE_INDEX, calibration_rows, encode_example, encode_rows, extract_last_number, get_task,
    gsm8k_correct, mean_interval, normalize_sql, proportion, split_rows, sql_exact_match,
    sql_execution_match, summarize, task_split, wilson_interval,
)
from restora.data.sql import QueryError, build_database, gold_literals, parse_schema, run_query

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is missing")


@pytest.fixture
def data_env(monkeypatch):
    monkeypatch.setenv("RESTORA_DATA_DIR", str(SHARED_DATA))
    return SHARED_DATA


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, n: int) -> Path:
    return _write(path, [json.dumps({"prompt": f"q{i} ->", "completion": f" a{i}"}) for i in range(n)])


# --- loading and bad input -------------------------------------------------------------------


def test_load_local_rows(data_env):
    gsm = get_task("gsm8k")
    train, test = gsm.load("train"), gsm.load("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert all("#### " in r["answer"] for r in train[:50])
    sql = get_task("sql").load("train")
    assert len(sql) == 3500 and set(sql[0]) >= {"question", "context", "answer"}
    # an explicit data_dir wins over the environment
    assert len(get_task("sql").load("train", data_dir=SHARED_DATA)) == 3500


def test_prompts_and_completions(data_env):
    sql, gsm = get_task("sql"), get_task("gsm8k")
    row = sql.load("train")[0]
    assert sql.prompt(row) == f"Schema: {row['context']}\nQuestion: {row['question']}\nSQL:"
    assert sql.completion(row) == " " + row["answer"]
    g = gsm.load("test")[0]
    assert gsm.prompt(g).startswith("Question: ") and gsm.prompt(g).endswith("\nAnswer:")
    assert gsm.completion(g) == " " + g["answer"] and gsm.text(g) == gsm.prompt(g) + gsm.completion(g)
    with pytest.raises(ValueError, match="chat template"):
        sql.prompt(row, tokenizer=None, use_chat_template=True)


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'spider'; known tasks: gsm8k, sql, or PATH\.jsonl"):
        get_task("spider")


def test_hub_fallback_without_datasets_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("RESTORA_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RuntimeError, match=r"openai/gsm8k.*set RESTORA_DATA_DIR or pass --data-dir"):
        get_task("gsm8k").load("train")


def test_bad_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RESTORA_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"\$RESTORA_DATA_DIR=.*nope' is not a directory"):
        get_task("sql").load("train")
    with pytest.raises(FileNotFoundError, match=r"sql_create_context/train\.jsonl: no such file"):
        get_task("sql").load("train", data_dir=tmp_path)


def test_jsonl_bad_rows_name_file_line_and_field(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c"})
    missing = _write(tmp_path / "missing.jsonl", [good, "", json.dumps({"prompt": "p"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: missing field 'completion'"):
        get_task(str(missing)).load("train")
    broken = _write(tmp_path / "broken.jsonl", [good, good, '{"prompt": "p", '])
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed JSON"):
        get_task(str(broken)).load("train")
    listed = _write(tmp_path / "listed.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"listed\.jsonl:1: expected a JSON object, got list"):
        get_task(str(listed)).load("train")
    typed = _write(tmp_path / "typed.jsonl", [json.dumps({"prompt": "p", "completion": 3})])
    with pytest.raises(ValueError, match=r"typed\.jsonl:1: field 'completion' must be a string, got int"):
        get_task(str(typed)).load("train")


def test_empty_dataset_errors(tmp_path, data_env):
    with pytest.raises(ValueError, match=r"split 'train' is empty after filtering \(limit=0\)"):
        task_split("sql", "train", limit=0)
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        task_split(str(empty), "validation")


# --- splits ----------------------------------------------------------------------------------


def _keys(rows):
    return [json.dumps(r, sort_keys=True) for r in rows]


def test_sql_splits_deterministic_disjoint_and_test_seed_independent(data_env):
    a, b, c = split_rows("sql", seed=0), split_rows("sql", seed=0), split_rows("sql", seed=1)
    assert _keys(a.train) == _keys(b.train) and _keys(a.validation) == _keys(b.validation)
    tr, va, te = set(_keys(a.train)), set(_keys(a.validation)), set(_keys(a.test))
    assert not (tr & va or tr & te or va & te)
    assert len(tr) + len(va) + len(te) == 3500
    assert 280 <= len(te) <= 420 and len(va) == round(0.1 * (3500 - len(te)))
    assert _keys(c.test) == _keys(a.test)  # the seed never moves test rows
    assert _keys(c.validation) != _keys(a.validation)
    assert set(_keys(c.train)) | set(_keys(c.validation)) == tr | va


def test_gsm8k_splits_use_test_file(data_env):
    s = split_rows("gsm8k", seed=3)
    assert _keys(s.test) == _keys(get_task("gsm8k").load("test"))
    assert len(s.train) + len(s.validation) == 7473 and len(s.validation) == 747
    assert not set(_keys(s.train)) & set(_keys(s.validation))


def test_calibration_draws_from_train_only(data_env, tmp_path):
    for task in ("sql", "gsm8k", str(_jsonl(tmp_path / "t.jsonl", 200))):
        s = split_rows(task, seed=5)
        calib = calibration_rows(task, 128, seed=5)
        assert len(calib) == 128 and _keys(calib) == _keys(calibration_rows(task, 128, seed=5))
        assert set(_keys(calib)) <= set(_keys(s.train))
        assert not set(_keys(calib)) & (set(_keys(s.test)) | set(_keys(s.validation)))
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        calibration_rows("sql", 0)


# --- GSM8K -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, correct",
    [
        ("She sells 48/2 = 24 in May, so 48+24 = 72.\n#### 72", "... #### 72", True),
        ("The total is $1,000.0", "#### 1000", True),
        ("It costs 1000 dollars.", "#### 1,000", True),
        ("2 + 3 = 5, not 6", "#### 5", False),  # the LAST number counts
        ("the answer is -3", "#### -3", True),
        ("10-3 = 7", "#### 7", True),
        ("so it's 0.5", "#### .5", True),
        ("no number here", "#### 4", False),
        ("#### 18.", "#### 18", True),
    ],
)
def test_gsm8k_scoring(prediction, reference, correct):
    assert gsm8k_correct(prediction, reference) is correct


def test_gsm8k_reference_errors_and_last_number():
    with pytest.raises(ValueError, match="no number after '#### '"):
        gsm8k_correct("5", "the answer is five")
    assert extract_last_number("a 1,234,567 b") == 1234567
    assert get_task("gsm8k").score("... 72", {"answer": "#### 72"}) == {"accuracy": 1.0}


# --- SQL exact match -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, equal",
    [
        ("select count(*) from head where age > 56", "SELECT COUNT(*) FROM head WHERE age > 56", True),
        ("SELECT  name\n FROM t WHERE x = 'a';", "SELECT name FROM t WHERE x = \"a\"", True),
        ("SELECT COUNT( * ) FROM t", "SELECT COUNT(*) FROM t", True),
        ("SELECT a,b FROM t", "SELECT a , b FROM t", True),
        ("SELECT name FROM t WHERE x = 'A'", "SELECT name FROM t WHERE x = 'a'", False),  # literal case kept
        ("SELECT name FROM t WHERE x = 'it''s'", 'SELECT name FROM t WHERE x = "it\'s"', True),
        ("SELECT age FROM head", "SELECT name FROM head", False),
        ("SELECT a FROM t WHERE b > 5", "SELECT a FROM t WHERE b >= 5", False),
    ],
)
def test_sql_exact_match(prediction, gold, equal):
    assert sql_exact_match(prediction, gold) is equal


def test_normalize_sql_form():
    assert normalize_sql('select T1.name from t as T1 where x = "a"') == "SELECT T1 . name FROM t AS T1 WHERE x = 'a'"


# --- SQL execution match ---------------------------------------------------------------------


def _row(data_env, answer: str) -> dict:
    return next(r for r in get_task("sql").load("train") if r["answer"] == answer)


def test_execution_match_on_real_rows(data_env):
    r = _row(data_env, "SELECT COUNT(*) FROM head WHERE age > 56")
    ctx, gold = r["context"], r["answer"]
    assert sql_execution_match(gold, gold, ctx) is True
    assert sql_execution_match("select count(*)\nfrom HEAD where 56 < age;", gold, ctx) is True
    assert sql_execution_match("SELECT COUNT(*) FROM head WHERE age >= 56", gold, ctx) is False
    assert sql_execution_match("SELECT COUNT(*) FROM head WHERE age > 57", gold, ctx) is False
    assert sql_execution_match("SELECT COUNT(*) FROM head", gold, ctx) is False
    assert sql_execution_match("SELECT COUNT(*) FROM head WHERE agee > 56", gold, ctx) is False  # error
    assert sql_execution_match("SELEC nonsense", gold, ctx) is False

    j = _row(data_env, "SELECT DISTINCT T1.age FROM management AS T2 JOIN head AS T1 "
                       "ON T1.head_id = T2.head_id WHERE T2.temporary_acting = 'Yes'")
    rewrite = 'select distinct h.age from head h join management m on m.head_id = h.head_id where m.temporary_acting = "Yes"'
    assert sql_execution_match(j["answer"], j["answer"], j["context"]) is True
    assert sql_execution_match(rewrite, j["answer"], j["context"]) is True
    assert sql_execution_match(rewrite.replace('"Yes"', '"No"'), j["answer"], j["context"]) is False
    assert sql_execution_match(rewrite.replace("h.age", "h.head_id"), j["answer"], j["context"]) is False
    assert sql_execution_match(rewrite.replace("distinct ", ""), j["answer"], j["context"]) is False

    o = _row(data_env, "SELECT name, born_state, age FROM head ORDER BY age")
    assert sql_execution_match("SELECT name, born_state, age FROM head ORDER BY age", o["answer"], o["context"])
    assert not sql_execution_match("SELECT name, born_state, age FROM head ORDER BY age DESC", o["answer"], o["context"])


def test_execution_match_string_literals_matter(data_env):
    rows = [r for r in get_task("sql").load("train") if '= "' in r["answer"] and "JOIN" not in r["answer"]]
    changed = scored = 0
    for r in rows[:40]:
        literal = gold_literals(r["answer"]).strings[0]
        wrong = r["answer"].replace(f'"{literal}"', '"zzz_not_there"')
        result = sql_execution_match(wrong, r["answer"], r["context"])
        if result is not None:
            scored += 1
            changed += result is False
    assert scored >= 30 and changed >= 0.95 * scored


def test_gold_that_fails_is_unscorable_and_context_merging():
    assert sql_execution_match("SELECT a FROM t", "SELECT missing FROM t", "CREATE TABLE t (a VARCHAR)") is None
    tables = parse_schema("CREATE TABLE Person (name VARCHAR); CREATE TABLE person (age INTEGER, name VARCHAR)")
    assert len(tables) == 1 and [c for c, _ in tables[0].columns] == ["name", "age"]
    with pytest.raises(ValueError, match="no CREATE TABLE"):
        parse_schema("nothing here")


def test_databases_are_typed_deterministic_and_read_only(tmp_path, monkeypatch):
    tables = parse_schema("CREATE TABLE t (n INTEGER, s VARCHAR)")
    literals = gold_literals("SELECT n FROM t WHERE s = 'x' AND n > 5")
    assert literals.by_column == {"s": ("x",), "n": (4, 5, 6)}
    assert gold_literals("SELECT a FROM t WHERE b IN ('p', 'q') OR c BETWEEN 1 AND 2").by_column == {
        "b": ("p", "q"), "c": (0, 1, 2, 1, 2, 3)}
    rows_a = run_query(build_database(tables, literals, 20, "s"), "SELECT n, s FROM t")
    rows_b = run_query(build_database(tables, literals, 20, "s"), "SELECT n, s FROM t")
    assert rows_a == rows_b and len(rows_a) == 20
    assert all(n is None or isinstance(n, int) for n, _ in rows_a)
    assert all(s is None or isinstance(s, str) for _, s in rows_a)
    assert any(s == "x" for _, s in rows_a) and any(n == 5 for n, _ in rows_a)
    monkeypatch.chdir(tmp_path)
    ctx, gold = "CREATE TABLE t (n INTEGER)", "SELECT n FROM t"
    for attack in ("ATTACH DATABASE 'evil.db' AS e", "DROP TABLE t", "INSERT INTO t VALUES (1)",
                   "PRAGMA table_info(t)", "SELECT 1; DROP TABLE t"):
        assert sql_execution_match(attack, gold, ctx) is False
    assert list(tmp_path.iterdir()) == []


def test_runaway_query_is_cut_off():
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    conn = build_database(parse_schema("CREATE TABLE t (n INTEGER)"), gold_literals("SELECT 1"), 4, "s")
    start = time.perf_counter()
    with pytest.raises(QueryError, match="exceeded the 50 ms time cap"):
        run_query(conn, runaway, timeout_ms=50)
    assert time.perf_counter() - start < 2.0
    start = time.perf_counter()
    assert sql_execution_match(runaway, "SELECT COUNT(*) FROM t", "CREATE TABLE t (n INTEGER)", timeout_ms=50) is False
    assert time.perf_counter() - start < 2.0


def test_sql_task_scores_both_metrics(data_env):
    r = get_task("sql").load("train")[0]
    assert get_task("sql").score(" " + r["answer"].lower(), r) == {"exact_match": 1.0, "execution_match": 1.0}


# --- intervals -------------------------------------------------------------------------------


def test_wilson_and_mean_intervals():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    est = proportion([True] * 81 + [False] * 19)
    assert est.value == 0.81 and est.low < 0.81 < est.high and est.n == 100
    m = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert m.value == 2.5 and m.high - m.value == pytest.approx(1.959964 * (1.6666667 / 4) ** 0.5, rel=1e-5)
    s = summarize([{"em": 1.0, "ex": None}, {"em": 0.0, "ex": 1.0}])
    assert s["em"].n == 2 and s["ex"].n == 1 and s["ex"].value == 1.0
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)


# --- label masking ---------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Question : What is 2 + 3 ? Answer 5 #### the sum of and".split()
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def test_encode_example_masks_prompt_and_appends_eos():
    tok = _tiny_tokenizer()
    prompt, completion = "Question : What is 2 + 3 ? Answer :", " the sum of 2 and 3 #### 5"
    p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
    ex = encode_example(tok, prompt, completion, max_len=64)
    assert ex["input_ids"] == p + c + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]
    # too long: the prompt loses tokens on the left, the completion stays whole
    short = encode_example(tok, prompt, completion, max_len=len(c) + 4)
    assert short["input_ids"] == p[-3:] + c + [tok.eos_token_id]
    assert short["labels"][:3] == [IGNORE_INDEX] * 3 and short["labels"][3:] == c + [tok.eos_token_id]
    # completion alone too long: one prompt token kept, completion cut on the right (no EOS)
    tiny = encode_example(tok, prompt, completion, max_len=4)
    assert tiny["input_ids"] == p[-1:] + c[:3] and tiny["labels"] == [IGNORE_INDEX] + c[:3]
    with pytest.raises(ValueError, match="max_len must be at least 2"):
        encode_example(tok, prompt, completion, max_len=1)


@pytest.mark.smollm
def test_encode_rows_with_smollm2_tokenizer(data_env):
    from transformers import AutoTokenizer

    from restora.models.load import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    task = get_task("sql")
    rows = task_split(task, "train", limit=8)
    for use_chat in (False, True):
        for row, ex in zip(rows, encode_rows(task, tok, rows, max_len=512, use_chat_template=use_chat)):
            n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
            assert n_prompt > 0 and all(label == IGNORE_INDEX for label in ex["labels"][:n_prompt])
            assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
            assert ex["input_ids"][-1] == tok.eos_token_id
            completion = tok.decode(ex["input_ids"][n_prompt:-1])
            assert completion == task.completion(row, use_chat)
            assert tok.decode(ex["input_ids"][:n_prompt]) == task.prompt(row, tok, use_chat)
            if use_chat:
                assert "<|im_start|>assistant" in tok.decode(ex["input_ids"][:n_prompt])
