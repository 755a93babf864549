"""restora serve over real HTTP on 127.0.0.1: a tiny random Llama with SmolLM2's tokenizer and four
LoRA adapters saved by restora, the server in a subprocess (`restora.serve.server.serve`).

Checked against offline `restora.infer.generate.greedy_generate` (fp32 both sides):
  - greedy completions through the server equal offline decoding, for the base and each adapter,
    with and without a stop string; streaming (SSE) equals non-streaming; the openai client works
  - 36 concurrent clients over 4 adapters and the base all get their own complete answer
  - top_p -> 0 equals greedy; a seed makes sampling repeatable
  - limits: malformed JSON / max_tokens / long prompt -> 400 OpenAI error body, unknown model
    -> 404, big body -> 413, full queue -> 429 with Retry-After (and the server lives on)
  - adapter names and lora_path stay inside --adapters-root: ../, absolute paths, symlinked
    folders and symlinked files out of the root are refused with 400 and never loaded
  - LRU: a fifth adapter evicts the least recently used; an evicted adapter reloads lazily
  - a client that disconnects mid-stream frees its row; SIGTERM finishes in-flight requests, and a
    hung request delays shutdown by at most --shutdown-timeout
  - a failing prefill or an adapter whose logits overflow answers only its own request; the running
    rows finish with the output they have alone
  - a plan over the memory budget is refused (one line naming both) unless --allow-over-budget
  - no FutureWarning / deprecation notice from transformers, in process or in the server's log

The bad adapters of the root (NaN weights, truncated weights, a malformed config, another base's
adapter, overflowing weights) are probed in tests/test_serve_fuzz.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# the tiny model borrows SmolLM2's tokenizer; a deprecation in transformers fails the tests the day it appears
pytestmark = [pytest.mark.smollm, pytest.mark.filterwarnings("error::FutureWarning")]

ADAPTERS = ["a0", "a1", "a2", "a3"]
PROMPTS = ["The capital of France", "SELECT name FROM", "Once upon a time there was", "def add(a, b):",
           "Question: what is 2 + 2?", "Hello"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """Tiny model folder, an adapters root with four LoRA adapters, and adapters/links outside it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from restora.adapters import LoRAConfig, adapter_modules, add_lora, save_adapter
    from restora.models.load import load_model, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))  # from the user's cache (converted once)
    base = tmp_path_factory.mktemp("serve")
    old_cache = os.environ.get("RESTORA_CACHE")
    os.environ["RESTORA_CACHE"] = str(base / "cache")  # the server's quantized-base cache stays in tmp
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tiny = base / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    loaded = load_model(str(tiny))
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()

    def write(folder: Path, seed: int) -> None:
        m = copy.deepcopy(loaded.model)
        torch.manual_seed(seed)
        add_lora(m, LoRAConfig(r=4, alpha=8))
        with torch.no_grad():
            for _, mod in adapter_modules(m):
                for p in mod.adapter_params():
                    p.add_(torch.randn_like(p) * 0.5)
        save_adapter(m, folder, provenance={"source_hash": loaded.source_hash})

    for i, name in enumerate(ADAPTERS + ["a4"]):
        write(root / name, 10 + i)
    write(outside / "secret", 99)
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)  # a folder link out of the root
    sneaky = root / "sneaky"  # a folder inside whose weights file links out of the root
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((root / "a0" / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    bad_adapters(root, loaded)
    yield {"tiny": tiny, "root": root, "outside": outside, "loaded": loaded, "tok": tok}
    if old_cache is None:
        os.environ.pop("RESTORA_CACHE", None)
    else:
        os.environ["RESTORA_CACHE"] = old_cache


BAD = {"nan": "NaN weights", "trunc": "truncated weights", "badcfg": "lora_alpha 'sixteen'",
       "foreign": "trained on another base", "overflow": "finite weights whose logits overflow"}


def bad_adapters(root: Path, loaded) -> None:
    """Adapter folders under `root` that must not load (or, `overflow`, must not harm other rows), from a0."""
    from safetensors.torch import load_file, save_file

    good = root / "a0"
    tensors = load_file(str(good / "adapter_model.safetensors"))
    for name in BAD:
        (root / name).mkdir()
        for f in good.iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
    first = sorted(tensors)[0]
    save_file({**tensors, first: torch.full_like(tensors[first], float("nan"))},
              str(root / "nan" / "adapter_model.safetensors"))
    save_file({k: torch.full_like(v, 1e30) for k, v in tensors.items()}, str(root / "overflow" / "adapter_model.safetensors"))
    w = root / "trunc" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cfg = json.loads((good / "adapter_config.json").read_text())
    (root / "badcfg" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "sixteen"}))
    prov = json.loads((good / "restora.json").read_text())
    (root / "foreign" / "restora.json").write_text(json.dumps({**prov, "source_hash": "0" * 64}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(setup: dict, **kw) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    args = dict(adapters_root=str(setup["root"]), port=port, bf16=False, max_loaded_adapters=4, **kw)
    code = f"import sys; from restora.commands.serving import serve; sys.exit(serve({str(setup['tiny'])!r}, **{args!r}))"
    log = open(setup["root"].parent / f"server-{port}.log", "w")  # a file, not a pipe nobody drains
    # a FutureWarning (transformers' deprecations) raises in the server: the request that meets it fails
    proc = subprocess.Popen([sys.executable, "-W", "error::FutureWarning", "-c", code], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log.close()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(setup['root'].parent / f'server-{port}.log').read_text()}")
        try:
            if _call(port, "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def _log(port: int, setup: dict) -> str:
    return (setup["root"].parent / f"server-{port}.log").read_text()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _call(port: int, method: str, path: str, body: object = None, raw: bytes | None = None,
          timeout: float = 60) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(text) if text else {}


@pytest.fixture(scope="module")
def server(setup: dict):
    proc, port = _start(setup, max_tokens_limit=600, max_prompt_tokens=64, max_body_bytes=20_000)
    yield port
    _stop(proc)
    log = _log(port, setup)
    assert "deprecated" not in log.lower() and "FutureWarning" not in log, log[-3000:]


_MODELS: dict = {}


def _offline(setup: dict, adapter: str | None, prompts: list[str], max_tokens: int, stop: tuple = (),
             chat: bool = False) -> list[str]:
    """The reference: restora.infer.generate.greedy_generate on the base with `adapter` loaded alone (fp32)."""
    from restora.adapters import load_adapter
    from restora.infer.generate import greedy_generate

    if adapter not in _MODELS:
        _MODELS[adapter] = copy.deepcopy(setup["loaded"].model)
        if adapter is not None:
            load_adapter(_MODELS[adapter], setup["root"] / adapter)
    return greedy_generate(_MODELS[adapter], setup["tok"], prompts, max_new_tokens=max_tokens, stop=stop, bf16=False,
                           batch_size=16, add_special_tokens=not chat)


def _complete(port: int, model: str, prompt: str, max_tokens: int = 12, **kw) -> dict:
    status, _, out = _call(port, "POST", "/v1/completions",
                           {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
    assert status == 200, out
    return out


def test_greedy_equals_offline_generate(setup, server):
    with cf.ThreadPoolExecutor(8) as pool:
        for adapter in [None, *ADAPTERS]:
            want = _offline(setup, adapter, PROMPTS, 12)
            got = [out["choices"][0]["text"] for out in pool.map(lambda p: _complete(server, adapter or "tiny", p), PROMPTS)]
            assert got == want, adapter
    assert len(set(_offline(setup, a, PROMPTS[:1], 12)[0] for a in [None, *ADAPTERS])) == 5  # adapters differ
    # a stop string cuts the text before it, as offline
    ref = _offline(setup, "a1", PROMPTS[:1], 12)[0]
    stop = ref.split()[2]
    out = _complete(server, "a1", PROMPTS[0], stop=[stop])
    assert out["choices"][0]["text"] == _offline(setup, "a1", PROMPTS[:1], 12, stop=(stop,))[0] == ref[:ref.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 12
    models = _call(server, "GET", "/v1/models")[2]["data"]
    assert models[0]["id"] == "tiny" and models[0]["bits"] == 16 and models[0]["format"] == "float"
    assert {m["id"] for m in models[1:]} == set(ADAPTERS)
    health = _call(server, "GET", "/health")[2]
    assert health["ready"] and health["plan"]["fits"] and health["plan"]["bits"] == 16  # auto: the 4GiB fit float


def test_concurrent_clients_across_adapters(setup, server):
    names = [None, *ADAPTERS]
    jobs = [(names[i % 5], PROMPTS[i % len(PROMPTS)] + f" #{i}") for i in range(36)]
    want = {}
    for a in names:
        ps = [p for n, p in jobs if n == a]
        want.update({(a, p): t for p, t in zip(ps, _offline(setup, a, ps, 10))})
    before = _call(server, "GET", "/health")[2]["engine"]
    with cf.ThreadPoolExecutor(36) as pool:
        outs = list(pool.map(lambda j: _complete(server, j[0] or "tiny", j[1], 10), jobs))
    for (a, p), out in zip(jobs, outs):
        assert out["model"] == (a or "tiny") and out["choices"][0]["text"] == want[(a, p)], (a, p)
    after = _call(server, "GET", "/health")[2]["engine"]
    assert after["running"] == 0 and after["completed"] - before["completed"] == 36
    # rows of different adapters shared decode steps: far fewer steps than generated tokens
    assert after["steps"] - before["steps"] < (after["tokens"] - before["tokens"]) / 4


def test_openai_client_streaming_equals_non_streaming(setup, server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0)
    assert {m.id for m in client.models.list()} >= {"tiny", *ADAPTERS}
    for model in ("tiny", "a2"):
        full = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0)
        parts = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in parts) == full.choices[0].text
        assert full.choices[0].text == _offline(setup, None if model == "tiny" else model, PROMPTS[2:3], 20)[0]
    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="a3", messages=msgs, max_tokens=15, temperature=0)
    stream = client.chat.completions.create(model="a3", messages=msgs, max_tokens=15, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    text = setup["tok"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.choices[0].message.content == _offline(setup, "a3", [text], 15, chat=True)[0]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_sampling(server):
    greedy = _complete(server, "a0", PROMPTS[3], 16)["choices"][0]["text"]
    assert _complete(server, "a0", PROMPTS[3], 16, temperature=1.0, top_p=1e-6)["choices"][0]["text"] == greedy
    a = [_complete(server, "a0", PROMPTS[3], 16, temperature=1.5, seed=s)["choices"][0]["text"] for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2] and a[0] != greedy


def test_limits_and_errors(server):
    def err(status, path, body=None, raw=None):
        got, headers, out = _call(server, "POST", path, body, raw)
        assert got == status, out
        assert set(out["error"]) == {"message", "type", "param", "code"}
        return out["error"], headers

    e, _ = err(400, "/v1/completions", raw=b'{"model": "tiny", "prompt": ')
    assert e["code"] == "invalid_json"
    assert err(400, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 601})[0]["param"] == "max_tokens"
    assert err(400, "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1})[0]["param"] == "temperature"
    e, _ = err(400, "/v1/completions", {"model": "tiny", "prompt": "word " * 100})
    assert e["code"] == "context_length_exceeded"
    assert err(404, "/v1/completions", {"model": "a9", "prompt": "x"})[0]["code"] == "model_not_found"
    assert err(404, "/v1/chat/completions", {"model": "a9", "messages": [{"role": "user", "content": "x"}]})
    assert err(413, "/v1/completions", {"model": "tiny", "prompt": "x" * 30_000})[0]["code"] == "body_too_large"
    assert _complete(server, "tiny", "still alive", 2)["usage"]["completion_tokens"] == 2


def test_adapter_paths_stay_inside_root(setup, server):
    for name in ["../outside/secret", "/etc/passwd", str(setup["outside"] / "secret"), "a0/../../outside/secret",
                 "escape", "sneaky", "..", ".hidden"]:
        status, _, out = _call(server, "POST", "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2})
        assert status == 400, (name, out)
    for path in ["../outside/secret", str(setup["outside"] / "secret"), "a0/../../outside/secret", "escape", "sneaky"]:
        status, _, out = _call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x1", "lora_path": path})
        assert status == 400 and out["error"]["type"] == "invalid_request_error", (path, out)
    for name in ["../a0", "a/b"]:
        assert _call(server, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "a0"})[0] == 400
    loaded = {m["id"] for m in _call(server, "GET", "/v1/models")[2]["data"]}
    assert not loaded & {"x1", "escape", "sneaky", "secret"}


def test_load_unload_and_lru(setup, server):
    status, _, out = _call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "fifth", "lora_path": "a4"})
    assert status == 200, out
    health = _call(server, "GET", "/health")[2]["adapters"]
    assert len(health["loaded"]) == 4 and "fifth" in health["loaded"] and health["evictions"] >= 1
    evicted = (set(ADAPTERS) - set(health["loaded"])).pop()
    assert _complete(server, "fifth", PROMPTS[0])["choices"][0]["text"] == _offline(setup, "a4", PROMPTS[:1], 12)[0]
    # the evicted adapter loads again on first use, with the same answers
    assert _complete(server, evicted, PROMPTS[1])["choices"][0]["text"] == _offline(setup, evicted, PROMPTS[1:2], 12)[0]
    assert _call(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fifth"})[0] == 200
    assert "fifth" not in _call(server, "GET", "/health")[2]["adapters"]["loaded"]
    assert _call(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fifth"})[0] == 404
    assert _call(server, "POST", "/v1/completions", {"model": "fifth", "prompt": "x"})[0] == 404  # not under root


def test_disconnect_mid_stream_frees_the_row(server):
    before = _call(server, "GET", "/health")[2]["engine"]
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "a1", "prompt": PROMPTS[0], "max_tokens": 600,
                                                             "temperature": 0, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(6) == b"data: "  # streaming has begun
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        h = _call(server, "GET", "/health")[2]["engine"]
        if h["cancelled"] > before["cancelled"] and h["running"] == 0:
            break
        time.sleep(0.05)
    assert h["cancelled"] == before["cancelled"] + 1 and h["running"] == 0
    assert h["tokens"] - before["tokens"] < 600  # it did not run to max_tokens


def test_queue_overflow_then_sigterm_drains(setup):
    proc, port = _start(setup, max_batch=2, max_queue=3)
    try:
        body = {"model": "a0", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0}
        with cf.ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda _: _call(port, "POST", "/v1/completions", body), range(16)))
        codes = [o[0] for o in outs]
        assert 429 in codes and 200 in codes and set(codes) == {200, 429}, codes
        assert all(o[1].get("retry-after") == "1" for o in outs if o[0] == 429)
        assert all(o[2]["error"]["type"] == "rate_limit_error" for o in outs if o[0] == 429)
        texts = {o[2]["choices"][0]["text"] for o in outs if o[0] == 200}
        assert len(texts) == 1 and _call(port, "GET", "/health")[2]["engine"]["running"] == 0

        # SIGTERM with requests running and waiting: all of them finish, then the process exits 0
        long = {**body, "max_tokens": 300}
        # 3 requests: 2 running (max_batch) and 1 waiting, well inside the queue's capacity
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_call, port, "POST", "/v1/completions", long) for _ in range(3)]
            end = time.monotonic() + 10
            while _call(port, "GET", "/health")[2]["engine"]["running"] < 2 and time.monotonic() < end:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            outs = [f.result() for f in futs]
        assert [o[0] for o in outs] == [200] * 3
        ref = _offline(setup, "a0", PROMPTS[:1], 300)[0]
        assert all(o[2]["choices"][0]["text"] == ref for o in outs)
        assert proc.wait(20) == 0
        with pytest.raises(OSError):
            _call(port, "GET", "/health", timeout=2)
    finally:
        _stop(proc)


def test_engine_packs_only_the_head_while_it_runs():
    """Under bf16 on a CPU that has it, the engine decodes with a packed bf16 copy of the LM head (no per-step cast
    of a float head) and leaves the decoder's layers alone; the head is restored when the engine stops."""
    from types import SimpleNamespace

    from torch import nn

    from restora.kernels.packed import PackedLinear, can_pack
    from restora.serve.engine import Engine, EngineConfig

    from conftest import tiny_llama

    model = tiny_llama(tie_word_embeddings=False)
    tok = SimpleNamespace(eos_token_id=0, pad_token_id=0)
    head = model.lm_head
    engine = Engine(model, tok, None, EngineConfig(bf16=True))  # type: ignore[arg-type]  # no adapters needed here
    with engine._packed_head() as n:
        if can_pack(torch.device("cpu")):
            assert n == 1 and isinstance(model.lm_head, PackedLinear)
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert model.lm_head is head
    with Engine(model, tok, None, EngineConfig(bf16=False))._packed_head() as n:  # type: ignore[arg-type]
        assert n == 0 and model.lm_head is head


def test_failing_prefill_answers_only_its_request(setup):
    """A prefill that raises (here: any prompt holding a poison token) answers its own request with an error; a row
    already running and a request that joins in the same prefill finish with the output they have alone."""
    import queue

    from restora.adapters.multi import MultiAdapterModel
    from restora.serve.adapters_root import AdapterRoot, ResidentAdapters
    from restora.serve.engine import Engine, EngineConfig, Request, SamplingParams

    model = copy.deepcopy(setup["loaded"].model)
    tok = setup["tok"]
    engine = Engine(model, tok, ResidentAdapters(MultiAdapterModel(model), AdapterRoot(setup["root"]), 2),
                    EngineConfig(bf16=False))
    poison = tok("Hello", add_special_tokens=False)["input_ids"][0]
    real = engine._forward

    def forward(**kw):
        if kw["input_ids"].shape[1] > 1 and bool((kw["input_ids"] == poison).any()):
            raise RuntimeError("poisoned prompt")
        return real(**kw)

    engine._forward = forward  # type: ignore[method-assign]
    engine.start()

    def submit(prompt: str, max_tokens: int) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        engine.submit(Request(tok(prompt)["input_ids"], None, SamplingParams(max_tokens, 0.0, ignore_eos=True),
                              q.put))
        return q

    try:
        alone = [submit(p, n).get(timeout=60) for p, n in ((PROMPTS[0], 200), (PROMPTS[2], 20))]
        assert [a[0] for a in alone] == ["done", "done"]
        long = submit(PROMPTS[0], 200)
        while engine.stats()["running"] < 1:
            time.sleep(0.001)
        with engine._cv:  # both wait together, so they join in one prefill: that one fails, then each alone
            bad, other = submit("Hello there", 5), submit(PROMPTS[2], 20)
        assert bad.get(timeout=60) == ("error", 500, "generation failed for this request: RuntimeError")
        assert other.get(timeout=60) == alone[1]
        assert long.get(timeout=60) == alone[0]
        assert engine.stats()["failed"] == 1 and engine.stats()["running"] == 0
    finally:
        engine.stop(10)


def test_overflowing_adapter_fails_only_its_row(setup, server):
    """An adapter whose (finite) weights make the logits overflow, sampled at temperature 1 while a base request
    runs: it gets a clear error naming the adapter; the base request's greedy text is the offline one."""
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(2) as pool:
        long = pool.submit(_call, server, "POST", "/v1/completions", body)
        end = time.monotonic() + 10
        while _call(server, "GET", "/health")[2]["engine"]["running"] < 1 and time.monotonic() < end:
            time.sleep(0.005)
        status, _, out = _call(server, "POST", "/v1/completions",
                               {"model": "overflow", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1})
        assert status == 500 and "'overflow'" in out["error"]["message"] and "NaN" in out["error"]["message"], out
        status, _, out = long.result()
    assert status == 200, out
    from restora.infer.generate import greedy_generate

    ids = setup["tok"](PROMPTS[0])["input_ids"]
    assert out["usage"]["completion_tokens"] == 150 and out["usage"]["prompt_tokens"] == len(ids)
    want = greedy_generate(copy.deepcopy(setup["loaded"].model), setup["tok"], PROMPTS[:1], max_new_tokens=150,
                           bf16=False)[0]
    if "<|endoftext|>" not in want:  # offline stops at EOS; the server (ignore_eos) goes on
        assert out["choices"][0]["text"].startswith(want)


def test_hung_request_delays_shutdown_by_at_most_the_timeout(setup):
    """A client that sends half a body and waits: SIGTERM exits within --shutdown-timeout (plus start-up slack)."""
    proc, port = _start(setup, shutdown_timeout=2.0)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny\", ")
        time.sleep(0.3)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t < 8
        sock.close()
        assert "timeout graceful shutdown exceeded" in _log(port, setup)
    finally:
        _stop(proc)


