"""Memory planner (restora.plan.memory): storage formulas against real QuantizedWeights, activation
counts against autograd's saved tensors, plan choice, budget parsing and error text."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from restora.adapters import LoRAConfig, add_lora
from restora.train.optim8bit import AdamW8bit
from restora.plan.memory import (
    ModelShape,
    _layer_activation_bytes,
    _optimizer_bytes,
    linear_bytes,
    parse_budget,
    plan_memory,
)
from restora.plan.choice import choose_plan, serve_candidates
from restora.commands.planning import plan
from restora.quant.linear import quantize_weight
from restora.quant.quantize import quantize_model
from restora.quant.spec import QuantSpec
from restora.quant.uniform import UniformWeight
from restora.train.loop import completion_loss
from tests.conftest import tiny_llama

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
SMOL = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)

SPECS = [
    QuantSpec("nf4", 4, 64), QuantSpec("nf4", 4, 64, double_quant=True), QuantSpec("fp4", 4, 32),
    QuantSpec("int8", 8, 64), QuantSpec("int8", 8, -1),
    QuantSpec("rtn", 2, 64), QuantSpec("rtn", 3, 64), QuantSpec("rtn", 4, 32), QuantSpec("rtn", 8, -1),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(96, 128), (40, 192)])
def test_linear_bytes_equal_quantized_weight_nbytes(spec: QuantSpec, shape: tuple[int, int]) -> None:
    q = quantize_weight(torch.randn(*shape), spec)
    assert linear_bytes(*shape, spec.format, spec.bits, spec.group_size, spec.double_quant) == q.nbytes()


def test_linear_bytes_act_order_and_float() -> None:
    q = UniformWeight(48, 128, bits=3, group_size=64, method="gptq", act_order=True)
    assert linear_bytes(48, 128, "gptq", 3, 64, act_order=True) == q.nbytes()
    assert linear_bytes(48, 128, "float", 16) == torch.nn.Linear(128, 48, bias=False).weight.nbytes
    assert linear_bytes(48, 128, "float", 16, float_bytes=2) == 48 * 128 * 2


def test_weight_items_equal_a_quantized_model_state() -> None:
    """Planned weight bytes == the bytes of a real quantized tiny model's tensors (tied counted once)."""
    model = tiny_llama()
    quantize_model(model, QuantSpec("rtn", 4, 32), progress=False)
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    total -= model.model.rotary_emb.inv_freq.nbytes if "model.rotary_emb.inv_freq" in model.state_dict() else 0
    p = plan_memory(model.config, "serve", format="rtn", bits=4, group_size=32)
    items = {i.name: i.bytes for i in p.items}
    assert items["base linear weights"] + items["float weights"] == total


def test_totals_add_up_and_bits_order_weights() -> None:
    for mode in ("train", "serve"):
        p = plan_memory(SMOL, mode, format="rtn", bits=4, batch_size=4, seq_len=256)
        assert p.total == sum(i.bytes for i in p.items)
        assert 0 < p.static < p.total
    weights = [
        {i.name: i.bytes for i in plan_memory(SMOL, "serve", format=f, bits=b).items}["base linear weights"]
        for f, b in [("rtn", 2), ("rtn", 3), ("rtn", 4), ("nf4", 4), ("int8", 8), ("float", 16)]
    ]
    assert weights == sorted(weights) and len(set(weights)) == len(weights)


def test_checkpointing_and_dropout_change_activations() -> None:
    def act(**kw) -> int:
        p = plan_memory(SMOL, "train", format="nf4", bits=4, batch_size=8, seq_len=256, **kw)
        return {i.name: i.bytes for i in p.items}["activations"]

    assert act(grad_checkpointing=True) < act() / 5
    assert act(dropout=0.0) < act(dropout=0.1)
    assert act(targets="attn") < act(targets="all")


@pytest.mark.parametrize("targets,dropout", [("all", 0.0), ("all", 0.1), ("attn", 0.0)])
def test_activation_count_matches_autograd_saved_tensors(targets: str, dropout: float) -> None:
    """Per-layer bytes == the storages autograd saves per extra layer (two models differing by one layer)."""
    def saved(layers: int) -> int:
        model = tiny_llama(num_hidden_layers=layers)
        quantize_model(model, QuantSpec("rtn", 4, 32), progress=False)
        add_lora(model, LoRAConfig(r=8, target_modules=targets, dropout=dropout))
        model.train()
        ids = torch.randint(0, 256, (2, 32))
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            completion_loss(model, ids, ids.clone(), torch.ones_like(ids))
        # not activations: the norm weights themselves and autocast's bf16 copies of the LoRA weights
        norms = sum(4 * p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" in n)
        lora_casts = sum(2 * p.numel() for p in model.parameters() if p.requires_grad)
        return sum(storages.values()) - norms - lora_casts

    measured = (saved(3) - saved(2)) / (2 * 32)
    shape = ModelShape.from_config(LlamaConfig(**TINY))
    estimate = _layer_activation_bytes(shape, "lora", 8, targets, act=2, res=4, dropout=dropout)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)


