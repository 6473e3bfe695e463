"""Accounts and keys (hashed at rest), signed artifacts, and the CLI's commands."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mediagate.access.accounts import SqliteAccountStore, hash_key
from mediagate.cli import main as cli
from mediagate.cli import service
from mediagate.settings import get_settings
from mediagate.stores.artifacts import LocalArtifactStore, load_or_create_secret
from tests.fakes import FakeClock


async def test_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    store = SqliteAccountStore(tmp_path / "state.db")
    account = store.ensure_account("alice", "plus")
    key = store.create_key(account.id)
    assert key.startswith("mg-") and len(key) > 30
    with sqlite3.connect(tmp_path / "state.db") as db:
        dump = "\n".join(db.iterdump())
    assert key not in dump and hash_key(key) in dump
    found = await store.authenticate(key)
    assert found is not None and (found.name, found.tier) == ("alice", "plus")
    assert await store.authenticate(key + "x") is None
    assert await store.authenticate("sk-other") is None


async def test_revoke_by_prefix(tmp_path: Path) -> None:
    store = SqliteAccountStore(tmp_path / "state.db")
    account = store.ensure_account("bob", "free")
    key = store.create_key(account.id)
    other = store.create_key(account.id)
    assert store.revoke(key[3:11])  # with or without the mg- prefix
    assert not store.revoke(key[:11])
    assert await store.authenticate(key) is None
    assert await store.authenticate(other) is not None
    assert [info.revoked for info in store.list_keys()] == [True, False]


def test_existing_account_keeps_its_tier(tmp_path: Path) -> None:
    store = SqliteAccountStore(tmp_path / "state.db")
    first = store.ensure_account("carol", "pro")
    again = store.ensure_account("carol", "free")
    assert again == first


def test_signing_secret_is_shared_and_private(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "key"
    assert load_or_create_secret(path) == load_or_create_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_artifact_sweep_removes_only_old_files(tmp_path: Path) -> None:
    clock = FakeClock(now=time.time() + 2 * 3600)  # two hours ahead of the file's mtime
    store = LocalArtifactStore(tmp_path, b"s" * 32, clock=clock)
    store.put(b"data", "png")
    assert store.delete_older_than(3600) == 1  # its real mtime is two hours behind the clock
    store2 = LocalArtifactStore(tmp_path, b"s" * 32)
    store2.put(b"data", "png")
    assert store2.delete_older_than(3600) == 0


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MEDIAGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_cli_keys_create_prints_the_key_last(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--tier", "pro", "--account", "dana"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("mg-")
    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key[:11] in listing and "dana" in listing and "pro" in listing and key not in listing
    assert cli.main(["keys", "revoke", key[:11]]) == 0
    assert cli.main(["keys", "revoke", key[:11]]) == 1
    assert "revoked" in capsys.readouterr().out


def test_cli_rejects_unknown_tier(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--tier", "gold"]) == 1
    assert "unknown tier 'gold'" in capsys.readouterr().err


def test_operator_adds_a_tier_in_the_tier_file(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tiers are names: a `team` tier in the file is usable without code."""
    import yaml

    from mediagate.access.tiers import load_tier_policy

    data = yaml.safe_load(
        Path(cli.__file__).parents[1].joinpath("configs").joinpath("tiers.yaml").read_text()
    )
    data["tiers"]["team"] = {**data["tiers"]["plus"], "images_per_day": 1000}
    home.mkdir(parents=True, exist_ok=True)
    tiers_file = home / "tiers.yaml"
    tiers_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MEDIAGATE_TIERS_FILE", str(tiers_file))
    get_settings.cache_clear()
    assert cli.main(["keys", "create", "--tier", "team", "--account", "acme"]) == 0
    assert cli.main(["accounts", "set-tier", "acme", "pro"]) == 0
    assert cli.main(["accounts", "set-tier", "acme", "team"]) == 0
    assert "now on tier team" in capsys.readouterr().out
    assert load_tier_policy(tiers_file).tiers["team"].images_per_day == 1000


