"""Hub ids: a model named `org/name` is fetched through huggingface_hub and recorded by its name, so an adapter
trained on it rebuilds its base anywhere. The hub is faked here (this machine is offline); the rest is real."""

from __future__ import annotations

import pytest

from restora.adapters.files import read_provenance
from restora.cli import main

TRAIN = ["--task", "sql", "--max-samples", "8", "--batch-size", "4", "--micro-batch-size", "4", "--val-samples", "2",
         "--max-len", "64", "--max-steps", "1", "--format", "rtn", "--bits", "4", "--rank", "2", "--no-bf16"]


@pytest.fixture
def fake_hub(monkeypatch, tiny_dir):
    import huggingface_hub

    calls: list[tuple[str, tuple[str, ...]]] = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        calls.append((repo_id, tuple(allow_patterns or ())))
        if repo_id != "org/tiny-llama":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything else that reaches for the hub fails at once
    return calls


def test_train_and_eval_on_a_hub_id(fake_hub, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["train", "org/tiny-llama", "--out", str(out), *TRAIN]) == 0
    assert read_provenance(out)["base_model"] == "org/tiny-llama"  # the name, not this machine's cache path
    assert main(["eval", "org/tiny-llama", "--adapter", str(out), "--bits", "8", "--format", "rtn", "--limit", "2",
                 "--no-generate"]) == 0
    assert "log loss" in capsys.readouterr().out
    assert {repo for repo, _ in fake_hub} == {"org/tiny-llama"}
    assert all("*.safetensors" in patterns and "*.bin" not in patterns for _, patterns in fake_hub)  # no pickle


def test_a_hub_id_that_cannot_be_fetched_is_one_line(fake_hub, tmp_path, capsys):
    assert main(["train", "org/no-such-model", "--out", str(tmp_path / "a"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "could not fetch 'org/no-such-model' from the Hugging Face Hub" in err
