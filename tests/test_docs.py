"""The user's guide and the settings page stay true to the code: the page of every setting is what
docs/settings_page.py makes of Config's comments, the README's test command is CI's, and no text marks rows with
footnote symbols instead of saying what they were measured on."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fattag.config import Config, StageSettings  # noqa: E402


def settings_page():
    spec = importlib.util.spec_from_file_location("settings_page", REPO / "docs" / "settings_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_page_matches_config():
    page = settings_page()
    assert (REPO / "docs" / "settings.md").read_text() == page.page(), \
        "docs/settings.md is stale: run .venv/bin/python docs/settings_page.py"
    assert page.main(["--check"]) == 0


def test_every_setting_has_a_comment_and_a_row():
    page = settings_page()
    source = page.CONFIG_SOURCE.read_text()
    text = (REPO / "docs" / "settings.md").read_text()
    for cls, names in ((Config, [f.name for f in dataclasses.fields(Config) if f.type != "StageSettings"]),
                       (StageSettings, [f.name for f in dataclasses.fields(StageSettings)])):
        comments = page.field_comments(source, cls.__name__)
        for name in names:
            assert comments[name][1], f"{cls.__name__}.{name} has no comment: the settings page needs one"
            row = f"`{name}`" if cls is Config else f"`noisy.{name}`, `curated.{name}`"
            assert f"| {row} |" in text, f"no row for {name} in docs/settings.md"


def test_field_comments_reads_the_comment_after_the_default():
    source = ("class Config:\n    # --- part one ---\n    a: int = 1  # the first\n    b: str = '#x'  # hash inside\n"
              "    # --- part two ---\n    c: float = 2.0\n")
    got = settings_page().field_comments(source, "Config")
    assert got == {"a": ("part one", "the first"), "b": ("part one", "hash inside"), "c": ("part two", "")}


def test_readme_test_command_is_what_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    command = ".venv/bin/python -m pytest -q"
    assert command in readme and command in ci
    assert len(readme.splitlines()) <= 150


@pytest.mark.parametrize("folder", ["README.md", "docs", "bench", "src", "tests"])
def test_no_footnote_markers(folder):
    markers = re.compile("[\u2020\u2021\u00a7\u00b6]")   # dagger, double dagger, section, pilcrow
    paths = [REPO / folder] if folder.endswith(".md") else sorted((REPO / folder).rglob("*.*"))
    hits = [f"{p.relative_to(REPO)}:{i}" for p in paths if p.suffix in (".md", ".py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if markers.search(line)]
    assert not hits, f"footnote markers (say what a figure was measured on instead): {hits[:5]}"
