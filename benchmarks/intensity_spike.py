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
import csv
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

from lgg import data, guards, predict, volumes  # noqa: E402
from lgg.files import check_own_json, file_sha256, save_json  # noqa: E402

KEYS = ("command", "model", "cases", "factors")  # what marks a file of this script
# test cases of the shipped model (fold 2 of unet-aug-flair-bf16), a small, a middling and a large tumor: its Dice
# against the mask as it is is a held-out figure (`results/unet-aug-flair-bf16-fold2/test.csv`)
CASES = ("TCGA_DU_5874_19950510", "TCGA_HT_7605_19950916", "TCGA_DU_7008_19830723")
FACTORS = (5.0, 8.0, 10.0, 50.0, -10.0, -50.0)


def dice(a, b):
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def outlier(name, value):
    """A factor whose voxel lies outside the 0-255 of the slices: finite, beyond 1 or below -1 (0 would be no
    outlier, and a factor within [-1, 1] leaves the mapping as it was)."""
    if not math.isfinite(value) or abs(value) <= 1:
        raise ValueError(f"{name} must be above 1 or below -1, finite (times the brightest value); received {value!r}")
    return value


def spiked(case_dir, factor):
    """The case's slices as RAS+ voxels (float32), with one voxel at `factor` times 255 in every sequence (as it is
    when `factor` is None), and the manual mask as RAS+ voxels (bool)."""
    images, masks = data.case_slice_files(case_dir)
    if not images:
        raise SystemExit(f"{case_dir}: no slices")
    stack = np.stack([data.read_image(images[k]) for k in sorted(images)])
    truth = np.stack([data.read_mask(masks[k]) > 0 for k in sorted(images)])
    voxels = volumes.planes_to_ras(stack).astype(np.float32)
    if factor is not None:
        voxels[0, 0, 0] = factor * 255
    return voxels, volumes.planes_to_ras(truth)


def split_of(model):
    """{case id: "train" / "val" / "test"} from the `split.csv` beside `model`, or {} without one."""
    path = Path(model).with_name("split.csv")
    if not path.is_file():
        return {}
    with path.open(newline="") as file:
        return {row["case_id"]: row["split"] for row in csv.DictReader(file)}


def measure(case_dir, factors, predictor, work, split=None):
    """One case at each of `factors` (None first: as it is) -> list of rows."""
    rows, plain = [], None
    for factor in (None, *factors):
        voxels, truth = spiked(case_dir, factor)
        name = "as-is" if factor is None else f"x{factor:g}"
        source = work / name / f"{case_dir.name}.nii.gz"
        source.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), source)
        volume = volumes.load_4d(source)
        out = predict.predict_paths(None, [source], work / f"{name}-out", predictor=predictor)
        mask = (
            np.asarray(nib.load(out / case_dir.name / f"{case_dir.name}{predict.PREDICTED_NIFTI_SUFFIX}").dataobj) > 0
        )
        plain = mask if factor is None else plain
        rows.append(
            {
                "case_id": case_dir.name,
                "split": split,
                "factor": factor,
                "grey_levels": {
                    name: volumes.grey_levels(volume.images[..., c]) for c, name in enumerate(data.CHANNELS)
                },
                "warned": bool(volume.warnings),
                "tumor_slices": int(mask.any(axis=(0, 1)).sum()),
                "tumor_voxels": int(mask.sum()),
                "true_voxels": int(truth.sum()),
                "dice_vs_mask": dice(mask, truth),
                "dice_vs_as_is": dice(mask, plain),
            }
        )
    return rows


def shown(path):
    """`path` relative to the repository where it lies in it (as the commands are recorded)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--model", type=Path, help="a segmenter's model.h5 (default: the shipped model)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="case ids (default: %(default)s)")
    parser.add_argument("--factors", nargs="+", type=guards.argparse_type(outlier, "--factors"), default=list(FACTORS),
                        help="the outlier voxel, in times the brightest value (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "intensity-spike.json")
    args = parser.parse_args(argv)
    check_own_json(args.out, KEYS, "benchmarks/intensity_spike.py")
    try:
        root = data.find_dataset_root(args.data)
    except (data.DatasetError, FileNotFoundError) as error:
        raise SystemExit(f"{args.data}: {error}") from None
    for case_id in args.cases:
        try:
            guards.check_case_id(case_id, "--cases")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        if not (root / case_id).is_dir():
            raise SystemExit(f"no case folder {root / case_id}")
    predictor = predict.load_predictor(args.model)
    model = args.model or predict.SHIPPED_MODEL
    work = Path(tempfile.mkdtemp(prefix="intensity-spike-"))
    try:
        splits = split_of(model)
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
    save_json(
        {
            "command": shlex.join(["python", "benchmarks/intensity_spike.py", *(argv or sys.argv[1:])]),
            "model": {shown(model): file_sha256(model)},
            "cases": args.cases,
            "factors": args.factors,
            "how": "one voxel (the first corner, every sequence) at factor x 255 in the case's 4-D NIfTI; whole-volume "
            "Dice of predict's mask on the scan's grid",
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
