#!/usr/bin/env python3
"""Build the Kaggle kernel: one self-contained script that runs `src/run.py` with baked-in defaults.

    python build_kernel.py                      # writes kernel/kernel.py and kernel/kernel-metadata.json
    python build_kernel.py --check              # exit 1 if the committed kernel/ is out of date (CI)
    python build_kernel.py --out kernel-predict --mode predict --weights-dataset USER/fattag-weights

kernel.py embeds every `src/fattag/**/*.py` and `src/run.py` as plain (raw) string literals, verbatim,
so the bundle reads and diffs like the sources. At run time a small in-memory importer (a
`MetaPathFinder` + `Loader`) serves the `fattag` package from those strings: each module is compiled
under its repository path (`src/fattag/x.py`) and registered in `linecache`, so tracebacks name the
original file and show its lines. Nothing is written to disk and no subprocess is started.

The output is deterministic: files in sorted order, `\\n` newlines, no timestamps; two builds of the
same sources are byte-identical.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tempfile
from pathlib import Path

# --- build options: the defaults of the command line --------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent
SRC_DIR = REPO_ROOT / "src"              # holds fattag/ and run.py
OUT_DIR = "kernel"                       # relative to the current directory
MODE = "train"                           # train | predict
PRESET = "kaggle-1h"
KERNEL_ID = "USER/fat2019-fattag"        # Kaggle "owner/slug"
TITLE = None                             # None: the id's slug in words, so that the title resolves to the id
MACHINE_SHAPE = "NvidiaTeslaT4"          # Kaggle's default GPU kernel (T4 x2); the P100 is retired
WEIGHTS_DATASET = None                   # "owner/slug" of a Kaggle dataset with trained weights (predict)
COMPETITION = "freesound-audio-tagging-2019"
KAGGLE_INPUT = "/kaggle/input"           # where Kaggle mounts attached datasets: KAGGLE_INPUT/<slug>
WEIGHTS_DIR_OPTION = "weights"          # run.py option (dest of --weights) that gets the mounted weights folder
MODES = ("train", "predict")

# Top-level imports the bundle may use: what the Kaggle image has, besides the standard library.
ALLOWED_THIRD_PARTY = frozenset({"torch", "torchaudio", "fastai", "fastcore", "fastprogress",
                                 "numpy", "pandas", "tqdm", "matplotlib", "soundfile"})
PACKAGE = "fattag"
ENTRY = "src/run.py"
KERNEL_FILE = "kernel.py"
METADATA_FILE = "kernel-metadata.json"

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BuildError(Exception):
    """A problem with the options or the sources: reported as one clear line."""


# --- sources ------------------------------------------------------------------------------------
def _read_source(path: Path) -> str:
    text = path.read_bytes().decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def collect_sources(src_dir: Path | str = SRC_DIR) -> dict[str, str]:
    """{"src/fattag/...py": text, ..., "src/run.py": text}, sorted by path, newlines normalised.

    Keys are repository paths whatever `src_dir` is, so a bundle's file names do not depend on
    where it was built.
    """
    src_dir = Path(src_dir)
    pkg = src_dir / PACKAGE
    if not (pkg / "__init__.py").is_file():
        raise BuildError(f"{pkg / '__init__.py'} not found: is {src_dir} the source folder?")
    if not (src_dir / "run.py").is_file():
        raise BuildError(f"{src_dir / 'run.py'} not found")
    files = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(src_dir)
        if "__pycache__" in rel.parts or any(part.startswith(".") for part in rel.parts):
            continue
        if not all(part.isidentifier() for part in rel.with_suffix("").parts):
            raise BuildError(f"{path}: not an importable module name")
        files["src/" + rel.as_posix()] = path
    for key, path in files.items():  # a module inside a folder without __init__.py can't be served
        parent = Path(key).parent
        if "src/" + (Path(*parent.parts[1:]) / "__init__.py").as_posix() not in files:
            raise BuildError(f"{path}: folder {parent} has no __init__.py (namespace packages are not bundled)")
    files[ENTRY] = src_dir / "run.py"
    sources = {}
    for key in sorted(files):
        text = _read_source(files[key])
        try:
            compile(text, key, "exec", dont_inherit=True)
        except SyntaxError as e:
            raise BuildError(f"{files[key]}:{e.lineno}: syntax error: {e.msg}") from None
        sources[key] = text
    return sources


def module_name(path: str) -> tuple[str, bool]:
    """"src/fattag/a/__init__.py" -> ("fattag.a", True); "src/run.py" -> ("run", False)."""
    parts = Path(path).with_suffix("").parts[1:]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_roots(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute `import x.y` / `from x.y import z` anywhere in the code."""
    roots = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append((node.lineno, node.module.split(".")[0]))
    return sorted(roots)


