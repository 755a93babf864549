"""Evaluation settings: one dataclass shared by `restora eval`, the grid's [eval] table and the Python API."""

from dataclasses import fields

import pytest

from restora.cli import _regroup, build_parser
from restora.core.settings import settings_from
from restora.experiments.grid import _scoring, load_grid_config
from restora.infer.settings import EvalSettings


def test_eval_cli_builds_the_scoring_group_with_one_flag_per_field():
    args = vars(build_parser().parse_args(
        ["eval", "m", "--split", "validation", "--limit", "5", "--max-new-tokens", "32", "--no-generate",
         "--speculate", "2"]))
    args.pop("_fn"), args.pop("command")
    got = _regroup(args)
    assert got["scoring"] == EvalSettings(split="validation", limit=5, max_new_tokens=32, generate=False, speculate=2)
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    for f in fields(EvalSettings):
        assert "--" + f.name.replace("_", "-") in help_text


def test_grid_eval_table_reads_the_same_fields_and_defaults():
    assert _scoring({}) == EvalSettings()  # the grid's defaults are `restora eval`'s
    got = _scoring({"limit": 200, "max_new_tokens": 96, "loss_limit": 500, "merge_dtypes": ["float32"]})
    assert got == EvalSettings(limit=200, max_new_tokens=96)  # the grid's own keys are not scoring settings
    for flat, message in (({"limit": "all"}, "evaluation setting 'limit' must be a whole number, got 'all'"),
                          ({"split": "dev"}, "must be one of 'train', 'validation', 'test', got 'dev'"),
                          ({"batch_size": 0}, "batch_size must be positive, got 0"),
                          ({"generate": 1}, "'generate' must be true or false")):
        with pytest.raises(ValueError, match=message):
            _scoring(flat, where="g.toml: ")
    with pytest.raises(ValueError, match="unknown setting 'limt': expected one of batch_size, compile"):
        settings_from(EvalSettings, {"limt": 3})


def test_a_bad_eval_value_fails_when_the_grid_config_loads(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('model = "m"\ntasks = ["sql"]\n[[methods]]\nname = "lora"\nformat = "float"\nbits = [16]\n'
                 'eval = { max_new_tokens = { gsm8k = 64 } }\n[eval]\nmax_new_tokens = 8\n')
    with pytest.raises(ValueError, match="has no value for task 'sql'"):
        load_grid_config(p)
    p.write_text(p.read_text().replace("{ gsm8k = 64 }", "{ sql = -1 }"))
    with pytest.raises(ValueError, match="g.toml: sql-lora-16b-s0: max_new_tokens must be positive, got -1"):
        load_grid_config(p)
