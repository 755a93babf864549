"""The HTTP API under bad input: restora serve on 127.0.0.1 (the tiny Llama of tests/test_serve.py) probed with
the known client mistakes and a bad adapter of each kind, then fuzzed with request bodies that hypothesis draws
from the API's fields (valid values, wrong types, out-of-range numbers, arbitrary JSON, raw bytes).

Invariants, for every request:
  - no 5xx: a client's input gets a 2xx or a 4xx with OpenAI's error body, never a server error
  - exactly one answer: a JSON body, or an SSE stream that ends with one `[DONE]` or one error event
  - error messages name adapters, never a path on the server
  - other clients are unaffected: a witness thread sends the same greedy requests throughout, and each answer
    equals the one it got alone before the fuzzing began

Runs in well under a minute (one server, small max_tokens).
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from test_serve import BAD, PROMPTS, _call, _start, _stop, setup  # noqa: E402,F401  (setup: the fixture)

pytestmark = [pytest.mark.smollm, pytest.mark.filterwarnings("error::FutureWarning")]

WITNESS = [("a1", PROMPTS[0]), ("tiny", PROMPTS[2])]
ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]


def _post(port: int, path: str, raw: bytes, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _check_answer(status: int, data: bytes, secret: str) -> None:
    """One well-formed answer and no server path in it; 5xx fails."""
    assert status < 500, (status, data[:500])
    text = data.decode()
    assert secret not in text, text[:500]
    if text.startswith("data: "):  # SSE: events, then exactly one end
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), text[:500]
        ends = [e for e in events if e == "data: [DONE]" or '"error"' in e[:20]]
        assert len(ends) == 1 and events[-1] == ends[0], text[-500:]
        return
    body = json.loads(text)
    if status >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert len(body["error"]["message"]) <= 1000
    else:
        assert "choices" in body or "status" in body, body


@pytest.fixture(scope="module")
def fuzz_server(setup):
    proc, port = _start(setup, max_tokens_limit=32, max_prompt_tokens=64, max_queue=8)
    yield port
    _stop(proc)


class Witness(threading.Thread):
    """Sends the WITNESS greedy requests in a loop; `bad` collects answers that differ from `want`."""

    def __init__(self, port: int, want: dict) -> None:
        super().__init__(daemon=True)
        self.port, self.want, self.bad, self.n, self.halt = port, want, [], 0, threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for model, prompt in WITNESS:
                got = _greedy(self.port, model, prompt)
                self.n += 1
                if got != self.want[(model, prompt)]:
                    self.bad.append((model, prompt, got))


def _greedy(port: int, model: str, prompt: str) -> object:
    status, _, out = _call(port, "POST", "/v1/completions",
                           {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    return out["choices"][0]["text"] if status == 200 else (status, out)


@pytest.fixture(scope="module")
def witness(fuzz_server):
    want = {(m, p): _greedy(fuzz_server, m, p) for m, p in WITNESS}  # alone, before anything else runs
    assert all(isinstance(v, str) for v in want.values()), want
    w = Witness(fuzz_server, want)
    w.start()
    yield w
    w.halt.set()
    w.join(60)
    assert w.n > 0 and not w.bad, w.bad[:3]


# -- the known client mistakes and bad adapters, each one request ----------------------------------------------------

def _deep(n: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * n + b"]" * n + b"}"


PROBES = [  # (path, raw body, status, words the message must hold)
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, ["content parts"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
                              "stream_options": "yes"}, 400, ["stream_options"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": [1]}, 400, ["stream_options"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", 400, ["JSON"]),
    ("/v1/completions", _deep(100_000), 400, ["JSON", "nested"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, ["JSON"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "false"}, 400, ["stream", "true or false"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "ignore_eos": "yes"}, 400, ["ignore_eos"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', 400, ["prompt", "surrogate"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["s" * 300]}, 400, ["stop"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, ["n = 1"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, ["only text"]),
    ("/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": "does-not-exist"}, 400, ["'ghost'", "adapter_config"]),
    ("/v1/load_lora_adapter", {"lora_name": "t1", "lora_path": "trunc"}, 400, ["'t1'", "adapter_model.safetensors"]),
    ("/v1/load_lora_adapter", {"lora_name": "c1", "lora_path": "badcfg"}, 400, ["'c1'"]),
    ("/v1/load_lora_adapter", {"lora_name": "n1", "lora_path": "nan"}, 400, ["'n1'", "NaN"]),
    ("/v1/load_lora_adapter", {"lora_name": "f1", "lora_path": "foreign"}, 400, ["'f1'", "base"]),
    ("/v1/load_lora_adapter", {"lora_name": "e1", "lora_path": "escape"}, 400, ["outside"]),
    ("/v1/load_lora_adapter", {"lora_name": "l1", "lora_path": "x" * 5000}, 400, ["too long"]),
    ("/v1/completions", {"model": "nan", "prompt": "x", "temperature": 1}, 400, ["'nan'", "NaN"]),
    ("/v1/completions", {"model": "trunc", "prompt": "x"}, 400, ["'trunc'"]),
    ("/v1/completions", {"model": "badcfg", "prompt": "x"}, 400, ["'badcfg'"]),
    ("/v1/completions", {"model": "foreign", "prompt": "x"}, 400, ["'foreign'"]),
    ("/v1/completions", {"model": "sneaky", "prompt": "x"}, 400, ["outside"]),
]


def test_probes(setup, fuzz_server, witness):
    secret = str(setup["root"].parent)
    for path, body, status, words in PROBES:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, data = _post(fuzz_server, path, raw)
        _check_answer(got, data, secret)
        msg = json.loads(data)["error"]["message"] if got >= 400 else ""
        assert got == status and all(w in msg for w in words), (path, raw[:100], got, msg)
    assert set(BAD) >= {"nan", "trunc", "badcfg", "foreign"}


def test_nan_adapter_beside_a_running_request(setup, fuzz_server, witness):
    """The NaN adapter at temperature 1 while a base request runs: 400 naming it; the base request is unchanged."""
    with cf.ThreadPoolExecutor(4) as pool:
        base = [pool.submit(_greedy, fuzz_server, "tiny", PROMPTS[2]) for _ in range(2)]
        nan = [pool.submit(_call, fuzz_server, "POST", "/v1/completions",
                           {"model": "nan", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1}) for _ in range(2)]
        for f in nan:
            status, _, out = f.result()
            assert status == 400 and "'nan'" in out["error"]["message"], out
        assert [f.result() for f in base] == [witness.want[("tiny", PROMPTS[2])]] * 2


def test_large_prompt_does_not_block_the_event_loop(fuzz_server, witness):
    """A 950 KB prompt is tokenized off the event loop: /health answers meanwhile, the prompt gets a 400."""
    body = json.dumps({"model": "tiny", "prompt": "The quick brown fox jumps over the lazy dog. " * 21_000}).encode()
    with cf.ThreadPoolExecutor(1) as pool:
        big = pool.submit(_post, fuzz_server, "/v1/completions", body)
        time.sleep(0.05)
        waits = []
        while not big.done():
            t = time.monotonic()
            assert _call(fuzz_server, "GET", "/health")[0] == 200
            waits.append(time.monotonic() - t)
        status, data = big.result()
    assert status == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded"
    assert waits and max(waits) < 0.25, waits


# -- fuzzing --------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
models = st.sampled_from(["tiny", "a0", "a1", "a2", "a3", "a4", "nan", "trunc", "badcfg", "foreign", "escape", "sneaky",
                          "../outside/secret", "/etc/passwd", "", "a9", ".hidden", "a0/../a1"])
texts = st.text(max_size=60) | st.sampled_from(PROMPTS)


def field(good: st.SearchStrategy) -> st.SearchStrategy:
    return good | json_values


part = st.fixed_dictionaries({"type": field(st.just("text")), "text": field(texts)})
message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
                                 "content": field(texts | st.lists(part, max_size=3))})
sampling = {
    "max_tokens": field(st.integers(-2, 40)),
    "max_completion_tokens": field(st.integers(-2, 40)),
    "temperature": field(st.floats(-1, 3, allow_nan=False)),
    "top_p": field(st.floats(-0.5, 1.5, allow_nan=False)),
    "stop": field(st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=17)),
    "seed": field(st.integers(-(2**70), 2**70)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "n": field(st.integers(0, 3)),
    "ignore_eos": field(st.booleans()),
}
completion = st.fixed_dictionaries({"model": field(models)},
                                   optional={"prompt": field(texts | st.lists(texts, max_size=2)), **sampling})
chat = st.fixed_dictionaries({"model": field(models)},
                             optional={"messages": field(st.lists(message, max_size=3)), **sampling})
adapter_names = st.sampled_from(["x1", "x2", "a0", "a4", "nan", "trunc", "tiny", "../a0", ""]) | json_values
lora = st.fixed_dictionaries({}, optional={"lora_name": adapter_names, "lora_path": field(models)})
good_sampling = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "seed": st.integers(-(2**70), 2**70), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), "ignore_eos": st.booleans(),
}
good_models = st.sampled_from(["tiny", "a0", "a2", "a3", "a4"])
good_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                      "content": texts | st.lists(st.fixed_dictionaries(
                                          {"type": st.just("text"), "text": texts}), min_size=1, max_size=2)})
good_completion = st.fixed_dictionaries({"model": good_models, "prompt": st.sampled_from(PROMPTS) | st.text(min_size=1),
                                         "max_tokens": st.integers(1, 8)}, optional=good_sampling)
good_chat = st.fixed_dictionaries({"model": good_models, "messages": st.lists(good_message, min_size=1, max_size=2),
                                   "max_tokens": st.integers(1, 8)}, optional=good_sampling)


@st.composite
def one_field_wrong(draw: st.DrawFn) -> tuple[str, dict]:
    """A valid request with one field replaced (or added) by arbitrary JSON."""
    path, body = draw(st.tuples(st.just("/v1/completions"), good_completion) |
                      st.tuples(st.just("/v1/chat/completions"), good_chat))
    key = draw(st.sampled_from(sorted({*body, *good_sampling, "n", "logprobs", "user"})))
    return path, {**body, key: draw(json_values)}


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), good_completion),
    st.tuples(st.just("/v1/chat/completions"), good_chat),
    one_field_wrong(),
    st.tuples(st.just("/v1/completions"), completion),
    st.tuples(st.just("/v1/chat/completions"), chat),
    st.tuples(st.sampled_from(ENDPOINTS[2:]), lora),
    st.tuples(st.sampled_from(ENDPOINTS), json_values),
    st.tuples(st.sampled_from(ENDPOINTS), st.binary(max_size=64)),
)


def test_fuzz_http_api(setup, fuzz_server, witness):
    secret = str(setup["root"].parent)
    seen: dict[int, int] = {}

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests)
    def one(req):
        path, body = req
        if isinstance(body, dict) and body.get("lora_name") == "a1":
            return  # loading another folder as the witness's adapter changes its answers legitimately
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, data = _post(fuzz_server, path, raw)
        seen[status] = seen.get(status, 0) + 1
        _check_answer(status, data, secret)

    one()
    assert seen.get(200, 0) >= 20 and sum(v for k, v in seen.items() if 400 <= k < 500) >= 50, seen
    assert _call(fuzz_server, "GET", "/health")[2]["ready"]