def test_plan_over_budget_is_refused(setup):
    out = subprocess.run([sys.executable, "-m", "restora", "serve", str(setup["tiny"]), "--adapters-root",
                          str(setup["root"]), "--bits", "16", "--memory-budget", "1MiB"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "budget" in ln]
    assert len(lines) == 1 and "1.0 MiB" in lines[0] and "--allow-over-budget" in lines[0], out.stderr
    assert "Uvicorn running" not in out.stderr + out.stdout


def test_model_forward_without_deprecations(setup):
    """greedy_generate through the model's own forward (lean=False) and the engine pass the KV cache by the
    keyword the installed transformers takes: no FutureWarning (an error here) and no deprecation notice."""
    import logging

    from restora.infer.generate import greedy_generate

    notices: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())

    hf = logging.getLogger("transformers")
    handler = Catch(logging.WARNING)
    hf.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()  # transformers says a notice once per process
    try:
        out = greedy_generate(copy.deepcopy(setup["loaded"].model), setup["tok"], PROMPTS[:2], max_new_tokens=4,
                              bf16=False, lean=False)
    finally:
        hf.removeHandler(handler)
    assert len(out) == 2
    assert not [n for n in notices if "deprecat" in n.lower()], notices


def test_an_offloaded_server_answers_as_the_resident_one(setup):
    """`serve --offload`: the base's blocks mapped from the file and paged in per block; the same greedy answers."""
    from fastapi.testclient import TestClient

    from restora.serve.server import build_server

    answers = []
    for offload in (False, True):
        app = build_server(str(setup["tiny"]), str(setup["root"]), bits="8", memory_budget="4GiB", max_batch=2,
                           verbose=False, offload=offload)
        with TestClient(app) as client:
            health = client.get("/health").json()
            body = {"model": "a0", "prompt": "SELECT name FROM", "max_tokens": 8, "temperature": 0}
            answers.append(client.post("/v1/completions", json=body).json()["choices"][0]["text"])
        assert ("offloaded" in json.dumps(health)) == offload
    assert answers[0] == answers[1]