def allowed_import(root: str) -> bool:
    return root in sys.stdlib_module_names or root in ALLOWED_THIRD_PARTY or root == PACKAGE


def check_imports(sources: dict[str, str]) -> None:
    bad = [f"{path}:{line}: import {root}" for path, text in sources.items()
           for line, root in imported_roots(text, path) if not allowed_import(root)]
    if bad:
        raise BuildError("imports not available in the Kaggle image (allowed: standard library, "
                         f"{', '.join(sorted(ALLOWED_THIRD_PARTY))}, {PACKAGE}):\n  " + "\n  ".join(bad))


def preset_names(sources: dict[str, str]) -> list[str] | None:
    """Names in `PRESETS = {...}` of fattag/config.py, read without importing it (None if not found)."""
    text = sources.get(f"src/{PACKAGE}/config.py")
    if text is None:
        return None
    for node in ast.parse(text).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "PRESETS" and isinstance(node.value, ast.Dict):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            return keys if len(keys) == len(node.value.keys) else None
    return None


def cli_options(sources: dict[str, str]) -> set[str] | None:
    """Dests of the `add_argument` calls in fattag/cli.py, read without importing it (None if no cli.py)."""
    text = sources.get(f"src/{PACKAGE}/cli.py")
    if text is None:
        return None
    dests = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            dest = next((k.value.value for k in node.keywords
                         if k.arg == "dest" and isinstance(k.value, ast.Constant)), None)
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            longs = [f for f in flags if f.startswith("--")]
            if dest is None and (longs or flags):
                dest = (longs or flags)[0].lstrip("-").replace("-", "_")
            if dest:
                dests.add(dest)
    return dests or None


# --- rendering ----------------------------------------------------------------------------------
def _literal(text: str) -> str:
    """A Python expression for `"\\n" + text`, preferring a verbatim raw triple-quoted string."""
    for quote in ("'''", '"""'):
        literal = f"r{quote}\n{text}{quote}"
        if quote not in text and not text.endswith((quote[0], "\\")):
            try:
                if ast.literal_eval(literal) == "\n" + text:
                    return literal
            except (SyntaxError, ValueError):
                pass
    # Fallback (a source holding both kinds of triple quote): one escaped literal per line.
    lines = ["\n", *text.splitlines(keepends=True)]
    return "(\n" + "".join(f"    {line!r}\n" for line in lines) + ")"


def build_command(mode: str, preset: str, weights_dataset: str | None) -> str:
    cmd = f"python build_kernel.py --mode {mode} --preset {preset}"
    if weights_dataset:
        cmd += f" --weights-dataset {weights_dataset}"
    return cmd


def baked_defaults(mode: str, preset: str, weights_dataset: str | None) -> dict:
    defaults = {"mode": mode, "preset": preset}
    if mode == "predict":
        defaults[WEIGHTS_DIR_OPTION] = f"{KAGGLE_INPUT}/{weights_dataset.split('/', 1)[1]}"
    return defaults


