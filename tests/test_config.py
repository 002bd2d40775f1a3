"""The sources file: validated, secrets only by reference, readers by path prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from headwater.config import ConfigError, load_sources, source_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "headwater.yaml"
    path.write_text(text)
    return path


def test_a_literal_secret_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "sources:\n- {name: wiki, type: confluence, "
                            "params: {api_token: hunter2}}\n")
    with pytest.raises(ConfigError) as raised:
        load_sources(path)
    assert "literal secret" in raised.value.log_message


def test_a_secret_reference_resolves_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "sources:\n- {name: wiki, type: confluence, "
                            "params: {api_token: {env: WIKI_TOKEN}}}\n")
    monkeypatch.setenv("WIKI_TOKEN", "t0ken")
    secret = source_config(path, "wiki").secret("api_token")
    assert secret.get_secret_value() == "t0ken"
    assert "t0ken" not in repr(secret)


def test_a_missing_environment_secret_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "sources:\n- {name: wiki, type: confluence, "
                            "params: {password: {env: HEADWATER_NOT_SET_ANYWHERE}}}\n")
    with pytest.raises(ConfigError, match="HEADWATER_NOT_SET_ANYWHERE"):
        source_config(path, "wiki").secret("password")


def test_the_longest_path_prefix_decides_the_readers(tmp_path: Path) -> None:
    path = _write(tmp_path, "sources:\n- name: docs\n  type: folder\n  params: {root: .}\n"
                            "  principals: {'': [group:staff], 'hr/': [group:hr],"
                            " 'hr/public/': [public]}\n")
    config = source_config(path, "docs")
    assert config.principals_for("a.md") == ["group:staff"]
    assert config.principals_for("hr/pay.csv") == ["group:hr"]
    assert config.principals_for("hr/public/jobs.html") == ["public"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources: [{name: Bad Name, type: folder}]", "is invalid"),
        ("sources: [{name: a, type: folder}, {name: a, type: folder}]", "more than once"),
        ("sources: [[", "is invalid"),
    ],
)
def test_a_malformed_sources_file_says_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sources(_write(tmp_path, text))


def test_an_unknown_source_lists_the_known_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "sources: [{name: docs, type: folder}]")
    with pytest.raises(ConfigError, match=r"known: \['docs'\]"):
        source_config(path, "wiki")