def test_adamw8bit_state_bytes_match_optimizer() -> None:
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    add_lora(model, LoRAConfig(r=32, target_modules="all"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    steps = 4 * len(params)  # one fp32 step counter per tensor
    assert _optimizer_bytes([p.numel() for p in params], "adamw8bit") == opt.state_nbytes() - steps
    assert any(p.numel() < 4096 for p in params) and any(p.numel() >= 4096 for p in params)


def test_serve_picks_highest_bits_that_fit() -> None:
    plans = serve_candidates(SMOL, batch_size=8, seq_len=256)
    totals = [p.total for p in plans]
    assert [(p.format, p.bits) for p in plans] == [("float", 16), ("int8", 8), ("nf4", 4), ("rtn", 4), ("rtn", 3),
                                                    ("rtn", 2)]
    # float needs the most; a 4-bit base decoded in bf16 also keeps its codes in the int4 kernels' layouts, so it
    # can need more than int8 (which keeps none); below 4 bits, fewer bits need less
    assert totals[0] == max(totals) and totals[3] > totals[4] > totals[5] == min(totals)
    assert choose_plan(plans, totals[0]).format == "float"
    assert choose_plan(plans, totals[1]).label == plans[1].label  # int8: float does not fit
    assert choose_plan(plans, totals[4]).bits == 3  # nothing above 3 bits fits
    assert choose_plan(plans, totals[-1]).bits == 2


def test_too_small_budget_names_the_smallest_plan() -> None:
    plans = serve_candidates(SMOL, batch_size=8, seq_len=256)
    with pytest.raises(ValueError) as e:
        choose_plan(plans, 100 * 2**20)
    msg = str(e.value)
    assert "\n" not in msg and "too small" in msg and "100.0 MiB" in msg
    assert "rtn-2b-g64" in msg and f"{plans[-1].total / 2**20:.1f} MiB" in msg


@pytest.mark.parametrize("text,value", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("4GB", 4 * 10**9),
                                        ("1.5 GiB", int(1.5 * 2**30)), ("123456", 123456), ("2g", 2 * 10**9)])
def test_parse_budget(text: str, value: int) -> None:
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "eight GiB", "8 GiBs", "-1GiB", "0", "8 parsecs", "1e9"])
def test_parse_budget_errors(text: str) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="does not support 5 bits"):
        plan_memory(SMOL, "serve", format="rtn", bits=5)
    with pytest.raises(ValueError, match="mode must be train, serve, quantize or restore"):
        plan_memory(SMOL, "infer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets must be all, attn or ia3"):
        plan_memory(SMOL, "train", targets="mlp")


def test_plan_command_reads_only_the_config(tmp_path, capsys) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path)  # no weights in the folder
    assert plan(str(tmp_path), budget="8GiB", mode="serve", seq_len=64) == 0
    out = capsys.readouterr().out
    assert "PLR choice: restore to float" in out and "KV cache" in out
    assert plan(str(tmp_path), budget="8GiB", mode="train", batch_size=4, seq_len=64) == 0
    assert "optimizer states" in capsys.readouterr().out
    with pytest.raises(ValueError, match="too small for any serve plan"):
        plan(str(tmp_path), budget="1MiB", mode="serve")
    with pytest.raises(ValueError, match="too small for any train plan"):
        plan(str(tmp_path), budget="1MiB", mode="train")


def test_kv_cache_item_equals_a_real_cache() -> None:
    """The KV cache line == the bytes of the cache restora's decoding builds (bf16 autocast, fp32 model)."""
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=4))
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    real = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    p = plan_memory(model.config, "serve", format="rtn", bits=4, group_size=32, batch_size=3, seq_len=40)
    assert {i.name: i.bytes for i in p.items}["KV cache"] == real


