"""What a few outlier voxels do to `predict` on a NIfTI volume: the Kaggle mapping takes each sequence's minimum to 0
and its maximum to 255, so one voxel far brighter (or darker) than the rest squeezes the brain into a few grey levels.
Each case is written as a 4-D NIfTI as it is, and again with one voxel (the volume's first corner, in every sequence)
at FACTOR times the brightest value (a negative FACTOR: that far below 0), and predicted by the model.

    python benchmarks/intensity_spike.py --data data

Per case and factor: the case's split for the model (from the `split.csv` beside it: a training case's Dice against
its mask is no held-out figure), the grey levels the middle 99.8 % of each sequence's voxels span after the mapping
(`lgg.volumes.grey_levels`; `predict` warns under `lgg.volumes.FEW_GREY_LEVELS`), the tumor slices and voxels
predicted, and the whole-volume Dice of the prediction against the case's manual mask and against the prediction of
the volume as it is. Prints them; writes `--out` (default `results/intensity-spike.json`, this script's own file,
replaced only by its own).
"""

import argparse
import math
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from misses import repository_path  # noqa: E402

from lgg import data, guards, metrics, predict, volumes  # noqa: E402
from lgg.files import check_own_json, file_sha256, save_json  # noqa: E402

KEYS = ("command", "model", "cases", "factors")  # what marks a file of this script
# test cases of the shipped model (fold 2 of unet-aug-flair-bf16), a small, a middling and a large tumor: its Dice
# against the mask as it is is a held-out figure (`results/unet-aug-flair-bf16-fold2/test.csv`)
CASES = ("TCGA_DU_5874_19950510", "TCGA_HT_7605_19950916", "TCGA_DU_7008_19830723")
FACTORS = (5.0, 8.0, 10.0, 50.0, -10.0, -50.0)


def outlier(name, value):
    """A factor whose voxel lies outside the sequence's range: finite, beyond 1 or below -1 (a factor within [-1, 1]
    leaves the mapping as it was)."""
    if not math.isfinite(value) or abs(value) <= 1:
        raise ValueError(f"{name} must be above 1 or below -1, finite (times the brightest value); received {value!r}")
    return value


def read_case(case_dir):
    """The case's slices as RAS+ voxels (float32) and its manual mask as RAS+ voxels (bool)."""
    images, masks = data.case_slice_files(case_dir)
    stack = np.stack([data.read_image(images[k]) for k in sorted(images)])
    truth = np.stack([data.read_mask(masks[k]) > 0 for k in sorted(images)])
    return volumes.planes_to_ras(stack).astype(np.float32), volumes.planes_to_ras(truth)


def spiked(voxels, factor):
    """`voxels` with one voxel (the first corner) at `factor` times each sequence's brightest value, in every
    sequence; as they are when `factor` is None."""
    voxels = voxels.copy()
    if factor is not None:
        voxels[0, 0, 0] = factor * voxels.max(axis=(0, 1, 2))
    return voxels


def measure(case_dir, factors, predictor, work, split=None):
    """One case at each of `factors` (None first: as it is) -> list of rows."""
    original, truth = read_case(case_dir)
    rows, plain = [], None
    for k, factor in enumerate((None, *factors)):
        voxels = spiked(original, factor)
        source = work / str(k) / f"{case_dir.name}.nii.gz"
        source.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), source)  # identity affine: the file's grid is RAS+
        out = predict.predict_paths(None, [source], work / f"{k}-out", predictor=predictor)
        written = out / case_dir.name / f"{case_dir.name}{predict.PREDICTED_NIFTI_SUFFIX}"
        mask = np.asarray(nib.load(written).dataobj) > 0
        plain = mask if factor is None else plain
        scaled = volumes.to_uint8(voxels)  # what `predict` reads and warns on, before the planes are padded
        rows.append(
            {
                "case_id": case_dir.name,
                "split": split,
                "factor": factor,
                "grey_levels": {
                    sequence: volumes.grey_levels(scaled[..., c]) for c, sequence in enumerate(data.CHANNELS)
                },
                "warned": bool(volumes.intensity_warnings(scaled)),
                "tumor_slices": int(mask.any(axis=(0, 1)).sum()),
                "tumor_voxels": int(mask.sum()),
                "true_voxels": int(truth.sum()),
                "dice_vs_mask": metrics.dice_score(truth, mask),
                "dice_vs_as_is": metrics.dice_score(plain, mask),
            }
        )
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--model", type=Path, help="a segmenter's model.h5 (default: the shipped model)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="case ids (default: %(default)s)")
    parser.add_argument(
        "--factors",
        nargs="+",
        type=guards.argparse_type(outlier, "--factors"),
        default=list(FACTORS),
        help="the outlier voxel, in times each sequence's brightest value (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "intensity-spike.json")
    args = parser.parse_args(argv)
    for flag, values in (("--cases", args.cases), ("--factors", args.factors)):
        if len(set(values)) < len(values):
            raise SystemExit(f"{flag}: each once; received {' '.join(map(str, values))}")
    check_own_json(args.out, KEYS, "benchmarks/intensity_spike.py", inputs=[args.data])
    try:
        root = data.find_dataset_root(args.data)
        for case_id in args.cases:  # every case readable before anything is predicted
            guards.check_case_id(case_id, "--cases")
            if not (root / case_id).is_dir():
                raise SystemExit(f"no case folder {root / case_id}")
            images, _ = data.case_slice_files(root / case_id)
            if not images:
                raise SystemExit(f"{root / case_id}: no slices")
    except (data.DatasetError, FileNotFoundError) as error:
        raise SystemExit(f"{args.data}: {error}") from None
    model = args.model or predict.SHIPPED_MODEL
    try:
        predictor = predict.load_predictor(args.model)
    except (ValueError, OSError) as error:
        raise SystemExit(f"--model {model}: {error}") from None
    split_file = Path(model).parent / "split.csv"  # the model's run put each case in train, val or test
    try:
        splits = (
            data.read_split(split_file).groupby("case_id")["split"].first().to_dict() if split_file.is_file() else {}
        )
    except (KeyError, ValueError) as error:
        raise SystemExit(f"{split_file}: not a run's split.csv ({error})") from None
    work = Path(tempfile.mkdtemp(prefix="intensity-spike-"))
    try:
        rows = [
            row
            for case in args.cases
            for row in measure(root / case, args.factors, predictor, work / case, splits.get(case))
        ]
    finally:
        shutil.rmtree(work)
    for row in rows:
        levels = "/".join(f"{v:.0f}" for v in row["grey_levels"].values())
        factor = "as is" if row["factor"] is None else f"x{row['factor']:g}"
        print(
            f"{row['case_id']} ({row['split'] or 'split unknown'}) {factor:>6}: grey levels {levels}, "
            f"{row['tumor_slices']} tumor slices, {row['tumor_voxels']} voxels (true {row['true_voxels']}), Dice "
            f"{row['dice_vs_mask']:.3f} against the mask, {row['dice_vs_as_is']:.3f} against as-is"
            + (", warned" if row["warned"] else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(
        {
            "command": shlex.join(["python", "benchmarks/intensity_spike.py", *argv]),
            "model": {repository_path(model): file_sha256(model)},
            "cases": args.cases,
            "factors": args.factors,
            "how": "one voxel (the first corner) at factor x each sequence's maximum in the case's 4-D NIfTI; grey "
            "levels and warning as predict computes them; whole-volume Dice of predict's mask on the scan's grid",
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
