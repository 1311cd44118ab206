"""The README must keep telling the truth about configuration and commands."""

from __future__ import annotations

from pathlib import Path

from fxproxy.configdoc import config_table

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_configuration_table_matches_the_settings_models() -> None:
    assert config_table() in README, "regenerate with: .venv/bin/python -m fxproxy.configdoc"


def test_readme_quick_start_names_the_ci_test_command() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README and "make demo" in README