def test_compiled_training_plan():
    """Compiled blocks save each distinct input once: 18,280 B per token and layer for SmolLM2's shape (all-linear
    LoRA r16, bf16), the count saved-tensor hooks gave on compiled SmolLM2 blocks; plus compile state and a 4-bit
    base's dequantized weights."""
    from restora.plan.memory import COMPILE_BYTES, ModelShape, _compiled_layer_activation_bytes, plan_memory

    shape = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)
    assert _compiled_layer_activation_bytes(shape, "lora", 16, "all", 2, 2, 0.0) == 18280
    kw = dict(format="rtn", bits=4, batch_size=8, seq_len=256, dropout=0.0)
    eager, compiled = plan_memory(shape, "train", **kw), plan_memory(shape, "train", compiled=True, **kw)
    items = {i.name: i.bytes for i in compiled.items}
    assert items["compiler"] == COMPILE_BYTES and "compiler" not in {i.name for i in eager.items}
    acts = {i.name: i.bytes for i in eager.items}["activations"]
    assert items["activations"] < acts and compiled.settings["compiled"] is True


def test_serve_plan_counts_the_int4_kernel_layouts_decoding_builds() -> None:
    """The "4-bit kernel layouts" line == the bytes of the layouts a bf16 decode of a real 4-bit model builds
    (one-row and multi-row calls), where this CPU has restora's int4 kernel; none for float and 8-bit bases."""
    from restora.kernels import int4 as int4_kernel

    plans = {(f, b): {i.name: i.bytes for i in plan_memory(SMOL, "serve", format=f, bits=b).items}
             for f, b in [("float", 16), ("int8", 8), ("rtn", 4), ("nf4", 4), ("rtn", 3)]}
    line = "4-bit kernel layouts"
    assert all(line not in plans[k] for k in [("float", 16), ("int8", 8), ("rtn", 3)])
    assert plans[("rtn", 4)][line] == plans[("nf4", 4)][line] > 0  # one layout per layer, the same size
    assert line not in {i.name for i in plan_memory(SMOL, "serve", format="rtn", bits=4, bf16=False).items}
    if not int4_kernel.available():
        pytest.skip("no int4 kernel here: only torch's smaller one-row layout would be built")
    for fmt in ("rtn", "nf4"):
        model = tiny_llama()
        quantize_model(model, QuantSpec(fmt, 4, 32), progress=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for rows in (1, 3):
                model(input_ids=torch.randint(0, 256, (rows, 1)))
        built = sum(t.nbytes for m in model.modules() for name in ("_amx", "_int4pack")
                    for t in (getattr(m, name, None) or ()))
        planned = {i.name: i.bytes for i in plan_memory(model.config, "serve", format=fmt, bits=4,
                                                         group_size=32).items}["4-bit kernel layouts"]
        assert built == planned, fmt


def test_loading_is_a_phase_of_its_own():
    """Building the base streams the source: its transient counts only where it exceeds the working phase's."""
    from restora.plan.memory import ModelShape, plan_memory

    shape = ModelShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=49152,
                       tied=True)
    for mode in ("train", "serve", "quantize"):
        plain = plan_memory(shape, mode, format="nf4", bits=4, float_dtype="bf16")
        streamed = plan_memory(shape, mode, format="nf4", bits=4, float_dtype="bf16", source_dtype="bf16")
        load = [i for i in streamed.items if i.phase == "load" and i.transient]
        assert len(load) == 1 and load[0].bytes == 2048 * 8192 * 2 + 3 * 2048 * 8192 // 2 + 32 * 2**20
        resident = sum(i.bytes for i in streamed.items if not i.transient)
        step = sum(i.bytes for i in streamed.items if i.transient and i.phase == "step")
        assert streamed.total == resident + max(step, load[0].bytes)
        assert streamed.total >= plain.total
    cached = plan_memory(shape, "train", format="nf4", bits=4, float_dtype="bf16", source_dtype="bf16", from_cache=True)
    assert not any(i.phase == "load" and i.transient for i in cached.items)


def test_gptq_loading_counts_a_block_and_switches_to_a_running_hessian():
    from restora.plan.memory import GPTQ_INPUT_BYTES, ModelShape, load_items

    shape = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=49152,
                       tied=False)
    small, = load_items(shape, "gptq", 4, 2, calib_tokens=16 * 128)
    big, = load_items(shape, "gptq", 4, 2, calib_tokens=500 * 256)
    block = sum(o * i for _, o, i in shape.linears()) * 2
    assert small.bytes > block
    carried = 2 * (500 * 256 - 16 * 128) * 4096 * 2  # the rows' hidden states, in and out of a block, bf16
    # the layer inputs are bounded by the running Hessians, not 500 x 256 rows of fp32 inputs
    assert big.bytes - small.bytes - carried < GPTQ_INPUT_BYTES + 4 * (3 * 4096**2 + 14336**2)


