"""Training settings: one dataclass per group, shared by the CLI, the grid's [train] table and the Python API."""

from dataclasses import fields

import pytest

from restora.cli import _regroup, build_parser
from restora.train.config import (
    SETTING_GROUPS,
    BaseSettings,
    DataSettings,
    LoRASettings,
    TrainConfig,
    group_settings,
)


def test_cli_has_one_flag_per_field_and_builds_the_groups():
    args = vars(build_parser().parse_args(
        ["train", "m", "--out", "o", "--format", "gptq", "--bits", "3", "--rank", "8", "--targets", "attn",
         "--max-len", "256", "--lr", "1e-3", "--micro-batch-size", "auto", "--no-bf16", "--compile", "off"]))
    args.pop("_fn"), args.pop("command")
    got = _regroup(args)
    assert got["base"] == BaseSettings("gptq", 3)
    assert got["lora"] == LoRASettings(rank=8, targets="attn")
    assert got["data"] == DataSettings(max_len=256)
    assert got["optim"] == TrainConfig(lr=1e-3, micro_batch_size="auto", bf16=False, compile="off")
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for cls in SETTING_GROUPS.values():
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in help_text


def test_flat_settings_go_to_their_group_and_unknown_keys_are_named():
    groups = group_settings({"bits": 3, "rank": 4, "chat": True, "epochs": 2, "seed": 7})
    assert groups["base"].bits == 3 and groups["lora"].rank == 4 and groups["data"].chat
    assert groups["optim"].epochs == 2 and groups["optim"].seed == 7
    with pytest.raises(ValueError, match="g.toml: unknown training setting 'epochz'"):
        group_settings({"epochz": 2}, where="g.toml: ")
    assert group_settings({"alpha": 16})["lora"].alpha == 16.0  # a whole number where a float goes is that float
    for key, value, kind in (("rank", 16.0, "a whole number"), ("chat", 1, "true or false"),
                             ("micro_batch_size", "many", "a whole number or one of 'auto'"), ("targets", 3, "a string"),
                             ("schedule", "linear", "one of 'constant', 'cosine'"), ("format", True, "one of 'float', 'nf4'.*"),
                             ("memory_budget", 4, "a string or unset")):
        with pytest.raises(ValueError, match=f"g.toml: training setting '{key}' must be {kind}, got"):
            group_settings({key: value}, where="g.toml: ")
    assert group_settings({"micro_batch_size": "auto", "group_size": -1})["optim"].micro_batch_size == "auto"
    assert group_settings({"memory_budget": None, "compile": "off"})["optim"].compile == "off"
    names = [f.name for cls in SETTING_GROUPS.values() for f in fields(cls)]
    assert len(names) == len(set(names))  # one flat namespace: a field name belongs to one group


@pytest.mark.parametrize(("make", "match"), [
    (lambda: LoRASettings(rank=0), "rank must be positive"),
    (lambda: LoRASettings(dropout=1.0), "dropout must be in"),
    (lambda: BaseSettings(group_size=0), "group_size must be positive, or -1"),
    (lambda: TrainConfig(micro_batch_size=True), "micro_batch_size must be a positive number or auto"),
    (lambda: DataSettings(max_len=0), "max_len must be positive"),
    (lambda: TrainConfig(batch_size=8, micro_batch_size=3), "micro_batch_size 3 does not divide batch_size 8"),
    (lambda: TrainConfig(micro_batch_size="many"), "micro_batch_size must be a positive number or auto"),
    (lambda: TrainConfig(compile="yes"), "compile must be auto, on or off"),
])
def test_bad_values_are_refused_in_one_line(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_resume_key_leaves_out_speed_and_memory_settings():
    key = TrainConfig(micro_batch_size=4, memory_budget="2GiB", compile="on", save_every=3).resume_key()
    assert {"memory_budget", "compile", "save_every", "eager_attention"}.isdisjoint(key)
    assert key["micro_batch_size"] == 4 and key["lr"] == TrainConfig().lr
