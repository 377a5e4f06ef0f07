"""Time one NIfTI volume through `predict` after the model is loaded (issue 13's target: < 2 s for
36 slices). Usage: python benchmarks/volume_speed.py [--data data] [--rounds 5]

The volume is a real case written as a 4-D NIfTI (the first case with the given number of slices).
Prints the median and range of the rounds, split into reading the volume, and the rest of predict
(segmentation with flip TTA and post-processing, writing the mask, overlays and montage)."""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lgg import data, guards, predict, volumes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data")
    parser.add_argument("--slices", type=guards.argparse_type(guards.positive, "--slices", integer=True), default=36)
    parser.add_argument("--rounds", type=guards.argparse_type(guards.positive, "--rounds", integer=True), default=5)
    args = parser.parse_args()
    root = data.find_dataset_root(args.data)
    for case_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        images, _ = data.case_slice_files(case_dir)
        if len(images) == args.slices:
            break
    else:
        raise SystemExit(f"no case with {args.slices} slices in {root}")
    stack = np.stack([data.read_image(images[k]) for k in sorted(images)])
    work = Path(tempfile.mkdtemp(prefix="volume-speed-"))
    source = work / "in" / f"{case_dir.name}.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(volumes.planes_to_ras(stack).astype(np.float32), np.eye(4)), source)
    predictor = predict.load_predictor()
    predict.predict_paths(None, [source], work / "warm", predictor=predictor)  # first call builds the graph
    reads, totals = [], []
    for round_ in range(args.rounds):
        start = time.perf_counter()
        volumes.load_4d(source)
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict.predict_paths(None, [source], work / f"out{round_}", predictor=predictor)
        totals.append(time.perf_counter() - start)
    shutil.rmtree(work)
    print(
        f"{case_dir.name} ({args.slices} slices) through predict, model loaded: "
        f"median {statistics.median(totals):.2f} s "
        f"(range {min(totals):.2f}-{max(totals):.2f}) over {args.rounds} rounds, of which reading the volume "
        f"{statistics.median(reads):.2f} s"
    )


if __name__ == "__main__":
    main()
