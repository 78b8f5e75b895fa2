"""The Kaggle kernel bundle (build_kernel.py -> kernel/kernel.py): deterministic, self-contained, in sync.

Everything here runs on CPU in seconds except the `slow` end-to-end test, which trains a tiny model
twice (bundle and src/run.py) and compares the two submission.csv files.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# The spec, written out here on purpose rather than imported from build_kernel.py.
ALLOWED = set(sys.stdlib_module_names) | {"torch", "torchaudio", "fastai", "fastcore", "fastprogress",
                                          "numpy", "pandas", "tqdm", "matplotlib", "soundfile", "fattag"}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bk = _load(REPO / "build_kernel.py", "build_kernel")


def load_kernel(path: Path):
    """Import a built kernel.py without running it (its start code sits under `__name__ == "__main__"`)."""
    return _load(path, f"kernel_under_test_{abs(hash(str(path)))}")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def run_bundle(kernel: Path, *args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(kernel), *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def imports_of(source: str, filename: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


# --- build: deterministic, metadata, options -----------------------------------------------------
def test_two_builds_are_byte_identical(tmp_path):
    a = bk.build(tmp_path / "a")
    b = bk.build(tmp_path / "b")
    assert sorted(a) == ["kernel-metadata.json", "kernel.py"]
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    kernel = a["kernel.py"].read_bytes()
    assert b"\r" not in kernel
    assert kernel.startswith(b"# GENERATED FILE -- DO NOT EDIT BY HAND.\n# Built by `python build_kernel.py")


def test_bundle_does_not_depend_on_where_the_sources_live(tmp_path):
    import shutil
    shutil.copytree(SRC, tmp_path / "elsewhere" / "src", ignore=shutil.ignore_patterns("__pycache__"))
    here = bk.render(SRC)
    there = bk.render(tmp_path / "elsewhere" / "src")
    assert here == there


def test_train_metadata(tmp_path):
    bk.build(tmp_path, kernel_id="someone/fat2019-fattag", title="FAT2019 fattag")
    meta = json.loads((tmp_path / "kernel-metadata.json").read_text())
    assert meta == {
        "id": "someone/fat2019-fattag", "title": "FAT2019 fattag", "code_file": "kernel.py",
        "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": True,
        "enable_internet": False, "machine_shape": "NvidiaTeslaT4",
        "competition_sources": ["freesound-audio-tagging-2019"], "dataset_sources": [], "kernel_sources": [],
    }
    kernel = load_kernel(tmp_path / "kernel.py")
    assert kernel.BAKED_DEFAULTS == {"mode": "train", "preset": "kaggle-1h"}


def test_predict_mode_needs_a_weights_dataset(tmp_path, capsys):
    with pytest.raises(bk.BuildError, match="--weights-dataset"):
        bk.render(mode="predict")
    assert bk.main(["--out", str(tmp_path / "k"), "--mode", "predict"]) != 0
    assert "--weights-dataset" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_predict_mode_lists_the_weights_dataset(tmp_path):
    assert bk.main(["--out", str(tmp_path), "--mode", "predict", "--weights-dataset", "someone/fattag-weights"]) == 0
    meta = json.loads((tmp_path / "kernel-metadata.json").read_text())
    assert meta["dataset_sources"] == ["someone/fattag-weights"]
    assert meta["competition_sources"] == ["freesound-audio-tagging-2019"]
    kernel = load_kernel(tmp_path / "kernel.py")
    assert kernel.BAKED_DEFAULTS["mode"] == "predict"
    assert "/kaggle/input/fattag-weights" in kernel.BAKED_DEFAULTS.values()
    assert "--mode predict" in (tmp_path / "kernel.py").read_text().splitlines()[1]
    assert set(kernel.BAKED_DEFAULTS) <= bk.cli_options(bk.collect_sources(SRC)), "baked keys must be CLI options"


def test_bad_options_are_rejected():
    with pytest.raises(bk.BuildError, match="OWNER/SLUG"):
        bk.render(kernel_id="no-owner")
    with pytest.raises(bk.BuildError, match="preset"):
        bk.render(preset="no-such-preset")


# --- contents of the bundle ----------------------------------------------------------------------
def test_bundle_embeds_every_source_verbatim(tmp_path):
    files = bk.build(tmp_path)
    kernel = load_kernel(files["kernel.py"])
    expected = {"src/run.py": (SRC / "run.py").read_text()}
    for path in (SRC / "fattag").rglob("*.py"):
        if "__pycache__" not in path.parts:
            expected["src/" + path.relative_to(SRC).as_posix()] = path.read_text()
    assert kernel.SOURCES == expected
    assert list(kernel.SOURCES) == sorted(expected)
    assert kernel.BUILD_HASH == kernel.source_hash(kernel.SOURCES) == bk.source_hash(expected)
    assert re.fullmatch(r"[0-9a-f]{12}", kernel.BUILD_HASH)


AWKWARD = {  # sources that the verbatim raw literal cannot hold, or only just
    "both triple quotes": 'A = """one"""\nB = \'\'\'two\'\'\'\n',
    "ends in a backslash": 'PATH = r"C:\\dir"  # \\',
    "ends in a quote": 'X = 1\nY = "a"',
    "raw escapes": 'RE = r"\\d+\\s*\\\\"\nNL = "\\n"\n',
    "non-ascii and tabs": '# caf\u00e9 \u2014 \u00b5s\nY = "\t\u00fc"\nif Y:\n\tZ = 1\n',
    "no final newline": 'Z = 3',
    "empty": '',
    "starts with a quote": '"""Doc."""\nW = 4\n',
}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_literal_round_trips_awkward_sources(name):
    text = AWKWARD[name]
    assert ast.literal_eval(bk._literal(text)) == "\n" + text


def test_awkward_sources_are_embedded_verbatim_and_run(tmp_path):
    files = {f"fattag/m{i}.py": text for i, text in enumerate(AWKWARD.values())}
    files["fattag/__init__.py"] = '"""pkg"""\n'
    files["run.py"] = ("import sys\n\ndef main(argv=None, defaults=None):\n"
                       + "".join(f"    import fattag.m{i}\n" for i in range(len(AWKWARD)))
                       + "    print('ALL', fattag.m0.A, fattag.m0.B, fattag.m3.NL == chr(10))\n    return 0\n")
    src = tmp_path / "src"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(text.encode("utf-8"))
    built = bk.build(tmp_path / "out", src)
    kernel = load_kernel(built["kernel.py"])
    assert kernel.SOURCES == {f"src/{rel}": text for rel, text in sorted(files.items())}
    proc = run_bundle(built["kernel.py"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ALL one two True" in proc.stdout


def test_bundle_imports_only_the_kaggle_image(tmp_path):
    files = bk.build(tmp_path)
    kernel_text = files["kernel.py"].read_text()
    modules = dict(load_kernel(files["kernel.py"]).SOURCES)
    modules["kernel.py"] = kernel_text
    assert len(modules) > 3
    bad = [f"{name}:{line}: import {root}" for name, text in modules.items()
           for line, root in imports_of(text, name) if root not in ALLOWED]
    assert not bad, "imports outside the stdlib + Kaggle allowlist:\n" + "\n".join(bad)


def test_kernel_runtime_writes_no_files_and_starts_no_processes(tmp_path):
    files = bk.build(tmp_path)
    text = files["kernel.py"].read_text()
    runtime = text[:text.index("# ==== embedded sources")] + text[text.index("# ==== start"):]
    tree = ast.parse(runtime)
    roots = {root for _, root in imports_of(runtime, "kernel.py")}
    assert roots <= {"hashlib", "importlib", "linecache", "sys", "traceback"}, roots
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"open", "system", "popen", "execv", "spawn"}, calls


def test_committed_kernel_matches_the_sources():
    problems = bk.check(REPO / "kernel", SRC)
    assert not problems, ("kernel/ is out of date with src/: " + "; ".join(problems)
                          + ". Run `python build_kernel.py` and commit kernel/.")


def test_check_flag_reports_a_stale_kernel(tmp_path, capsys):
    src = write_tree(tmp_path / "src", {"fattag/__init__.py": "X = 1\n",
                                        "run.py": "def main(argv=None, defaults=None):\n    return 0\n"})
    out = tmp_path / "kernel"
    assert bk.main(["--src-dir", str(src), "--out", str(out)]) == 0
    assert bk.main(["--src-dir", str(src), "--out", str(out), "--check"]) == 0
    (src / "fattag" / "__init__.py").write_text("X = 2\n")
    capsys.readouterr()
    assert bk.main(["--src-dir", str(src), "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "kernel.py differs" in err and "python build_kernel.py" in err


# --- running the bundle --------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["call", "import"])
def test_traceback_names_the_embedded_file_and_line(tmp_path, when):
    boom = textwrap.dedent("""\
        \"\"\"Fails on purpose.\"\"\"


        def explode(n):
            value = n * 2
            raise RuntimeError(f"kaboom {value}")
        """)
    if when == "import":
        boom += "\n\nexplode(21)  # at import time\n"
    src = write_tree(tmp_path / "src", {
        "fattag/__init__.py": '"""Tiny package."""\n',
        "fattag/boom.py": boom,
        "run.py": """\
            import sys


            def main(argv=None, defaults=None):
                from fattag import boom
                boom.explode(21)
                return 0


            if __name__ == "__main__":
                sys.exit(main())
            """,
    })
    files = bk.build(tmp_path / "out", src)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_bundle(files["kernel.py"], cwd=elsewhere)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert 'File "src/fattag/boom.py", line 6, in explode' in err, err
    assert 'raise RuntimeError(f"kaboom {value}")' in err, err
    if when == "call":
        assert 'File "src/run.py", line 6, in main' in err, err
        assert "boom.explode(21)" in err, err
    else:
        assert 'File "src/run.py", line 5, in main' in err, err
        assert "from fattag import boom" in err, err
        assert 'File "src/fattag/boom.py", line 9, in <module>' in err, err
        assert "explode(21)  # at import time" in err, err
    assert "RuntimeError: kaboom 42" in err


def _decoy(root: Path) -> None:
    """A fattag on disk that must never be imported."""
    write_tree(root, {
        "fattag/__init__.py": 'raise ImportError("decoy fattag imported from disk")\n',
        "fattag/diskonly.py": 'raise ImportError("decoy submodule imported from disk")\n',
        "src/fattag/__init__.py": 'raise ImportError("decoy src/fattag imported from disk")\n',
        "src/run.py": 'raise ImportError("decoy run.py imported from disk")\n',
        "run.py": 'raise ImportError("decoy run.py imported from disk")\n',
    })


def test_bundle_imports_the_embedded_package_not_the_disk(tmp_path):
    src = write_tree(tmp_path / "src", {
        "fattag/__init__.py": 'MARKER = "embedded"\n',
        "fattag/sub/__init__.py": "",
        "fattag/sub/inner.py": "from .. import MARKER\nVALUE = MARKER + '-inner'\n",
        "run.py": """\
            import importlib
            import sys

            import fattag
            from fattag.sub import inner


            def main(argv=None, defaults=None):
                try:
                    importlib.import_module("fattag.diskonly")
                except ModuleNotFoundError:
                    print("NO-DISK-SUBMODULE")
                print("MARKER", fattag.MARKER, inner.VALUE)
                print("FILE", fattag.__file__, inner.__file__)
                print("PACKAGE", fattag.__spec__.submodule_search_locations, type(fattag.__loader__).__name__)
                print("ARGV", argv)
                print("DEFAULTS", sorted(defaults.items()))
                return 3


            if __name__ == "__main__":
                sys.exit(main())
            """,
    })
    out = tmp_path / "out"
    files = bk.build(out, src, preset="whatever")
    cwd = tmp_path / "cwd"
    _decoy(cwd)
    _decoy(out)  # the script's own folder is sys.path[0]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_bundle(files["kernel.py"], "--alpha", "1", cwd=cwd)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    digest = bk.source_hash(bk.collect_sources(src))
    assert lines[0].startswith(f"fattag kernel: sources {digest}, 4 files, baked defaults "
                               "{'mode': 'train', 'preset': 'whatever'}"), lines[0]
    assert "NO-DISK-SUBMODULE" in lines
    assert "MARKER embedded embedded-inner" in lines
    assert "FILE src/fattag/__init__.py src/fattag/sub/inner.py" in lines
    assert "PACKAGE [] EmbeddedImporter" in lines
    assert "ARGV ['--alpha', '1']" in lines
    assert "DEFAULTS [('mode', 'train'), ('preset', 'whatever')]" in lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "the bundle wrote files"

    # In a notebook (ipykernel loaded) sys.argv holds the kernel's own arguments: they are not passed on.
    notebook = ("import runpy, sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel'); "
                "sys.argv = ['ipykernel_launcher.py', '-f', '/tmp/kernel-1.json']; "
                f"runpy.run_path({str(files['kernel.py'])!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", notebook], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "ARGV []" in proc.stdout.splitlines()


def test_real_bundle_starts_and_prints_its_hash(tmp_path):
    files = bk.build(tmp_path / "out")
    cwd = tmp_path / "cwd"
    _decoy(cwd)
    proc = run_bundle(files["kernel.py"], "--help", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digest = bk.source_hash(bk.collect_sources(SRC))
    assert proc.stdout.splitlines()[0].startswith(f"fattag kernel: sources {digest}, ")
    assert "usage:" in proc.stdout
    from fattag.config import PRESET_USE, PRESETS
    assert set(PRESET_USE) == set(PRESETS)  # --help says what every preset is for
    assert all(PRESET_USE[name] in " ".join(proc.stdout.split()) for name in PRESETS)


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundle_and_run_py_write_the_same_submission(tmp_path, tiny_data):
    import numpy as np
    import pandas as pd
    from conftest import TINY

    files = bk.build(tmp_path / "bundle")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    common = ["--data-dir", str(tiny_data), *TINY]
    env = clean_env(CUDA_VISIBLE_DEVICES="")
    runs = {"bundle": [sys.executable, str(files["kernel.py"])],
            "run.py": [sys.executable, str(SRC / "run.py")]}
    subs = {}
    for name, cmd in runs.items():
        work = tmp_path / f"work-{name}"
        proc = subprocess.run([*cmd, *common, "--work-dir", str(work)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        assert (work / "submission.csv").is_file(), f"{name} wrote no submission.csv:\n{proc.stdout[-3000:]}"
        subs[name] = pd.read_csv(work / "submission.csv")
    a, b = subs["bundle"], subs["run.py"]
    assert list(a.columns) == list(b.columns)
    assert a.columns[0] == "fname" and len(a) > 0
    assert list(a["fname"]) == list(b["fname"])
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(float), b.iloc[:, 1:].to_numpy(float), atol=1e-6, rtol=0)


def test_the_title_resolves_to_the_kernel_id(tmp_path):
    """Kaggle's client warns when a title's slug is not the id's: the default title is the slug in words, and a
    title that resolves to another slug is a build error."""
    bk.build(tmp_path / "a", kernel_id="someone/fat2019-fattag-predict", mode="predict",
             weights_dataset="someone/fattag-weights")
    meta = json.loads((tmp_path / "a" / "kernel-metadata.json").read_text())
    assert meta["title"] == "fat2019 fattag predict" and bk.kaggle_slug(meta["title"]) == "fat2019-fattag-predict"
    assert bk.kaggle_slug("FAT2019 fattag: two-stage!") == "fat2019-fattag-two-stage"
    with pytest.raises(bk.BuildError, match="does not resolve"):
        bk.render(kernel_id="someone/fat2019-fattag", title="FAT2019 fattag two-stage")
    committed = json.loads((bk.REPO_ROOT / "kernel" / "kernel-metadata.json").read_text())
    assert bk.kaggle_slug(committed["title"]) == committed["id"].split("/")[1]


def test_the_kaggle_client_pushes_both_kernel_folders_without_a_warning(tmp_path, monkeypatch, capsys):
    """The official client's own kernels_push (kaggle 2.2.5, a test-only dependency) reads the built folders; its one
    network call is stubbed. It must accept them, warn about nothing, and send the machine shape and sources."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-key")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    extended = pytest.importorskip("kaggle.api.kaggle_api_extended")
    bk.build(tmp_path / "train", kernel_id="someone/fat2019-fattag")
    bk.build(tmp_path / "predict", kernel_id="someone/fat2019-fattag-predict", mode="predict",
             weights_dataset="someone/fattag-weights")
    sent = []

    class Client:   # stands in for the HTTP client: records the request instead of sending it
        kernels = type("Kernels", (), {"kernels_api_client": type("Api", (), {
            "save_kernel": staticmethod(lambda request: sent.append(request) or "saved")})()})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    api = extended.KaggleApi()
    monkeypatch.setattr(api, "build_kaggle_client", lambda: Client())
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for folder in ("train", "predict"):
            assert api.kernels_push(str(tmp_path / folder)) == "saved"
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "does not resolve" not in printed and "warning" not in printed.lower(), printed   # e.g. a retired GPU
    assert not [w for w in caught if "kaggle" in str(w.filename).lower()], [str(w.message) for w in caught]
    train, predict = sent
    assert (train.slug, train.machine_shape, train.enable_gpu, train.enable_internet) == \
        ("someone/fat2019-fattag", "NvidiaTeslaT4", True, False)
    assert train.competition_data_sources == ["freesound-audio-tagging-2019"] and train.language == "python"
    assert predict.slug == "someone/fat2019-fattag-predict"
    assert predict.dataset_data_sources == ["someone/fattag-weights"]
