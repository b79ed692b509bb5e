"""Publishing sinks and secrets. The Hub sink runs the real `huggingface_hub` client against
FakeHub, a local test double of the Hub's HTTP API (tests/support/fake_hub.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

from jobs.settings import Settings
from tests.support.fake_hub import FakeHub, Token
from workers.secrets import SecretNotFoundError, env_name, resolve_secret
from workers.sinks import PublishError, find_existing, publish, resolve_destination

WRITE, READ = "hf_write_0123456789abcdef", "hf_read_0123456789abcdef"
SPEC = {"model_id": "HuggingFaceTB/SmolLM2-135M", "method": "gptq", "bits": 4, "group_size": 64}


def fake_artifact(path: Path, payload: str = "weights") -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload.encode() * 100)
    (path / "config.json").write_text("{}")
    (path / "README.md").write_text("---\nbase_model: x/y\n---\n# card\n")
    (path / "manifest.json").write_text(json.dumps({"files": {}, "payload": payload}))
    return path


def test_secret_from_env_then_file(tmp_path, monkeypatch):
    assert env_name("hub-token") == "QF_SECRET_HUB_TOKEN"
    assert env_name("team.a/b") == "QF_SECRET_TEAM_A_B"
    monkeypatch.setenv("QF_SECRETS_DIR", str(tmp_path))
    (tmp_path / "hub-token").write_text("from-file\n")
    assert resolve_secret("hub-token") == "from-file"
    monkeypatch.setenv("QF_SECRET_HUB_TOKEN", "from-env")
    assert resolve_secret("hub-token") == "from-env"
    with pytest.raises(SecretNotFoundError) as e:
        resolve_secret("other")
    assert "'other'" in str(e.value) and "QF_SECRET_OTHER" in str(e.value)
    assert str(tmp_path / "other") in str(e.value) and "from-env" not in str(e.value)


def test_default_repo_name():
    d = resolve_destination({"kind": "hub", "namespace": "acme", "repo_id": None}, SPEC)
    assert d["repo_id"] == "acme/SmolLM2-135M-gptq-w4g64"
    assert d["private"] is True and d["branch"] == "main"
    d = resolve_destination({"kind": "hub", "repo_id": "acme/custom"}, SPEC)
    assert d["repo_id"] == "acme/custom"


def test_local_sink_renames_once(tmp_path):
    settings = Settings(home=tmp_path / "home")
    staged = fake_artifact(tmp_path / "staging" / "job1")
    assert find_existing({"kind": "local"}, "job1", settings) is None
    p = publish({"kind": "local"}, staged, "job1", "summary", settings)
    target = settings.artifact_dir / "job1"
    assert not staged.exists() and (target / "model.safetensors").exists()
    assert p.location == str(target) and p.url.startswith("file://")
    assert find_existing({"kind": "local"}, "job1", settings) == p
    # A second attempt finds the first one's artifact and keeps it.
    again = publish({"kind": "local"}, fake_artifact(staged, "other"), "job1", "s", settings)
    assert again == p and "weights" in (target / "manifest.json").read_text()


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub({WRITE: Token("alice", orgs=("acme",)), READ: Token("bob", write=False)})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    # The tests' process is offline for model loading; this client talks to the double.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.stop()


def test_hub_publishes_one_commit_and_finds_it_again(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("QF_SECRET_HUB_TOKEN", WRITE)
    settings = Settings(home=tmp_path / "home")
    art = fake_artifact(tmp_path / "art")
    dest = {"kind": "hub", "repo_id": "acme/tiny-rtn", "branch": "release", "private": True}
    seen = []
    p = publish(dest, art, "job42", "tiny rtn w4", settings, lambda d, n, m: seen.append(m), "{}")
    repo = hub.repos["acme/tiny-rtn"]
    assert repo.private and set(repo.branches) == {"main", "release"}
    files = hub.files("acme/tiny-rtn", "release")
    for f in art.iterdir():
        assert files[f.name] == f.read_bytes()
    top = hub.history("acme/tiny-rtn", "release")[0]
    assert p.commit == top.oid and p.url.endswith(f"/acme/tiny-rtn/commit/{top.oid}")
    assert "job42" in top.title and "quantfoundry-job: job42" in top.description
    assert any("committing" in m for m in seen)
    # The retry after a crash: the commit is found by job id, nothing is committed again.
    n = len(hub.commits)
    assert find_existing(dest, "job42", settings) == p
    assert publish(dest, art, "job42", "tiny rtn w4", settings) == p
    assert len(hub.commits) == n
    assert find_existing(dest, "another-job", settings) is None
    assert not hub.unhandled


def test_hub_read_only_token_fails_clearly(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("QF_SECRET_HUB_TOKEN", READ)
    dest = {"kind": "hub", "repo_id": "acme/tiny", "token_secret": "hub-token"}
    with pytest.raises(PublishError) as e:
        publish(dest, fake_artifact(tmp_path / "a"), "j", "s", Settings(home=tmp_path))
    msg = str(e.value)
    assert "token in secret 'hub-token' has no write access to acme/tiny" in msg
    assert "403" in msg and READ not in msg
    assert not hub.repos


def test_hub_missing_secret_and_offline_mode(hub, tmp_path, monkeypatch):
    dest = {"kind": "hub", "repo_id": "acme/tiny", "token_secret": "nowhere"}
    monkeypatch.setenv("QF_SECRETS_DIR", str(tmp_path))
    with pytest.raises(PublishError, match="secret 'nowhere' is not configured.*QF_SECRET_NOWHERE"):
        publish(dest, fake_artifact(tmp_path / "a"), "j", "s", Settings(home=tmp_path))
    monkeypatch.setenv("QF_SECRET_NOWHERE", WRITE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        find_existing(dest, "j", Settings(home=tmp_path))
