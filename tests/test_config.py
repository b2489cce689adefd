"""Tests for node configuration (defaults < YAML < MYCELLM_* env < flags) and the CLI's config errors."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mycellm.config import BUNDLED_MODEL, ModelSettings, load_settings
from mycellm.errors import ConfigError

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MYCELLM_"):
            monkeypatch.delenv(name)


def write_yaml(directory: Path, text: str, name: str = "node.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return caught.value


# -- load_settings ------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8420
    assert settings.quic_port == 8421
    assert settings.data_dir == Path("~/.mycellm")
    assert settings.model is None
    assert settings.models == (ModelSettings(),)
    assert settings.models[0].backend == "llama_cpp"
    assert settings.models[0].path == BUNDLED_MODEL
    assert settings.log_level == "INFO"
    assert settings.node_name


def test_yaml_file_sets_values(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "port: 9100\nnode_name: yaml-node\nlog_level: DEBUG\n")
    settings = load_settings(path)
    assert (settings.port, settings.node_name, settings.log_level) == (9100, "yaml-node", "DEBUG")


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path, "port: 9100\nnode_name: yaml-node\n")
    monkeypatch.setenv("MYCELLM_PORT", "9200")
    settings = load_settings(path)
    assert settings.port == 9200
    assert settings.node_name == "yaml-node"  # the env does not touch what it does not set


def test_explicit_overrides_beat_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path, "port: 9100\nhost: 0.0.0.0\n")
    monkeypatch.setenv("MYCELLM_PORT", "9200")
    settings = load_settings(path, port=9300, host=None)
    assert settings.port == 9300
    assert settings.host == "0.0.0.0"  # a None override means "not given"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCELLM_CONFIG", str(write_yaml(tmp_path, "port: 9400\n")))
    assert load_settings().port == 9400


def test_yaml_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path, "port: 9100\n")).port == 9100
    assert load_settings().port == 8420


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path, "")).port == 8420


def test_nested_env_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    models = [
        {
            "backend": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "upstream_models": ["gpt-x"],
            "tier": "capable",
        },
        {"path": "/models/a.gguf", "tags": ["code"]},
    ]
    monkeypatch.setenv("MYCELLM_MODELS", json.dumps(models))
    settings = load_settings()
    assert len(settings.models) == 2
    assert settings.models[0].backend == "openai"
    assert settings.models[0].upstream_models == ("gpt-x",)
    assert settings.models[0].tier == "capable"
    assert settings.models[1].path == "/models/a.gguf"
    assert settings.models[1].tags == ("code",)


def test_nested_yaml_models(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "models:\n  - path: /m/one.gguf\n    context_tokens: 4096\n")
    (entry,) = load_settings(path).models
    assert (entry.path, entry.context_tokens) == ("/m/one.gguf", 4096)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=write_yaml(tmp_path, "port: [1\n"))
    assert error.param == "config"
    assert "not valid YAML" in error.message


def test_non_mapping_yaml_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=write_yaml(tmp_path, "- port\n- 8420\n"))
    assert error.param == "config"
    assert "mapping" in error.message


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=tmp_path / "absent.yaml")
    assert error.param == "config"
    assert "cannot read" in error.message


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (for whom chmod 000 would not stop a read).
    error = config_error(config_file=tmp_path)
    assert error.param == "config"
    assert "cannot read" in error.message


@pytest.mark.parametrize("value", ["abc", "0", "65536", "99999"])
def test_bad_port_from_yaml(tmp_path: Path, value: str) -> None:
    error = config_error(config_file=write_yaml(tmp_path, f'port: "{value}"\n'))
    assert error.param == "port"
    assert error.message.startswith("port: ")


def test_bad_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCELLM_PORT", "99999")
    error = config_error()
    assert error.param == "port"


def test_unknown_field_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=write_yaml(tmp_path, "prot: 8420\n"))
    assert error.param == "prot"
    assert "prot" in error.message


def test_unknown_model_field_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=write_yaml(tmp_path, "models:\n  - path: a.gguf\n    layers: 3\n"))
    assert error.param == "models.0.layers"


def test_openai_backend_without_base_url_is_a_config_error(tmp_path: Path) -> None:
    error = config_error(config_file=write_yaml(tmp_path, "models:\n  - path: a.gguf\n  - backend: openai\n"))
    assert error.param == "models.1"
    assert "base_url" in error.message


def test_bad_base_url_scheme_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCELLM_MODELS", json.dumps([{"backend": "openai", "base_url": "ftp://host"}]))
    error = config_error()
    assert "base_url" in error.message


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


def test_model_shortcut_replaces_the_first_local_entry() -> None:
    models = [
        {"path": "/m/first.gguf"},
        {"backend": "openai", "base_url": "https://api.example/v1"},
        {"path": "/m/second.gguf"},
    ]
    settings = load_settings(model="/m/shortcut.gguf", models=models)
    entries = settings.model_entries
    assert [entry.backend for entry in entries] == ["llama_cpp", "openai"]
    assert entries[0].path == "/m/shortcut.gguf"
    assert entries[1].base_url == "https://api.example/v1"


def test_model_entries_without_shortcut_are_the_models() -> None:
    settings = load_settings(models=[{"path": "/m/a.gguf"}, {"path": "/m/b.gguf"}])
    assert [entry.path for entry in settings.model_entries] == ["/m/a.gguf", "/m/b.gguf"]


def test_database_url_defaults_to_sqlite_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "node")
    assert settings.resolved_data_dir == (tmp_path / "node").resolve()
    assert (
        settings.resolved_database_url
        == f"sqlite+aiosqlite:///{(tmp_path / 'node').resolve() / 'mycellm.db'}"
    )


def test_database_url_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCELLM_DATABASE_URL", "postgresql+asyncpg://u@127.0.0.1:5/db")
    assert load_settings(data_dir=tmp_path).resolved_database_url == "postgresql+asyncpg://u@127.0.0.1:5/db"


def test_a_node_without_models_relays_and_peer_addresses_are_checked() -> None:
    relay = load_settings(models=[], bootstrap_peers=["seed.example.org:8421", "[::1]:9"])
    assert relay.model_entries == ()
    assert relay.resolved_advertise_address == "127.0.0.1:8421"
    assert load_settings(host="0.0.0.0").resolved_advertise_address is None
    assert load_settings(quic_port=0).resolved_advertise_address is None  # filled in once bound
    assert (
        load_settings(advertise_address="node.example.org:7").resolved_advertise_address
        == "node.example.org:7"
    )
    error = config_error(bootstrap_peers=["no-port"])
    assert "'no-port' is not host:port" in error.message
    assert "not host:port" in config_error(advertise_address="host:99999").message
    assert config_error(heartbeat_misses=0).param == "heartbeat_misses"


# -- the command line ---------------------------------------------------------------------------


def run_cli(*arguments: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MYCELLM_")}
    environment.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **env)
    return subprocess.run(
        [sys.executable, "-m", "mycellm", *arguments],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def single_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_serve_with_bad_config_file_exits_2_naming_port(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, 'port: "abc"\n', name="bad.yaml")
    result = run_cli("serve", "--config", str(config), home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "port" in single_error_line(result)


def test_cli_serve_with_bad_env_port_exits_2_naming_port(tmp_path: Path) -> None:
    result = run_cli("serve", home=tmp_path, MYCELLM_PORT="99999")
    assert result.returncode == 2, result.stderr
    assert "port" in single_error_line(result)


def test_cli_serve_with_missing_model_exits_2_naming_model(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--model", "/nonexistent.gguf", "--data-dir", str(tmp_path / "d"), home=tmp_path
    )
    assert result.returncode == 2, result.stderr
    line = single_error_line(result)
    assert "model" in line
    assert "/nonexistent.gguf" in line
    assert not (tmp_path / "d").exists()  # it failed before doing anything


def test_cli_account_show_keeps_one_identity(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = run_cli("account", "show", "--data-dir", str(data_dir), home=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("account", "show", "--data-dir", str(data_dir), home=tmp_path)
    assert second.returncode == 0, second.stderr

    def peer_id(output: str) -> str:
        match = re.search(r"^peer id:\s+([0-9a-f]{64})$", output, re.MULTILINE)
        assert match is not None, output
        return match.group(1)

    assert peer_id(first.stdout) == peer_id(second.stdout)
    key_files = sorted((data_dir / "identity").iterdir())
    assert [path.name for path in key_files] == ["account.key", "device.cert", "device.key"]
    for path in key_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_cli_account_show_with_bad_config_exits_2(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "- not a mapping\n", name="list.yaml")
    result = run_cli(
        "account", "show", "--config", str(config), "--data-dir", str(tmp_path / "d"), home=tmp_path
    )
    assert result.returncode == 2
    assert "mapping" in single_error_line(result)
    assert not (tmp_path / "d").exists()
