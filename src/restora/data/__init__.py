"""Tasks, splits and metrics for fine-tuning and evaluation (GSM8K, SQL Create Context, jsonl)."""

from restora.data.encode import IGNORE_INDEX, encode_example, encode_rows
from restora.data.metrics import (
    Estimate, extract_last_number, gsm8k_correct, gsm8k_reference, mean_interval, proportion, summarize,
    text_exact_match, wilson_interval,
)
from restora.data.sources import DATA_DIR_ENV, read_jsonl, resolve_data_dir
from restora.data.splits import SPLITS, Splits, calibration_rows, split_rows, task_split
from restora.data.sql import normalize_sql, sql_exact_match, sql_execution_match
from restora.data.tasks import TASKS, Task, get_task, jsonl_task

__all__ = [
    "Task", "TASKS", "get_task", "jsonl_task",
    "DATA_DIR_ENV", "read_jsonl", "resolve_data_dir",
    "Splits", "SPLITS", "split_rows", "task_split", "calibration_rows",
    "IGNORE_INDEX", "encode_example", "encode_rows",
    "Estimate", "extract_last_number", "gsm8k_reference", "gsm8k_correct", "text_exact_match",
    "wilson_interval", "mean_interval", "proportion", "summarize",
    "normalize_sql", "sql_exact_match", "sql_execution_match",
]
