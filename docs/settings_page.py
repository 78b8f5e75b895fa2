"""Writes docs/settings.md, the page of every setting, from `Config`'s and `StageSettings`' own field comments.

    .venv/bin/python docs/settings_page.py          # rewrite docs/settings.md
    .venv/bin/python docs/settings_page.py --check  # exit 1 when docs/settings.md differs from the code

A test runs the check, so the page and the code cannot drift apart.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fattag.config import PRESETS, STAGES, Config, StageSettings  # noqa: E402

CONFIG_SOURCE = REPO / "src" / "fattag" / "config.py"
PAGE = REPO / "docs" / "settings.md"


def field_comments(source: str, class_name: str) -> dict:
    """{field: (section, comment)} of a dataclass in `source`: the `# ...` after each field, and the `# --- x ---`
    heading above it."""
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out, section = {}, ""
    for node in cls.body:
        for line in lines[cls.lineno:node.lineno - 1][::-1]:   # the nearest heading above this field
            if line.strip().startswith("# ---"):
                section = line.strip().strip("#- ").strip()
                break
        if isinstance(node, ast.AnnAssign):
            line = lines[node.lineno - 1]
            tail = line[node.end_col_offset:]   # after the default value, so a "#" inside it is not a comment
            comment = tail.split("#", 1)[1].strip() if "#" in tail else ""
            out[node.target.id] = (section, comment)
    return out


def _value(v) -> str:
    return f"`{v!r}`" if not isinstance(v, str) else f'`"{v}"`'


def preset_values(name: str) -> str:
    """The presets that set `name`, with their values."""
    return ", ".join(f"{p}: {_value(values[name])}" for p, values in PRESETS.items() if name in values) or "–"


def page() -> str:
    source = CONFIG_SOURCE.read_text()
    top, stage = field_comments(source, "Config"), field_comments(source, "StageSettings")
    cfg = Config()
    out = ["Every setting of a run, with its default and the presets that change it: `--set name=value` overrides "
           "any of them.", "",
           "Generated from the field comments in `src/fattag/config.py` by `.venv/bin/python docs/settings_page.py`;"
           " do not edit by hand (a test fails when this page and the code differ).", ""]
    section = None
    for f in dataclasses.fields(Config):
        sec, comment = top[f.name]
        if f.name in STAGES:
            continue
        if sec != section:
            section = sec
            out += ["", f"## {sec[:1].upper() + sec[1:]}", "", "| setting | default | presets | what it does |",
                    "|---|---|---|---|"]
        out.append(f"| `{f.name}` | {_value(getattr(cfg, f.name))} | {preset_values(f.name)} | {comment} |")
    out += ["", "## Per stage: `noisy.x` (stage 1) and `curated.x` (stage 2)", "",
            "Each stage has its own `StageSettings`; the noisy-clip scorer and the pseudo-label round train with "
            "stage 2's (`curated`).", "",
            "| setting | default noisy / curated | presets | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(StageSettings):
        names = [f"{s}.{f.name}" for s in STAGES]
        default = " / ".join(_value(getattr(getattr(cfg, s), f.name)) for s in STAGES)
        presets = "; ".join(f"`{n}` {preset_values(n)}" for n in names if preset_values(n) != "–") or "–"
        out.append(f"| `{names[0]}`, `{names[1]}` | {default} | {presets} | {stage[f.name][1]} |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is not what the code says")
    args = p.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run .venv/bin/python docs/settings_page.py", file=sys.stderr)
            return 1
        print(f"{PAGE} matches the code")
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
