import pytest

from memllm_cli.config import load_settings
from memllm_cli.errors import ConfigError


def test_flags_beat_environment_beat_config_file(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('model = "from-file"\nmemory = "file-memory"\npool_size = 2048\nlock_timeout = 5\n')
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    settings = load_settings()
    assert (settings.model, settings.memory, settings.pool_size, settings.lock_timeout) == (
        "from-file", "file-memory", 2048, 5
    )
    monkeypatch.setenv("MEMLLM_MODEL", "from-env")
    monkeypatch.setenv("MEMLLM_MEMORY", "env-memory")
    assert (load_settings().model, load_settings().memory) == ("from-env", "env-memory")
    flagged = load_settings(model="from-flag", memory="flag-memory")
    assert (flagged.model, flagged.memory) == ("from-flag", "flag-memory")


def test_defaults_and_home(isolated_home):
    settings = load_settings()
    assert settings.memory == "default" and settings.model is None and settings.home == isolated_home


def test_bad_config_files_are_clear_errors(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    config.write_text("modle = 'typo'\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) in .*: modle"):
        load_settings()
    config.write_text("model = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings()