_RUNTIME = r'''
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import traceback

PACKAGE = "fattag"
ENTRY = "src/run.py"
SOURCES: dict[str, str] = {}  # repository path -> source text (filled at the end of this file)


def _add(path: str, text: str) -> None:
    SOURCES[path] = text[1:]  # drop the newline after the opening quotes


def source_hash(sources: dict[str, str]) -> str:
    """sha256 over the sorted (path, content) pairs, first 12 hex digits (as build_kernel.py)."""
    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(path.encode("utf-8") + b"\0" + sources[path].encode("utf-8") + b"\0")
    return h.hexdigest()[:12]


def _module_name(path: str) -> tuple[str, bool]:
    parts = path[:-3].split("/")[1:]  # "src/fattag/a/__init__.py" -> ["fattag", "a", "__init__"]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


class EmbeddedImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `fattag` and its submodules from SOURCES: first on sys.meta_path, so nothing on disk
    (the working directory, PYTHONPATH, site-packages) can shadow the embedded code."""

    def __init__(self, sources: dict[str, str], package: str = PACKAGE):
        self.sources = sources
        self.package = package
        self.modules = {}  # module name -> (is_package, repository path)
        for path in sources:
            name, is_pkg = _module_name(path)
            if name.partition(".")[0] == package:
                self.modules[name] = (is_pkg, path)

    def register_lines(self) -> None:
        # mtime None: linecache.checkcache() keeps the entries (there is no file to compare with)
        for path, text in self.sources.items():
            linecache.cache[path] = (len(text), None, text.splitlines(keepends=True), path)

    def spec_for(self, name: str) -> importlib.machinery.ModuleSpec:
        is_pkg, path = self.modules[name]
        # is_package=True gives submodule_search_locations=[]: submodules come only from this finder
        return importlib.machinery.ModuleSpec(name, self, origin=path, is_package=is_pkg)

    # MetaPathFinder
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] != self.package or fullname not in self.modules:
            return None
        return self.spec_for(fullname)

    # Loader (and the InspectLoader methods that linecache, inspect and pdb use)
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__file__ = self.modules[module.__name__][1]  # a repository path, not a file on disk
        exec(self.get_code(module.__name__), module.__dict__)

    def is_package(self, fullname: str) -> bool:
        return self.modules[fullname][0]

    def get_source(self, fullname: str) -> str:
        return self.sources[self.modules[fullname][1]]

    def get_code(self, fullname: str):
        path = self.modules[fullname][1]
        return compile(self.sources[path], path, "exec", dont_inherit=True)


def print_exception(exc_type, exc, tb) -> None:
    """sys.excepthook showing the embedded lines: the interpreter's default hook reads source lines
    from files on disk; the traceback module reads them from linecache, which holds the sources."""
    traceback.print_exception(exc_type, exc, tb)


def install(sources: dict[str, str] = SOURCES) -> EmbeddedImporter:
    """Put the importer first on sys.meta_path (replacing one from an earlier run in this process)."""
    if sys.excepthook is sys.__excepthook__:  # not in IPython, which prints tracebacks its own way
        sys.excepthook = print_exception
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "EmbeddedImporter"]
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # a notebook re-run must not keep modules of an earlier bundle
    importer = EmbeddedImporter(sources)
    importer.register_lines()
    sys.meta_path.insert(0, importer)
    return importer


def load_entry(importer: EmbeddedImporter, name: str = "run"):
    """Import the package, then execute src/run.py from memory as module `run`."""
    __import__(PACKAGE)  # first, so run.py sees the embedded package and leaves sys.path alone
    importer.modules[name] = (False, ENTRY)
    spec = importer.spec_for(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    digest = source_hash(SOURCES)
    state = "" if digest == BUILD_HASH else f" (MODIFIED: built from {BUILD_HASH})"
    print(f"fattag kernel: sources {digest}{state}, {len(SOURCES)} files, baked defaults {BAKED_DEFAULTS}, "
          f"python {sys.version.split()[0]}", flush=True)
    run = load_entry(install(SOURCES))
    return run.main(argv, defaults=dict(BAKED_DEFAULTS))
'''

# The kernel's own source_hash, used here too: the build and the kernel can never hash differently.
_RUNTIME_NAMES: dict = {}
exec(compile(_RUNTIME, "<kernel runtime>", "exec"), _RUNTIME_NAMES)
source_hash = _RUNTIME_NAMES["source_hash"]

_BOOTSTRAP = '''
# ==== start ======================================================================================
if __name__ == "__mp_main__":  # a rank spawned by --devices N: it re-runs this file, then unpickles its work,
    load_entry(install(SOURCES))  # which names fattag.world and run.main: both must import from memory first
if __name__ == "__main__":
    if "ipykernel" in sys.modules:  # a notebook cell: sys.argv holds the kernel's own arguments
        _rc = main([])
        if _rc:
            raise SystemExit(_rc)
    else:
        sys.exit(main(sys.argv[1:]))
'''