def test_keys_create_backdated_and_usage(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            ["keys", "create", "--tier", "plus", "--account", "old", "--created-days-ago", "8"]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["usage", "old"]) == 0
    out = capsys.readouterr().out
    assert "tier plus, 8.0 days old" in out
    assert "images today" in out and "200" in out and "video jobs running" in out
    assert cli.main(["usage", "nobody"]) == 1
    assert cli.main(["accounts", "set-tier", "nobody", "pro"]) == 1


def test_effective_config_sets_host_port_and_home(tmp_path: Path) -> None:
    config = service.effective_config(None, "0.0.0.0", 9000, tmp_path)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9000}
    router, *models = config["applications"]
    assert router["import_path"] == "deployments.app:build_app"
    assert router["args"]["home"] == str(tmp_path) and router["args"]["models"] == []
    # download URLs on the address it serves on, never on a request's Host header
    assert router["args"]["router"]["public_base_url"] == "http://127.0.0.1:9000"
    public = service.effective_config(None, "0.0.0.0", 9000, tmp_path, "https://img.example")
    assert public["applications"][0]["args"]["router"]["public_base_url"] == "https://img.example"
    # each model an application of its own, sharing the router's home and routed by it
    assert [app["name"] for app in models] == ["model-tiny-sd-v1", "model-tiny-wan-v1"]
    assert all(app["args"]["home"] == str(tmp_path) for app in models)
    workers = [d for app in models for d in app["deployments"] if d["name"].startswith("TextTo")]
    assert len(workers) == 2 and all(d["ray_actor_options"]["num_gpus"] == 0 for d in workers)
    [entry] = [d for d in router["deployments"] if d["name"] == "Router"]
    routes = entry["user_config"]["live_models"]
    assert {model: route["app"] for model, route in routes.items()} == {
        "tiny-sd": "model-tiny-sd-v1",
        "tiny-wan": "model-tiny-wan-v1",
    }


def test_shipped_config_names_every_deployment_the_builder_makes(tmp_path: Path) -> None:
    """A GPU-less machine must override every worker (else it waits for a GPU forever)."""
    from autoscaling.naming import scheduler_name, worker_name
    from deployments.app import AppArgs
    from deployments.model_app import ModelAppArgs
    from deployments.scheduler.settings import VideoSchedulerSettings
    from models.catalog import load_catalog

    path = Path(cli.__file__).parents[1] / "configs" / "serve.yaml"
    router, *models = service.effective_config(str(path), "127.0.0.1", 8000, tmp_path)[
        "applications"
    ]
    AppArgs.model_validate(router["args"])
    configured: dict[str, Any] = {}
    for app in models:
        ModelAppArgs.model_validate(app["args"])
        configured |= {d["name"]: d for d in app["deployments"]}
    catalog = load_catalog()
    for spec in catalog.models.values():
        assert configured[worker_name(spec.task, spec.id)]["ray_actor_options"]["num_gpus"] == 0
        assert scheduler_name(spec.id) in configured
    video = configured["Scheduler-tiny-wan"]["user_config"]
    VideoSchedulerSettings.model_validate(video)
    [video_app] = [app for app in models if app["args"]["spec"]["id"] == "tiny-wan"]
    assert not set(video) & set(video_app["args"]["video"]), "a video setting declared twice"


def test_gpu_example_config_validates_against_serve_schema(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import AppArgs
    from deployments.model_app import ModelAppArgs

    for name in ("serve.yaml", "serve.gpu.yaml"):
        path = Path(cli.__file__).parents[1] / "configs" / name
        config = service.effective_config(str(path), "127.0.0.1", 8000, tmp_path)
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            if app["import_path"] == "deployments.app:build_app":
                AppArgs.model_validate(app["args"])
            else:
                ModelAppArgs.model_validate(app["args"])


def test_down_without_up_is_a_clear_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["down"]) == 1
    assert "no running mediagate" in capsys.readouterr().err


