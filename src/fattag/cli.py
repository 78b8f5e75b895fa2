"""Command line: one set of options shared by `python src/run.py` and the bundled Kaggle kernel."""
from __future__ import annotations

import argparse
import textwrap

from .config import KAGGLE_DATA_DIR, PRESET_USE, PRESETS, parse_duration


def _preset_lines() -> str:
    return "\n".join(f"  {name:<10} {PRESET_USE[name]}" for name in PRESETS)


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    epilog = textwrap.dedent("""\
        presets (values in src/fattag/config.py; any value can be overridden with --set name=value;
        default: demo on the demo data, on real data kaggle-1h with a GPU and cpu without one):
        {presets}

        examples:
          python src/run.py                                  # demo dataset, demo preset, CPU
          python src/run.py --data-dir /data/fat2019 --preset kaggle-1h --work-dir runs/full
          python src/run.py --data-dir /data/small --preset cpu  # real recordings, no GPU
          python src/run.py --set curated.epochs=5 --set arch=xresnet34
          python src/run.py --time-budget 55m --folds 5
          python src/run.py --mode predict --weights runs/demo --work-dir runs/predict
          python src/run.py --mode tag --weights runs/demo --work-dir runs/tags my_audio/ clip.flac
          python src/run.py --mode tag --weights runs/demo --segments 5 long_recording.mp3
          python src/run.py --devices 2                      # two processes (Kaggle's T4 x2: the default there)
          torchrun --nnodes 2 --nproc-per-node 2 ... src/run.py --data-dir /shared/data --work-dir /shared/run
        """).format(presets=_preset_lines())
    p = argparse.ArgumentParser(
        description="Two-stage K-fold audio tagger for FAT2019-shaped data: stage 1 on the noisy set, stage 2 "
                    "on the curated set per fold (warm-started), whole-clip TTA, fold ensemble, submission.csv.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help=f"dataset folder in FAT2019 layout (default: {KAGGLE_DATA_DIR} when present, "
                        "else the synthetic demo dataset, generated on first use)")
    p.add_argument("--work-dir", default=None,
                   help="folder for every output of the run: config, logs, metrics, weights, oof.csv, "
                        "submission.csv (default: /kaggle/working on Kaggle, else runs/<preset>)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named set of values (default: demo for the demo dataset; on real data kaggle-1h with a "
                        "GPU, cpu without one)")
    p.add_argument("--seed", type=int, default=None, help="random seed for folds, crops and weights (default 42)")
    p.add_argument("--folds", type=int, default=None, help="number of curated folds K (default: the preset's)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="deadline for the whole run, counted from process start: 3600, 55m, 1h "
                        "(default: the preset's; kaggle-1h plans for 55 min)")
    p.add_argument("--mode", default="train", choices=("train", "predict", "tag"),
                   help="train: both stages then predict; predict: only predict the test set from --weights; "
                        "tag: tag the audio files and folders given as PATH with --weights' models (tags.csv)")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="tag mode: audio files (WAV, FLAC, OGG, MP3, ...) and folders, searched recursively")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="predict and tag modes: folder with fold*/model.pth from a training run (e.g. an attached "
                        "Kaggle dataset)")
    p.add_argument("--segments", type=float, default=None, metavar="SECONDS",
                   help="tag mode: also score consecutive windows of SECONDS over each file (segments.csv), "
                        "for long recordings (the setting tag_segments)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="processes, one device each, in one torch.distributed group: stage 1 data-parallel, the "
                        "folds N at a time (default: every visible CUDA device, one process on the CPU; under "
                        "torchrun: its ranks)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting, e.g. --set curated.epochs=10 or --set arch=xresnet34 (repeatable; "
                        "docs/settings.md lists every setting)")
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.paths and args.mode != "tag":
        parser.error(f"PATH arguments ({args.paths[0]}, ...) are for --mode tag")
    return args


__all__ = ["build_parser", "parse_args", "parse_duration"]
