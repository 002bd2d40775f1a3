"""Settings: one object, HEADWATER_-prefixed, documented in the README."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from headwater.settings import PROJECT_ROOT, Settings, env_value, settings_table


def test_defaults_run_the_stack_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("HEADWATER_")]:
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None)
    assert settings.weaviate_url == "http://127.0.0.1:8080"
    assert settings.prefect_api_url == "http://127.0.0.1:4200/api"
    assert settings.resolved_state_db_url.startswith("sqlite:///")


def test_environment_overrides_use_the_headwater_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATER_WEAVIATE_HTTP_PORT", "18080")
    monkeypatch.setenv("HEADWATER_DATA_DIR", "/srv/headwater")
    monkeypatch.setenv("HEADWATER_WEAVIATE_API_KEY", "s3cret")
    settings = Settings()
    assert settings.weaviate_http_port == 18080
    assert settings.data_dir == Path("/srv/headwater")
    assert "s3cret" not in repr(settings)
    assert settings.weaviate_api_key.get_secret_value() == "s3cret"


def test_readme_configuration_table_is_generated_from_the_settings() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert settings_table() in readme, "run `headwater config --markdown` and paste it in README"


def test_every_setting_reads_back_what_headwater_config_prints(
        monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    for name, value in defaults.model_dump().items():
        if value is not None:
            monkeypatch.setenv(f"HEADWATER_{name.upper()}", env_value(value))
    assert Settings().model_dump() == defaults.model_dump()
