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


def test_the_grids_own_eval_keys_are_a_checked_dataclass():
    from restora.experiments.grid import GridEvalSettings, _grid_eval

    assert _grid_eval({"limit": 200}) == GridEvalSettings()  # scoring keys are not the grid's
    got = _grid_eval({"loss_limit": 500, "restore_modes": ["plain", "trained", "auto"], "mode_bits": [16],
                      "merge_dtypes": ("float32", "bfloat16"), "merge_limit": 100, "auto_min_gain": 0})
    assert got == GridEvalSettings(loss_limit=500, restore_modes=("plain", "trained", "auto"), mode_bits=(16,),
                                   merge_dtypes=("float32", "bfloat16"), merge_limit=100, auto_min_gain=0.0)
    for flat, message in (({"restore_modes": "plain"}, "'restore_modes' must be a list, got 'plain'"),
                          ({"restore_modes": ["plain", "mean-mach"]}, "restore_modes: 'mean-mach' is unknown"),
                          ({"mode_bits": [16, "8"]}, r"'mode_bits\[1\]' must be a whole number, got '8'"),
                          ({"mode_bits": [5]}, "mode_bits must be restore levels"),
                          ({"merge_dtypes": ["fp16"]}, "merge_dtypes: 'fp16' is unknown: expected some of float32"),
                          ({"loss_limit": -1}, "loss_limit must be 0 \\(all rows\\) or more"),
                          ({"restore_format": "q4"}, "restore_format must be one of"),
                          ({"restore_modes": ["partial"]}, "restore_modes: 'partial' is unknown"),
                          ({"auto_min_gain": 1.5}, r"auto_min_gain must be in \[0, 1\)"),
                          ({"auto_min_gain": "0.01"}, "'auto_min_gain' must be a number")):
        with pytest.raises(ValueError, match=message):
            _grid_eval(flat, where="g.toml: ")


def test_a_bad_grid_eval_key_fails_when_the_config_loads(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('model = "m"\ntasks = ["sql"]\n[[methods]]\nname = "gptq"\nformat = "gptq"\nbits = [4]\n'
                 'eval = { merge_dtypes = ["float32", "half"] }\n')
    with pytest.raises(ValueError, match="g.toml: sql-gptq-4b-s0: merge_dtypes: 'half' is unknown"):
        load_grid_config(p)


def test_list_settings_keep_their_declared_kind():
    from dataclasses import dataclass

    from restora.core.settings import checked_value

    assert checked_value("k", (1, 2), list[int]) == [1, 2]
    assert checked_value("k", [1, 2], tuple[int, ...]) == (1, 2)
    assert checked_value("k", None, tuple[int, ...] | None) is None
    assert checked_value("k", [1, "a"], tuple[int, str]) == [1, "a"]  # fixed shapes: the dataclass decides

    @dataclass
    class S:
        xs: list[float]

    with pytest.raises(ValueError, match=r"setting 'xs\[1\]' must be a number, got 'b'"):
        settings_from(S, {"xs": [1, "b"]})
