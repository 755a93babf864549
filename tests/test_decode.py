"""The lean decoder reproduces transformers' forward; generation through it gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from restora.adapters import LoRAConfig, add_lora
from restora.infer.decode import LeanDecoder, supports
from restora.infer.generate import greedy_generate
from restora.kernels.packed import PackedLinear, can_pack, forget_packed, packed_linears
from restora.quant import QuantSpec, quantize_model


def _tiny(kind: str) -> nn.Module:
    if kind == "llama":
        return tiny_llama()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases, untied head
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for j, n in enumerate(lengths):
        ids[j, T - n :] = torch.randint(1, 256, (n,), generator=g)
        mask[j, T - n :] = 1
    return ids, mask


def _hf_last_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]


def _check_against_hf(model: nn.Module, lengths: list[int], steps: int = 4, atol: float = 1e-5) -> None:
    """Prefill + `steps` single-token steps of the lean decoder equal HF's full forward at every step."""
    ids, mask = _left_padded(lengths)
    dec = LeanDecoder(model, len(lengths), ids.shape[1] + steps)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = dec.forward(ids, pos, mask.bool())
    torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=atol, rtol=0)
    last = pos[:, -1]
    for step in range(steps):
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        last = last + 1
        logits = dec.forward(nxt[:, None], last[:, None], torch.ones_like(nxt[:, None], dtype=torch.bool))
        torch.testing.assert_close(logits, _hf_last_logits(model, ids, mask), atol=atol, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lean_forward_matches_transformers(kind):
    model = _tiny(kind)
    assert supports(model)
    _check_against_hf(model, [5, 9, 1])  # ragged, one row a single token: left padding everywhere


def test_lean_forward_quantized_base_with_lora():
    """Layers are called, never opened: a quantized base under an adapter decodes as HF runs it."""
    model = tiny_llama()
    quantize_model(model, QuantSpec("rtn", 4, group_size=32), progress=False)
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    _check_against_hf(model, [6, 3], steps=3)


def test_lean_decoder_drops_rows():
    model = tiny_llama()
    ids, mask = _left_padded([4, 7, 6])
    dec = LeanDecoder(model, 3, 12)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = dec.forward(ids, pos, mask.bool()).argmax(-1)
    keep = torch.tensor([0, 2])
    dec.keep_rows(keep)
    logits = dec.forward(nxt[keep, None], pos[keep, -1:] + 1, torch.ones((2, 1), dtype=torch.bool))
    ids2 = torch.cat([ids[keep], nxt[keep, None]], 1)
    mask2 = torch.cat([mask[keep], torch.ones((2, 1), dtype=torch.long)], 1)
    torch.testing.assert_close(logits, _hf_last_logits(model, ids2, mask2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cache holds 12 positions, asked for 13"):
        dec.forward(torch.ones((2, 6), dtype=torch.long), torch.zeros((2, 6), dtype=torch.long),
                    torch.ones((2, 6), dtype=torch.bool))  # 8 filled, 7 real after compaction, + 6


def test_supports_only_what_it_reproduces():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    assert not supports(windowed)
    with pytest.raises(ValueError, match="not a Llama-family decoder"):
        LeanDecoder(windowed, 1, 8)


def test_generate_lean_equals_transformers_path(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["SELECT name FROM", "a", "Question: how many rows are in the table called heads?", "x y z"]
    for stop in ((), ("a",)):  # without and with stop strings (rows finish at different steps)
        kw = dict(max_new_tokens=12, stop=stop, batch_size=3, bf16=False)
        assert greedy_generate(model, tok, prompts, lean=True, **kw) == greedy_generate(model, tok, prompts, lean=False, **kw)


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU/torch has no oneDNN bf16")
def test_packed_linears_swap_and_restore():
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="attn"))
    before = dict(model.named_modules())
    x = torch.randn(3, 64)
    with packed_linears(model, batch_hint=3) as n:
        assert n == 2 * 7 + 1  # every base layer (inside the adapters too) and the tied head; not lora_A/B
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q.base_layer, PackedLinear) and type(q.lora_A) is nn.Linear
        ref = before["model.layers.0.mlp.up_proj"]
        got = model.model.layers[0].mlp.up_proj(x)
        want = torch.nn.functional.linear(x.bfloat16(), ref.weight.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(m is before[k] for k, m in model.named_modules())  # the very same modules are back


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU/torch has no oneDNN bf16")
def test_packed_copies_are_reused_until_the_weight_changes():
    model = tiny_llama()
    lin = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 64)

    def packed_up() -> PackedLinear:
        with packed_linears(model) as n:
            assert n == 2 * 7 + 1  # two blocks of seven layers, and the head
            return model.model.layers[0].mlp.up_proj

    first = packed_up()
    with packed_linears(model, batch_hint=4):
        assert model.model.layers[0].mlp.up_proj is first  # same weights: the cached copy, whatever the hint
    with torch.no_grad():
        lin.weight.mul_(2)  # changed in place: the version counter moves
    second = packed_up()
    assert second is not first
    want = torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16()).float()
    torch.testing.assert_close(second(x).float(), want, atol=2e-2, rtol=2e-2)
    lin.weight = nn.Parameter(torch.zeros_like(lin.weight))  # a new tensor: repacked too
    third = packed_up()
    assert third is not second and torch.count_nonzero(third(x)) == 0
    assert forget_packed(model) == 2 * 7 + 1
    assert packed_up() is not third


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU/torch has no oneDNN bf16")
def test_packed_linear_op_uses_the_live_copy_of_unchanged_weights(monkeypatch):
    """restora::packed_linear (what compiled graphs call) computes with the copy packed from exactly the
    weight and bias it is given; outside the `with`, or after the weight changed, it computes unpacked."""
    import restora.kernels.packed as packed

    calls = []
    pack_call = packed._Pack.__call__
    monkeypatch.setattr(packed._Pack, "__call__", lambda self, x: calls.append(1) or pack_call(self, x))
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    root = nn.Sequential(lin)
    x = torch.randn(3, 64).bfloat16()
    op = torch.ops.restora.packed_linear

    def want() -> torch.Tensor:
        return torch.nn.functional.linear(x, lin.weight.bfloat16(), lin.bias.bfloat16()).float()

    torch.testing.assert_close(op(x, lin.weight, lin.bias).float(), want(), atol=2e-2, rtol=2e-2)
    assert not calls  # nothing packed: the plain product
    with packed_linears(root):
        with packed_linears(root):  # nested: the inner exit leaves the outer's copy live
            pass
        torch.testing.assert_close(op(x, lin.weight, lin.bias).float(), want(), atol=2e-2, rtol=2e-2)
        assert len(calls) == 1
        with torch.no_grad():
            lin.weight.mul_(-1)  # changed in place: the packed copy is stale, the op must not use it
        torch.testing.assert_close(op(x, lin.weight, lin.bias).float(), want(), atol=2e-2, rtol=2e-2)
        assert len(calls) == 1
    assert not packed._LIVE


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU/torch has no oneDNN bf16")
@pytest.mark.parametrize("kind", ["llama", "qwen2+lora"])
def test_compiled_steps_run_the_packed_layers(monkeypatch, kind):
    """With bf16, the compiled step's graph reaches every block layer's packed copy (not a plain bf16 product),
    and its logits match the eager lean forward's to bf16 rounding; also with biases (Qwen2) and with
    LoRA adapters around the packed base layers."""
    pytest.importorskip("torch._inductor")
    import restora.kernels.packed as packed

    calls = []
    pack_call = packed._Pack.__call__
    monkeypatch.setattr(packed._Pack, "__call__", lambda self, x: calls.append(1) or pack_call(self, x))
    model = _tiny(kind.split("+")[0])
    if kind.endswith("+lora"):
        add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter term
    ids, mask = _left_padded([5, 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, counts = [], []
    with packed_linears(model, batch_hint=2) as n, torch.autocast("cpu", dtype=torch.bfloat16):
        for compile in (False, True):
            dec = LeanDecoder(model, 2, 16, compile=compile)
            calls.clear()
            logits.append(dec.forward(ids, positions, mask.bool()).float())  # 5 tokens a row: a compiled step
            counts.append(len(calls))
    assert counts == [n, n] and n == 2 * 7 + 1  # every block layer and the head, eager and compiled alike
    torch.testing.assert_close(logits[1], logits[0], atol=5e-2, rtol=5e-2)


def test_compiled_decode_steps_match_eager(tiny_dir):
    """compile=True runs one-token steps through one torch.compile'd graph of all blocks: same tokens."""
    pytest.importorskip("torch._inductor")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["SELECT name FROM", "a", "Question: how many rows are in the table called heads?"]
    kw = dict(max_new_tokens=10, stop=("a",), batch_size=3, bf16=False)
    want = greedy_generate(model, tok, prompts, **kw)
    assert greedy_generate(model, tok, prompts, compile=True, **kw) == want
    # multi-token steps (speculative drafts) run through the same compiled graph (dynamic in the tokens per row)
    assert greedy_generate(model, tok, prompts, compile=True, speculate=3, **kw) == want
    # bf16 on CPU: the compiled steps run the packed layers (test_compiled_steps_run_the_packed_layers)
    kw["bf16"] = True
    out = greedy_generate(model, tok, prompts, compile=True, **kw)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)


def _compiled_and_eager_logits(model: nn.Module, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prompt pass and two one-token steps, compiled and eager, from the same inputs."""
    ids, mask = _left_padded([5, 3], seed=7)
    out = []
    for compile in (True, False):
        dec = LeanDecoder(model, 2, 16, compile=compile)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = [dec.forward(ids, positions, mask.bool())]
            for step in range(2):
                tokens = logits[-1].argmax(-1)[:, None]
                logits.append(dec.forward(tokens, positions[:, -1:] + 1 + step, torch.ones_like(tokens, dtype=torch.bool)))
        out.append(torch.cat([lg.float() for lg in logits]))
    return out[0], out[1]


@pytest.mark.parametrize("kind", ["float", "rtn4-lora"])
def test_a_compiled_step_serves_every_model_of_its_structure_with_that_models_tensors(kind):
    """Compiled steps skip dynamo's per-step guards on the model's modules (restora.infer.decode._compiled_step): a graph
    is shared by models of one structure digest and reads each caller's own tensors -- weights, kernel layouts,
    adapter factors. A model that differs in anything but tensor values (here a LoRA scaling, an RMSNorm eps)
    gets its own graph."""
    pytest.importorskip("torch._inductor")
    from restora.infer import decode

    def build(seed: int) -> nn.Module:
        model = tiny_llama(seed=seed)
        if kind == "rtn4-lora":
            quantize_model(model, QuantSpec("rtn", 4, 32), progress=False)
            add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(seed))
        return model.eval()

    a, b = build(0), build(1)
    assert decode._structure(a) == decode._structure(b)
    before = len(decode._STEPS)
    for model in (a, b, a):
        compiled, eager = _compiled_and_eager_logits(model, bf16=kind != "float")
        assert torch.allclose(compiled, eager, atol=1e-2 if kind != "float" else 1e-4), kind
    assert decode._structure(a) in decode._STEPS and len(decode._STEPS) - before <= 1  # a and b: one graph
    # another LoRA scaling (or norm eps) is another structure: its own graph, its own constants
    changed = build(1)
    if kind == "rtn4-lora":
        for m in changed.modules():
            if hasattr(m, "scaling") and isinstance(m.scaling, float):
                m.scaling *= 3
    else:
        for layer in changed.model.layers:
            layer.input_layernorm.variance_epsilon = 0.5
    assert decode._structure(changed) != decode._structure(b)
    compiled, eager = _compiled_and_eager_logits(changed, bf16=kind != "float")
    assert torch.allclose(compiled, eager, atol=1e-2 if kind != "float" else 1e-4), kind
    assert not torch.allclose(eager, _compiled_and_eager_logits(b, bf16=kind != "float")[1], atol=1e-2)


def test_compiled_decoding_has_room_for_more_variants(tiny_dir, monkeypatch):
    """Compiled decoding runs with dynamo's recompile limit raised (restora.kernels.compiled.room_for_variants): batch 1
    or more and 1 or more tokens a step are variants of one function, shared by every model in the process."""
    pytest.importorskip("torch._inductor")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from restora.kernels.compiled import RECOMPILE_LIMIT

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    seen = []
    forward = LeanDecoder.forward
    monkeypatch.setattr(LeanDecoder, "forward",
                        lambda self, *a, **k: seen.append(torch._dynamo.config.recompile_limit) or forward(self, *a, **k))
    default = torch._dynamo.config.recompile_limit
    greedy_generate(model, tok, ["SELECT name FROM"], max_new_tokens=3, bf16=False)
    greedy_generate(model, tok, ["SELECT name FROM"], max_new_tokens=3, bf16=False, compile=True)
    assert seen[:3] == [default] * 3 and set(seen[3:]) == {max(RECOMPILE_LIMIT, default)} and len(seen) == 6
    assert torch._dynamo.config.recompile_limit == default  # restored after the call


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU/torch has no oneDNN bf16")
def test_packing_is_skipped_when_memory_is_short(monkeypatch):
    import restora.kernels.packed as packed

    model = tiny_llama()
    monkeypatch.setattr(packed, "available_memory", lambda: 4 * 2 * 64 * 64)  # a quarter holds less than the weights
    with packed_linears(model) as n:
        assert n == 0 and type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_compiled_steps_keep_the_most_recently_used_structures(monkeypatch):
    """A long-lived process keeps STEPS_KEPT compiled step functions, dropping the least recently used."""
    from restora.infer import decode

    monkeypatch.setattr(decode, "STEPS_KEPT", 2)
    monkeypatch.setattr(decode, "_STEPS", decode.collections.OrderedDict())
    compiles: list[object] = []
    monkeypatch.setattr(decode.torch, "compile", lambda fn, **kw: compiles.append(fn) or fn)
    models = []
    for eps in (0.1, 0.2, 0.3):
        model = tiny_llama()
        for layer in model.model.layers:
            layer.input_layernorm.variance_epsilon = eps
        models.append(model)
    keys = [decode._structure(m) for m in models]
    decode._compiled_step(None, models[0])
    decode._compiled_step(None, models[1])
    decode._compiled_step(None, models[0])  # used again: now the most recent
    assert len(compiles) == 2
    decode._compiled_step(None, models[2])  # evicts models[1]'s, the least recently used
    assert list(decode._STEPS) == [keys[0], keys[2]]
    decode._compiled_step(None, models[1])  # compiles again
    assert len(compiles) == 4 and list(decode._STEPS) == [keys[2], keys[1]]
