"""Real-recording dev benchmark: test lwlrap on the two realdev families, one row per variant.

    python bench/realdev.py --preset cpu --seeds 0,1,2                       # the preset as it is
    python bench/realdev.py --variant "no_stage1:noisy.epochs=0" --seeds 0   # a variant (repeatable)
    python bench/realdev.py --ablation --seeds 0,1,2                         # every row of docs/ablation.md

realdev (built by `../shared/realdev/build.sh`, see its README) is FAT2019-shaped data made of real recordings
whose test clips come from sources no training clip uses: `instruments` (sample banks) and `everyday` (game sound
packages split by source or speaker). OOF lwlrap over-promises there (0.9+ while test is 0.5-0.7), so every
modelling choice is judged by *test* lwlrap on both families; OOF and the OOF-test gap are printed beside it.

Each (variant, family, seed) is one full `src/run.py` run in its own work dir under --out; a finished run's
result.json is reused while every setting it resolved to is the same, unless --force (so a table can be grown a
variant at a time). Runs are made without the preset's time budget (unless --keep-budget), so the recipe does not
depend on the machine's speed; with the same --threads a run reproduces its scores exactly (docs/ablation.md:
--jobs 2 --threads 1 on 2 cores). Datasets are looked for under --root (default $FATTAG_REALDEV, else
<repo>/.cache/realdev) and built there with build.sh when missing. This is a benchmark, not a test: a run takes
minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from common import machine_info, print_json, print_table  # noqa: E402
from gap import aligned  # noqa: E402
from fattag.config import make_config  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402

BUILD_SCRIPT = REPO.parent / "shared" / "realdev" / "build.sh"
FAMILIES = {"instruments": "realdev", "everyday": "realdev-everyday"}  # --family -> folder build.sh writes

# The rows of docs/ablation.md, by the name `--only` selects (no commas: --only splits on them). Rows run with
# --preset (cpu) plus their --set values; "@demo" switches a row to the demo preset. The first rows are the path
# from the demo preset to the cpu preset, each adding one change; "cpu: ..." rows change one thing in the cpu
# recipe without the two-channel input and test-time class balancing (_BEFORE); "preset: ..." rows change one
# thing in the cpu preset without the test pseudo-label round and the PCEN channel; "union: ..." and
# "half noisy: ..." rows change the second and third rows. Rows of removed options are in docs/ablation.md's
# "Removed options", with the commit whose bench still runs them.
_UNION = ["curated.union_mix=0.5", "noisy.union_mix=0.5"]
_SHARE = [*_UNION, "curated.top_up=0.5"]
_UNBALANCED = ["class_balance=false"]
_BEFORE = ["input_norm=global", *_UNBALANCED]   # the cpu recipe without the two-channel input and class balancing
_32K = ["sample_rate=32000", "n_fft=1024", "win_length=800", "hop_length=500"]  # 64 frames/s, as at 16 kHz
ABLATION = {
    "the demo preset": ["@demo"],
    "+ union mixing in both stages": ["@demo", *_UNION],
    "+ stage-2 batches half noisy": ["@demo", *_SHARE],
    "+ xresnet_small": ["@demo", *_SHARE, "arch=xresnet_small"],
    "+ stage 1 30 epochs": [*_BEFORE],
    "+ two-channel input (global + per-band)": [*_UNBALANCED],
    "+ test-time class balancing": [],
    "+ test pseudo-labels (10 epochs)": ["pseudo_epochs=10"],
    "+ PCEN input channel = cpu preset": ["pseudo_epochs=10", "input_norm=global+band+pcen"],
    "class balancing alone (no two-channel input)": ["input_norm=global"],
    "cpu: no stage 1": ["noisy.epochs=0", *_BEFORE],
    "cpu: no union mixing": ["curated.union_mix=0", "noisy.union_mix=0", *_BEFORE],
    "cpu: + per-band normalisation (one channel)": ["input_norm=band", *_UNBALANCED],
    "cpu: + time-concatenation mixing": ["curated.concat_mix=0.3", "noisy.concat_mix=0.3", *_BEFORE],
    "cpu: + weight averaging (EMA)": ["average_epochs=2", *_BEFORE],
    "cpu: focal loss": ["curated.loss=focal", "noisy.loss=focal", *_BEFORE],
    "cpu: LSEP ranking loss": ["curated.loss=lsep", "noisy.loss=lsep", *_BEFORE],
    "cpu: + frequency shift (2 bands)": ["curated.freq_shift=2", "noisy.freq_shift=2", *_BEFORE],
    "cpu: + time stretch (0.2)": ["curated.time_stretch=0.2", "noisy.time_stretch=0.2", *_BEFORE],
    "cpu: wider SpecAugment stripes": ["freq_mask_frac=0.2", "time_mask_frac=0.2", *_BEFORE],
    "cpu: freq-mean time-max pooling": ["pool=freqmean_timemax", *_BEFORE],
    "cpu: dropout 0.3 and weight decay 0.05": ["dropout=0.3", "wd=0.05", *_BEFORE],
    "preset: 5 folds": ["folds=5"],
    "preset: 64 mels": ["n_mels=64"],
    "preset: 32 kHz and 48 mels": [*_32K, "n_mels=48", "f_max=16000"],
    "preset: 32 kHz and 64 mels": [*_32K, "n_mels=64", "f_max=16000"],
    "preset: stage-2 lr 1e-3": ["curated.lr=0.001"],
    "preset: mixup in stage 1 (alpha 0.2)": ["noisy.mixup=0.2"],
    "preset: + PCEN channel": ["input_norm=global+band+pcen"],
    "preset: 3 s crops": ["crop_seconds=3"],
    "union: + weight averaging (EMA)": ["@demo", *_UNION, "average_epochs=2"],
    "union: 2x epochs (24 + 60)": ["@demo", *_UNION, "noisy.epochs=24", "curated.epochs=60"],
    "half noisy: + Lsoft loss in stage 1": ["@demo", *_SHARE, "noisy.loss=lsoft"],
    "half noisy: + noisy-clip selection": ["@demo", *_SHARE, "select_noisy=true"],
    "half noisy: 32 kHz and 64 mels": ["@demo", *_SHARE, "sample_rate=32000", "n_fft=1024", "win_length=1024",
                                       "hop_length=500", "n_mels=64", "f_max=16000"],
}
# Each row runs as it was measured (docs/ablation.md names the commit). Rows whose base recipe has no test
# pseudo-label round (every row but _ROUND_ROWS) pin pseudo_epochs=0; rows whose base recipe has two input
# channels, global + per-band (every row but _PCEN_ROWS), pin input_norm=both; every cpu row pins the stage 1 of
# 30 epochs the cpu preset had before commit 6d5c2f4 doubled it; every row pins the default memory layout
# (channels_last=false), which changes float rounding only. A row's own values come after these, so they win.
_ROUND_ROWS = ("+ test pseudo-labels (10 epochs)", "+ PCEN input channel = cpu preset")
_PCEN_ROWS = ("preset: + PCEN channel", "+ PCEN input channel = cpu preset")
_LAYOUT = ["channels_last=false"]


def _as_measured(name: str, sets: list[str]) -> list[str]:
    if sets[:1] == ["@demo"]:
        return [sets[0], *_LAYOUT, *sets[1:]]
    return [*_LAYOUT, "noisy.epochs=30", *([] if name in _ROUND_ROWS else ["pseudo_epochs=0"]),
            *([] if name in _PCEN_ROWS else ["input_norm=both"]), *sets]


ABLATION = {name: _as_measured(name, sets) for name, sets in ABLATION.items()}


def default_root() -> Path:
    return Path(os.environ.get("FATTAG_REALDEV") or REPO / ".cache" / "realdev")


def dataset_dir(root: Path, family: str, data_seed: int) -> Path:
    """Where build.sh puts a family: ROOT/<folder> for data seed 0, ROOT/data-seed<N>/<folder> otherwise."""
    base = root if data_seed == 0 else root / f"data-seed{data_seed}"
    return base / FAMILIES[family]


def ensure_dataset(root: Path, family: str, data_seed: int) -> Path:
    path = dataset_dir(root, family, data_seed)
    if (path / "test_labels.csv").is_file():
        return path
    if not BUILD_SCRIPT.is_file():
        raise SystemExit(f"{path} not found and no build script at {BUILD_SCRIPT}: build realdev first "
                         f"(`bash ../shared/realdev/build.sh {path.parent} --family {family}`) or pass --root")
    print(f"building realdev {family} (data seed {data_seed}) into {path.parent} ...", flush=True)
    subprocess.run(["bash", str(BUILD_SCRIPT), str(path.parent), "--family", family, "--seed", str(data_seed)],
                   check=True)
    return path


def work_dir(args, variant: str, family: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in variant)
    return Path(args.out) / slug / f"{family}-d{args.data_seed}" / f"seed{seed}"


def test_lwlrap(data_dir: Path, submission: Path) -> float:
    """lwlrap of a submission against realdev's test_labels.csv, read in the truth's clip and class order."""
    return lwlrap(*aligned(submission, pd.read_csv(data_dir / "test_labels.csv").set_index("fname")))


def run_command(data_dir: Path, work: Path, preset: str, seed: int, sets: list[str], extra=()) -> list[str]:
    """The `src/run.py` command line of one run in its own work dir."""
    return [sys.executable, str(REPO / "src" / "run.py"), "--data-dir", str(data_dir), "--work-dir", str(work),
            "--preset", preset, "--seed", str(seed), *extra, *[x for s in sets for x in ("--set", s)]]


def run_env(threads: int | None) -> dict:
    """The environment of a run: this one, with `threads` OMP/MKL threads when given (else torch's own)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a=1,b=2' -> ('name', ['a=1', 'b=2']); '@preset' as an item switches the preset."""
    name, _, sets = text.partition(":")
    return name.strip(), [s.strip() for s in sets.split(",") if s.strip()]


def run_one(args, variant: str, sets: list[str], family: str, seed: int, data_dir: Path) -> dict:
    preset = next((s[1:] for s in sets if s.startswith("@")), args.preset)
    sets = [s for s in sets if not s.startswith("@")] + list(args.sets)
    if not args.keep_budget:  # the same recipe whatever the machine's speed: scores reproduce exactly
        sets = ["time_budget=0", *sets]
    work = work_dir(args, variant, family, seed)
    result_file = work / "result.json"
    # every setting the run resolves to: a result is reused only for the same recipe, even after a preset changed
    key = dict(preset=preset, sets=sets, seed=seed, data=str(data_dir),
               settings=make_config(preset, sets=sets).flat_dict())
    mode = []
    if args.devices > 1:   # ranks (processes) of the run: stage 1 data-parallel, folds side by side
        key["devices"], mode = args.devices, ["--devices", str(args.devices)]
    if args.predict_from:  # inference-only variant: the fold models of another variant's run, predicted anew
        weights = work_dir(args, args.predict_from, family, seed)
        if not (weights / "result.json").is_file():
            raise SystemExit(f"--predict-from {args.predict_from!r}: no finished run at {weights}")
        key["weights"], mode = str(weights), [*mode, "--mode", "predict", "--weights", str(weights)]
    if result_file.is_file() and not args.force:
        old = json.loads(result_file.read_text())
        if old.get("key") == key:   # the same run, whatever name it was made under
            return {**old, "variant": variant}
    if args.force:   # a run from scratch: src/run.py would otherwise reuse the work dir's finished stages
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("submission.csv", "scores.json"):
        (work / stale).unlink(missing_ok=True)
    cmd = run_command(data_dir, work, preset, seed, sets, mode)
    env = run_env(args.threads)
    t0 = time.time()
    with open(work / "stdout.txt", "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} / {family} / seed {seed} failed (exit {proc.returncode}); see {work}/stdout.txt")
    trained = Path(key["weights"]) if "weights" in key else work  # a predict-only run's OOF: its weights' run
    scores = json.loads((trained / "scores.json").read_text())
    stage1 = work / "stage1" / "history.csv"
    hold = pd.read_csv(stage1)["lwlrap"].tolist() if stage1.is_file() else []
    result = dict(key=key, variant=variant, family=family, seed=seed, test=test_lwlrap(data_dir, work / "submission.csv"),
                  oof=scores.get("oof_tta"), wall_s=wall, stage1_holdout=hold)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  {variant:<32} {family:<11} seed {seed}: test {result['test']:.4f}  OOF {result['oof'] or float('nan'):.4f}"
          f"  ({wall:.0f} s)", flush=True)
    return result


def summarise(results: list[dict], variants: list[str], families: list[str]) -> list[list]:
    rows = []
    for v in variants:
        row = [v]
        walls = []
        for fam in families:
            rs = [r for r in results if r["variant"] == v and r["family"] == fam]
            test = np.array([r["test"] for r in rs])
            oof = np.array([r["oof"] for r in rs if r["oof"] is not None])
            walls += [r["wall_s"] for r in rs]
            sd = test.std(ddof=1) if len(test) > 1 else float("nan")
            row += [test.mean() if len(test) else None, sd, oof.mean() if len(oof) else None,
                    (oof.mean() - test.mean()) if len(oof) and len(test) else None]
        row += [len(walls) and max(walls)]
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="preset of every run (default cpu); '@name' in a variant "
                                                   "switches it for that variant")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds (default 0)")
    p.add_argument("--families", default="instruments,everyday", help="instruments, everyday or both")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SET,SET",
                   help="a variant: a name and --set values, e.g. 'no_stage1:noisy.epochs=0' (repeatable)")
    p.add_argument("--ablation", action="store_true", help="run every row of docs/ablation.md's tables")
    p.add_argument("--only", default=None, help="with --ablation: comma-separated row names to run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra --set for every run")
    p.add_argument("--root", type=Path, default=None, help="folder holding the realdev builds")
    p.add_argument("--data-seed", type=int, default=0, help="realdev build seed (another seed = another dataset)")
    p.add_argument("--out", default=str(REPO / "runs" / "realdev"), help="work dirs of the runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (give each --threads 1 on 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads per run (default: torch's own)")
    p.add_argument("--devices", type=int, default=1,
                   help="processes per run (run.py --devices; the run's --threads are split between them)")
    p.add_argument("--predict-from", default=None, metavar="VARIANT",
                   help="inference-only variants: predict with the fold models of VARIANT's finished runs (same "
                        "family and seed) instead of training, e.g. to try test-time settings")
    p.add_argument("--force", action="store_true",
                   help="rerun from scratch (its work dir removed) even when a finished result exists")
    p.add_argument("--keep-budget", action="store_true",
                   help="keep the preset's time budget (default: off, so that a slower or busier machine runs the "
                        "same recipe and the scores reproduce)")
    args = p.parse_args(argv)

    variants = dict(parse_variant(v) for v in args.variant)
    if args.ablation:
        only = set(args.only.split(",")) if args.only else set(ABLATION)
        variants.update({k: v for k, v in ABLATION.items() if k in only})
    if not variants:
        variants = {f"{args.preset} preset{' budgeted' if args.keep_budget else ''}": []}
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for fam in families:
        if fam not in FAMILIES:
            raise SystemExit(f"unknown family {fam!r}: {', '.join(FAMILIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = args.root or default_root()
    data = {fam: ensure_dataset(root, fam, args.data_seed) for fam in families}
    info = machine_info()
    print(f"== realdev: preset {args.preset}, seeds {seeds}, families {families}, data seed {args.data_seed}, "
          f"{len(variants)} variant(s), {args.jobs} job(s)\nmachine: {info['cpu']} | {info['cores']} cores", flush=True)

    jobs = [(v, sets, fam, s) for v, sets in variants.items() for fam in families for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: run_one(args, *j, data[j[2]]), jobs))

    headers = ["variant"]
    for fam in families:
        headers += [f"{fam} test", "sd", "OOF", "gap"]
    headers.append("max wall s")
    print_table(headers, summarise(results, list(variants), families),
                f"test lwlrap (mean over seeds {seeds}), OOF lwlrap and the OOF-test gap; preset {args.preset}")
    return print_json("realdev", info, {"runs": [{k: r[k] for k in ("variant", "family", "seed", "test", "oof",
                                                                     "wall_s")} for r in results]},
                      preset=args.preset, seeds=seeds, data_seed=args.data_seed)


if __name__ == "__main__":
    main(sys.argv[1:])