def test_every_operator_change_is_audited_without_secrets_and_files_are_private(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import stat

    from mediagate.cli.audit import recent_lines

    monkeypatch.setenv("MEDIAGATE_OPERATOR", "sre-erin")
    assert cli.main(["keys", "create", "--tier", "plus", "--account", "dana"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["accounts", "set-tier", "dana", "pro"]) == 0
    assert cli.main(["keys", "revoke", key[:11]]) == 0
    log = (home / "audit.log").read_text()
    entries = [json.loads(line) for line in log.splitlines()]
    changes = [change for entry in entries for change in entry["changes"]]
    assert changes == [
        f"created key {key[:11]}... for account dana (plus, role user)",
        "account dana: tier plus -> pro",
        f"revoked key {key[:11]}...",
    ]
    assert all(entry["by"] == "sre-erin" for entry in entries)
    assert key not in log and key[11:] not in "\n".join(recent_lines(10))
    assert any("tier plus -> pro" in line for line in recent_lines(10))  # shared copy
    for private in (home / "audit.log", home / "state.db"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_up_takes_an_http_public_url_only(capsys: pytest.CaptureFixture[str]) -> None:
    from mediagate.cli.main import build_parser

    parsed = build_parser().parse_args(["up", "--public-url", "https://img.example/"])
    assert parsed.public_url == "https://img.example"
    assert build_parser().parse_args(["up"]).public_url is None
    for bad in ("ftp://img.example", "img.example", "http://img.example/?a=1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", "--public-url", bad])
        assert "--public-url" in capsys.readouterr().err


def test_a_store_made_before_keys_had_roles_gets_the_role_column(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:  # the schema as it was: no role
        db.executescript(
            "CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, "
            "tier TEXT NOT NULL, created_at REAL NOT NULL);"
            "CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, prefix TEXT UNIQUE NOT NULL, "
            "account_id TEXT NOT NULL REFERENCES accounts(id), created_at REAL NOT NULL, "
            "revoked_at REAL);"
            "INSERT INTO accounts VALUES ('acct_1', 'old', 'plus', 1.0);"
            "INSERT INTO api_keys VALUES ('h', 'mg-00000000', 'acct_1', 1.0, NULL);"
        )
    store = SqliteAccountStore(path)
    assert [info.role for info in store.list_keys()] == ["user"]
    assert store.create_key("acct_1", role="operator").startswith("mg-")


def test_cli_creates_operator_keys_and_lists_roles(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["keys", "create", "--tier", "pro", "--account", "sre", "--role", "operator"]) == 0
    )
    assert "role operator" in capsys.readouterr().out
    assert cli.main(["keys", "list"]) == 0
    assert "operator" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses a role that does not exist
        cli.main(["keys", "create", "--tier", "pro", "--role", "root"])


def test_cli_webhooks_add_list_remove(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    assert cli.main(["keys", "create", "--tier", "pro", "--account", "erin"]) == 0
    # refused like POST /v1/webhooks: loopback is not allowed by default
    assert cli.main(["webhooks", "add", "erin", "http://127.0.0.1:9/hooks"]) == 1
    assert "loopback" in capsys.readouterr().err
    monkeypatch.setenv("MEDIAGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.1/32")
    get_settings.cache_clear()
    try:
        added = ["webhooks", "add", "erin", "http://127.0.0.1:9/hooks", "--event", "video.failed"]
        assert cli.main(added) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        secret = lines[-1]
        assert secret.startswith("whsec_")
        endpoint_id = lines[0].split()[1]
        assert cli.main(["webhooks", "list", "erin"]) == 0
        listing = capsys.readouterr().out
        assert endpoint_id in listing and "video.failed" in listing and secret not in listing
        assert cli.main(["webhooks", "remove", "erin", endpoint_id]) == 0
        assert cli.main(["webhooks", "remove", "erin", endpoint_id]) == 1
        assert cli.main(["webhooks", "list", "nobody"]) == 1
    finally:
        get_settings.cache_clear()