def render_kernel(sources: dict[str, str], mode: str = MODE, preset: str = PRESET,
                  weights_dataset: str | None = WEIGHTS_DATASET) -> str:
    digest = source_hash(sources)
    defaults = baked_defaults(mode, preset, weights_dataset)
    index = "\n".join(f"#   {path:<40} {text.count(chr(10)):>5} lines" for path, text in sources.items())
    parts = [
        "# GENERATED FILE -- DO NOT EDIT BY HAND.\n"
        f"# Built by `{build_command(mode, preset, weights_dataset)}` from src/fattag/**/*.py and src/run.py\n"
        f"# (source hash {digest}). Edit the sources, rebuild, and check with `python build_kernel.py --check`.\n"
        "#\n"
        "# A self-contained Kaggle kernel: runs src/run.py with the baked-in defaults below; the\n"
        "# command line (`python kernel.py --help`) can override them. The package is imported from the\n"
        "# source strings at the end of this file by an in-memory importer: no file is written, no\n"
        "# process is started, and tracebacks name the original files (src/fattag/...).\n"
        "#\n"
        "# Embedded files:\n"
        f"{index}\n",
        _RUNTIME,
        f"\nBUILD_HASH = {digest!r}\nBAKED_DEFAULTS = {defaults!r}\n",
        "\n# ==== embedded sources (verbatim) ===============================================================\n",
    ]
    for path, text in sources.items():
        parts.append(f"\n_add({path!r}, {_literal(text)})\n")
    parts.append(_BOOTSTRAP)
    return "".join(parts)


def kaggle_slug(title: str) -> str:
    """The slug Kaggle makes of a kernel title (lower case, each run of other characters one hyphen): it must equal
    the id's slug, or the client warns that the title does not resolve to the id."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def title_for(kernel_id: str, title: str | None) -> str:
    """The given title, or the id's slug in words ("owner/fat2019-fattag" -> "fat2019 fattag")."""
    return title if title is not None else kernel_id.split("/", 1)[-1].replace("-", " ")


def render_metadata(mode: str = MODE, kernel_id: str = KERNEL_ID, title: str | None = TITLE,
                    weights_dataset: str | None = WEIGHTS_DATASET) -> str:
    meta = {
        "id": kernel_id,
        "title": title_for(kernel_id, title),
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": True,
        "enable_internet": False,
        "machine_shape": MACHINE_SHAPE,
        "competition_sources": [COMPETITION],
        "dataset_sources": [weights_dataset] if mode == "predict" else [],
        "kernel_sources": [],
    }
    return json.dumps(meta, indent=2) + "\n"


def validate(mode: str, preset: str, kernel_id: str, title: str | None, weights_dataset: str | None,
             sources: dict[str, str]) -> None:
    if mode not in MODES:
        raise BuildError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "predict" and not weights_dataset:
        raise BuildError("--mode predict needs --weights-dataset OWNER/SLUG (the Kaggle dataset with the "
                         "trained weights, attached to the kernel as an input)")
    if mode != "predict" and weights_dataset:
        raise BuildError("--weights-dataset is only used with --mode predict")
    for flag, value in (("--kernel-id", kernel_id), ("--weights-dataset", weights_dataset)):
        if value is not None and not _SLUG.match(value):
            raise BuildError(f"{flag} must look like OWNER/SLUG, not {value!r}")
    title = title_for(kernel_id, title)
    if not title.strip():
        raise BuildError("--title must not be empty")
    slug = kernel_id.split("/", 1)[-1].lower()
    if kaggle_slug(title) != slug:
        raise BuildError(f"--title {title!r} resolves to the slug {kaggle_slug(title)!r}, not the id's {slug!r}: "
                         "Kaggle would warn that the title does not resolve to the id (e.g. --title "
                         f"{slug.replace('-', ' ')!r})")
    options = cli_options(sources)
    unknown = sorted(set(baked_defaults(mode, preset, weights_dataset)) - options) if options else []
    if unknown:
        raise BuildError(f"baked defaults {unknown} are not options of src/fattag/cli.py "
                         f"({', '.join(sorted(options))}): update build_kernel.py")
    presets = preset_names(sources)
    if presets is not None and preset not in presets:
        raise BuildError(f"--preset {preset!r} is not in fattag/config.py PRESETS ({', '.join(presets)})")


