"""The tag mode end to end: a user's folder of WAV and FLAC files, tagged by the README's command, checked against
predict mode, timed.

    python bench/tag.py                                  # the demo run's weights (runs/demo), 100 files
    python bench/tag.py --weights runs/cpu-everyday --files 200

The folder (under --out) holds the test clips of the weights' own training data (its config.json names the data
dir), the even ones copied as WAV and the odd ones re-encoded as FLAC with the same samples, plus a corrupt WAV, an
empty FLAC and a clip far shorter than one window. The bench runs `src/run.py --mode tag` on it as a user would,
then predict mode on the same clips with class balancing and augmented passes off, as the tag mode predicts
(`--set class_balance=false --set tta_aug_passes=0`; the demo's weights have no augmented passes), and reports:
one row per file, the three odd files' rows, the largest difference between the two modes' probabilities, and the
tag mode's files/s and seconds of audio per second (decoding, log-mels and the fold ensemble; model loading apart).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, print_json, print_machine, print_table

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RUN = REPO / "src" / "run.py"
ODD = ("corrupt.wav", "empty.flac", "short.wav")   # the files that test the error rows and the short clip


def make_folder(test_dir: Path, folder: Path, files: int) -> list[str]:
    """`files` files in `folder`: test clips (cycled when there are fewer), WAV and FLAC in turn, then ODD."""
    import soundfile
    from fattag.audio import write_wav
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    clips = sorted(test_dir.glob("*.wav"))
    used = []
    for k in range(files - len(ODD)):
        wav = clips[k % len(clips)]
        name = f"{k:04d}_{wav.stem}"
        if k % 2:
            wave, sr = soundfile.read(str(wav), dtype="int16")
            soundfile.write(str(folder / f"{name}.flac"), wave, sr, subtype="PCM_16")
        else:
            shutil.copy(wav, folder / f"{name}.wav")
        used.append(wav.name)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVE" + os.urandom(200))
    (folder / "empty.flac").write_bytes(b"")
    write_wav(folder / "short.wav", 0.3 * np.sin(np.arange(1600) / 5.0), 16000)   # 0.1 s
    return used


def run(args: list, what: str) -> tuple[float, str]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stderr


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=REPO / "runs" / "demo", help="a training run's work dir")
    p.add_argument("--files", type=int, default=100, help="files in the folder, the three odd ones included")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-tag", help="folder for the files and outputs")
    args = p.parse_args(argv)
    data_dir = Path(json.loads((args.weights / "config.json").read_text())["data_dir"])
    machine = print_machine("tag mode", notes=f"weights {args.weights}; clips from {data_dir / 'test'}")
    folder, tag_out, predict_out = args.out / "audio", args.out / "tags", args.out / "predict"
    used = make_folder(data_dir / "test", folder, args.files)

    wall, log = run(["--mode", "tag", "--weights", args.weights, "--work-dir", tag_out, folder], "tag mode")
    line = re.search(r"tagged (\d+) file\(s\) \((\d+) could not be read\), ([\d.]+) min of audio, in ([\d.]+) s: "
                     r"([\d.]+) files/s, (\d+) s of audio per s", log)
    if line is None:
        raise SystemExit(f"no closing line in the tag mode's log:\n{log[-2000:]}")
    _, failed, minutes, seconds, files_s, audio_s = map(float, line.groups())
    tags = pd.read_csv(tag_out / "tags.csv", keep_default_na=False)
    by_name = tags.set_index(tags["fname"].map(lambda f: Path(f).name))

    run(["--mode", "predict", "--weights", args.weights, "--data-dir", data_dir, "--work-dir", predict_out,
         "--set", "class_balance=false", "--set", "tta_aug_passes=0"], "predict mode")
    predicted = pd.read_csv(predict_out / "submission.csv").set_index("fname")
    clips = tags[~tags["fname"].map(lambda f: Path(f).name).isin(ODD)]
    ours = clips[predicted.columns].astype(float).to_numpy()
    theirs = predicted.loc[used, predicted.columns].to_numpy()
    diff = float(np.abs(ours - theirs).max())

    rows = [["files in the folder", args.files], ["rows in tags.csv", len(tags)],
            ["rows with an error", int(failed)]]
    rows += [[f"{name}: error", by_name.loc[name, "error"] or "(none: scored)"] for name in ODD]
    rows += [["short.wav labels", by_name.loc["short.wav", "labels"] or "(none above threshold)"],
             ["max |tag - predict| over the clips' probabilities", f"{diff:.2e}"],
             ["audio tagged", f"{minutes:.1f} min"], ["tagging time (models loaded)", f"{seconds:.1f} s"],
             ["files/s", files_s], ["seconds of audio per second", audio_s], ["tag command wall time", f"{wall:.1f} s"]]
    print_table(["", "value"], rows)
    ok = len(tags) == args.files and int(failed) == 2 and diff <= 1e-5 and by_name.loc["short.wav", "error"] == ""
    print("all checks hold" if ok else "A CHECK FAILED", flush=True)
    return print_json("tag", machine, dict(checks_hold=ok, files=args.files, rows=len(tags), errors=int(failed),
                                           max_diff=diff, files_per_s=files_s, audio_s_per_s=audio_s, tag_s=seconds,
                                           wall_s=wall), weights=str(args.weights))


if __name__ == "__main__":
    sys.exit(0 if main()["results"]["checks_hold"] else 1)