def test_auto_micro_batch_takes_the_largest_that_fits():
    from restora.plan.choice import auto_micro_batch
    from restora.plan.memory import ModelShape, plan_memory

    shape = ModelShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=49152,
                       tied=True)
    kw = dict(float_dtype="bf16", targets="attn", seq_len=128, compiled=True, dropout=0.0)
    totals = {b: plan_memory(shape, "train", format="nf4", bits=4, batch_size=b, **kw).total for b in (1, 2, 4, 8)}
    budget = (totals[4] + totals[8]) // 2
    assert auto_micro_batch(shape, budget, 8, "nf4", 4, **kw).settings["batch_size"] == 4
    assert auto_micro_batch(shape, totals[8], 8, "nf4", 4, **kw).settings["batch_size"] == 8
    assert auto_micro_batch(shape, totals[8], 6, "nf4", 4, **kw).settings["batch_size"] == 6  # divisors of 6
    with pytest.raises(ValueError, match="too small to train on this base with micro-batch 1"):
        auto_micro_batch(shape, totals[1] - 1, 8, "nf4", 4, **kw)


def test_the_cli_reads_a_number_or_auto():
    from restora.cli import build_parser

    parser = build_parser()
    micro = "optim.micro_batch_size"  # a TrainConfig field: the option's dest names its group
    assert vars(parser.parse_args(["train", "m", "--out", "o", "--micro-batch-size", "auto"]))[micro] == "auto"
    assert vars(parser.parse_args(["train", "m", "--out", "o", "--micro-batch-size", "4"]))[micro] == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "m", "--out", "o", "--micro-batch-size", "many"])


def test_grouped_settings_become_one_option_per_field(capsys):
    """A dataclass-typed parameter (RestoreOptions) is one option per field, documented once, checked once."""
    from restora.cli import build_parser, main
    from restora.restore.adapter import RestoreOptions

    parser = build_parser()
    for command in (["restore", "a", "--out", "o"], ["eval", "m"], ["generate", "m", "--prompt", "p"],
                    ["export", "a", "o", "--to", "peft"]):
        args = vars(parser.parse_args([*command, "--restore-mode", "mean-match", "--calib-rows", "8"]))
        assert args["options.restore_mode"] == "mean-match" and args["options.calib_rows"] == 8
    with pytest.raises(SystemExit):  # Literal fields keep their choices
        parser.parse_args(["restore", "a", "--out", "o", "--restore-mode", "sideways"])
    assert main(["restore", "a", "--out", "o", "--calib-rows", "0"]) == 2  # __post_init__: one line, exit 2
    assert "calib_samples and calib_rows must be positive" in capsys.readouterr().err
    assert "the k-bit" in parser._subparsers._group_actions[0].choices["restore"].format_help()  # field docs
    assert RestoreOptions(restore_mode="auto").changed() == ["--restore-mode"]


def test_compile_auto_leaves_big_quantized_bases_eager():
    """Compiled blocks keep dequantized bf16 weights for the backward: auto compiles a quantized base only while
    they stay under COMPILED_DEQUANT_MAX (the planner and restora train decide alike)."""
    import torch

    from restora.plan.choice import COMPILED_DEQUANT_MAX, compile_for_training, compiles
    from restora.plan.memory import ModelShape

    small = COMPILED_DEQUANT_MAX // 2 - 1  # linear weights whose bf16 copy fits
    big = COMPILED_DEQUANT_MAX // 2 + 1
    cpu = torch.device("cpu")
    assert compile_for_training("auto", 2 * big, cpu, big, "float") == compile_for_training("auto", 2 * big, cpu, big,
                                                                                            "float")
    assert not compile_for_training("auto", 2 * big, cpu, big, "nf4")
    assert compile_for_training("on", 2 * big, cpu, big, "nf4")  # asked for: compiled regardless
    assert compile_for_training("auto", 2 * small, cpu, small, "nf4") == compile_for_training("auto", 2 * small, cpu,
                                                                                              small, "float")
    eight_b = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                         vocab=49152, tied=False)
    assert not compiles("auto", eight_b, "nf4")