def render(src_dir: Path | str = SRC_DIR, mode: str = MODE, preset: str = PRESET, kernel_id: str = KERNEL_ID,
           title: str | None = TITLE, weights_dataset: str | None = WEIGHTS_DATASET) -> dict[str, bytes]:
    """{file name: bytes} of the kernel folder; raises BuildError on bad options or sources."""
    sources = collect_sources(src_dir)
    validate(mode, preset, kernel_id, title, weights_dataset, sources)
    check_imports(sources)
    kernel = render_kernel(sources, mode, preset, weights_dataset)
    compile(kernel, KERNEL_FILE, "exec", dont_inherit=True)  # the bundle itself must be valid Python
    return {KERNEL_FILE: kernel.encode("utf-8"),
            METADATA_FILE: render_metadata(mode, kernel_id, title, weights_dataset).encode("utf-8")}


def build(out_dir: Path | str = OUT_DIR, src_dir: Path | str = SRC_DIR, **options) -> dict[str, Path]:
    """Write kernel.py and kernel-metadata.json into out_dir; returns {file name: path}."""
    files = render(src_dir, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in files.items():
        (out / name).write_bytes(data)
        written[name] = out / name
    return written


def check(out_dir: Path | str = OUT_DIR, src_dir: Path | str = SRC_DIR, **options) -> list[str]:
    """Build into a temporary folder and compare with out_dir: a list of problems (empty = up to date)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(tmp, src_dir, **options)
        problems = []
        for name, path in fresh.items():
            if not (out / name).is_file():
                problems.append(f"{out / name} is missing")
            elif (out / name).read_bytes() != path.read_bytes():
                problems.append(f"{out / name} differs from a fresh build")
    return problems


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=OUT_DIR, help=f"output folder (default: {OUT_DIR})")
    p.add_argument("--src-dir", default=str(SRC_DIR), help="source folder holding fattag/ and run.py")
    p.add_argument("--mode", default=MODE, choices=MODES, help=f"baked-in run mode (default: {MODE})")
    p.add_argument("--preset", default=PRESET, help=f"baked-in preset (default: {PRESET})")
    p.add_argument("--kernel-id", default=KERNEL_ID, help=f"Kaggle kernel OWNER/SLUG (default: {KERNEL_ID})")
    p.add_argument("--title", default=TITLE, help="Kaggle kernel title; its slug must equal the id's (default: the "
                                                  "id's slug in words, e.g. 'fat2019 fattag')")
    p.add_argument("--weights-dataset", default=WEIGHTS_DATASET, metavar="OWNER/SLUG",
                   help="Kaggle dataset with trained weights; required by --mode predict, which mounts it at "
                        f"{KAGGLE_INPUT}/SLUG and bakes that folder in as --{WEIGHTS_DIR_OPTION.replace('_', '-')}")
    p.add_argument("--check", action="store_true",
                   help="build into a temporary folder and exit 1 if --out differs (for CI)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(mode=args.mode, preset=args.preset, kernel_id=args.kernel_id, title=args.title,
                   weights_dataset=args.weights_dataset)
    try:
        if args.check:
            problems = check(args.out, args.src_dir, **options)
            if problems:
                print("build_kernel.py --check: the kernel is out of date with the sources:\n  "
                      + "\n  ".join(problems)
                      + f"\nrun `python build_kernel.py` (with the same options) and commit {args.out}/",
                      file=sys.stderr)
                return 1
            print(f"{args.out}/ is up to date with {args.src_dir} "
                  f"(source hash {source_hash(collect_sources(args.src_dir))})")
            return 0
        files = build(args.out, args.src_dir, **options)
    except BuildError as e:
        print(f"build_kernel.py: error: {e}", file=sys.stderr)
        return 2
    sources = collect_sources(args.src_dir)
    print(f"wrote {', '.join(str(p) for p in files.values())} "
          f"({len(sources)} files, source hash {source_hash(sources)}, mode {args.mode}, preset {args.preset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
