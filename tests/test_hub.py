"""resolve_hub finds models in huggingface_hub's cache and never needs the network offline."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.hf_api
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

import engine.loader.hub as hub
from engine.loader.hf_loader import load_hf_dir
from engine.loader.hub import hub_cache_dir, resolve_hub
from tiny_models import build_tiny_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the Hugging Face Hub")
    for name in ("repo_info", "model_info", "list_repo_tree"):
        monkeypatch.setattr(huggingface_hub.hf_api.HfApi, name, refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_repo(cache: Path, repo_id: str, model_dir: Path, commit: str = COMMIT) -> Path:
    """Lay model_dir out the way snapshot_download does: blobs, symlinked snapshot files, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_cached_repo_resolves_to_its_snapshot_and_loads(hf_home, tmp_path):
    model_dir, model = build_tiny_model_dir("qwen2", tmp_path / "build")
    snapshot = cache_repo(hf_home / "hub", "tiny-org/tiny-qwen2", model_dir)
    path = resolve_hub("tiny-org/tiny-qwen2")
    assert Path(path) == snapshot
    source = load_hf_dir(path)
    assert source.config.architecture == "Qwen2ForCausalLM"
    assert source.num_tensors == len(model.state_dict())


def test_offline_commit_revision_resolves_without_refs(hf_home, tmp_path):
    model_dir, _ = build_tiny_model_dir("llama", tmp_path / "build")
    snapshot = cache_repo(hf_home / "hub", "tiny-org/tiny-llama", model_dir)
    assert Path(resolve_hub("tiny-org/tiny-llama", revision=COMMIT)) == snapshot


def test_cache_location_follows_hf_home_read_at_call_time(hf_home, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    other_home = tmp_path / "other-home"
    monkeypatch.setenv("HF_HOME", str(other_home))
    assert hub_cache_dir() == other_home / "hub"
    model_dir, _ = build_tiny_model_dir("qwen3", tmp_path / "build")
    snapshot = cache_repo(other_home / "hub", "tiny-org/tiny-qwen3", model_dir)
    assert Path(resolve_hub("tiny-org/tiny-qwen3")) == snapshot


def test_offline_uncached_repo_raises_one_line_runtime_error(hf_home):
    with pytest.raises(RuntimeError) as error:
        resolve_hub("tiny-org/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert message == ("model tiny-org/not-downloaded is not in the Hugging Face cache (HF_HUB_OFFLINE=1); "
                       "download it once with network access or use --w DIR")


def test_unreachable_hub_and_uncached_repo_raises_runtime_error(hf_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ...")
    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(RuntimeError, match=r"^model org/name is not in the Hugging Face cache "
                                           r"\(the Hub could not be reached\); .* use --w DIR$"):
        resolve_hub("org/name")


def test_online_call_passes_token_patterns_and_cache_from_env(hf_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return "/snapshots/x"
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert resolve_hub("org/name", revision="v1") == "/snapshots/x"
    (repo_id, kwargs), = calls
    assert repo_id == "org/name" and kwargs["revision"] == "v1"
    assert kwargs["token"] == "hf_test_token" and kwargs["local_files_only"] is False
    assert kwargs["cache_dir"] == hf_home / "hub"
    assert {"*.json", "*.jinja", "model*.safetensors"} <= set(kwargs["allow_patterns"])


def test_invalid_repo_id_is_a_value_error(hf_home):
    with pytest.raises(ValueError, match="not a valid Hugging Face model id"):
        resolve_hub("not//valid")
