"""NIfTI volumes in and out: a scan shown to the model the way the Kaggle slices show it, and the
predicted mask written back on the scan's own grid.

What the training data looks like (measured over the 88 shared cases; the grey levels in
`tests/test_volumes.py::test_no_shared_case_is_called_squeezed`):
each case is a stack of axial slices, 256 x 256 pixels, anterior at the top and the patient's
right on the image's left (the radiological view), three 8-bit channels in the order pre-contrast,
FLAIR, post-contrast. Every channel of every case starts at 0, and its maximum is 255 or close to
it (median 254, lowest 191): each sequence was scaled from its volume's minimum and maximum to
0-255, which leaves the brain at about 100-200 under a tail of a few bright voxels. A volume here
gets the same mapping (`to_uint8`: per sequence, minimum -> 0 and maximum -> 255, rounded), so a
Kaggle case written as a NIfTI at any intensity scale comes back to its own .tif values. Where a few
voxels far brighter (or darker) than the rest set the maximum (or minimum), the brain is left a few grey
levels, unlike any training case (the middle 99.8 % of a sequence's voxels: 46 levels at the fewest,
median about 165): `intensity_warnings` says so in the results, and the volume is not clipped behind the
user's back.

Geometry: the volume is turned to RAS+ (nibabel's `io_orientation`, voxel axes only, no
resampling), each axial plane is padded to a square with the sequence's minimum and resized to
256 x 256 (bilinear for the image; the mask goes back by nearest neighbour and the padding is cut
off), and the mask is turned back to the file's own axis order and written with the file's affine
and header, so it overlays exactly in ITK-SNAP or 3D Slicer. In-plane voxels that are not square
are not resampled to square: the model then sees a stretched head (say so if you meet one).
"""

import dataclasses
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from nibabel import orientations

from lgg import data, guards

SEQUENCES = ("pre", "flair", "post")  # the training order of the channels (data.CHANNELS)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RAS = orientations.axcodes2ornt(("R", "A", "S"))
MAX_VOXELS = 2**28  # 268 M values (1 GB as float32): far above any MRI scan, far below what breaks a laptop
MAX_SLICES = 1024  # axial slices: each becomes a 256 x 256 x 3 slice for the model
MIN_PLANE = 32  # voxels along each in-plane axis: fewer is not an axial image of a head


class VolumeError(data.DatasetError):
    """A volume that cannot be read or does not hold what the model needs."""


def is_nifti(path):
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path):
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


@dataclass
class Volume:
    """A scan as the model's slices plus what it takes to write a mask back on the scan's grid."""

    case_id: str
    images: np.ndarray  # (Z, 256, 256, 3) uint8: axial slices, inferior to superior, as the Kaggle set shows them
    reference: nib.Nifti1Image  # the file (FLAIR for three files) whose grid the mask is written on
    sources: tuple  # the file(s) read
    warnings: list = dataclasses.field(default_factory=list)  # geometry_warnings: what to doubt

    @property
    def shape(self):
        return self.reference.shape[:3]

    @property
    def voxel_mm(self):
        """Voxel edges in mm, from the affine (what viewers place the voxels by) and the header's units."""
        edges = np.sqrt((self.reference.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(edge) * _mm_per_unit(self.reference) for edge in edges)

    @property
    def voxel_ml(self):
        """One voxel's volume in ml: |det| of the affine's 3x3 part (skewed grids included), in the header's units."""
        return abs(float(np.linalg.det(self.reference.affine[:3, :3]))) * _mm_per_unit(self.reference) ** 3 / 1000.0


def _mm_per_unit(image):
    unit = image.header.get_xyzt_units()[0]
    return {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)  # "mm", or "unknown" (taken as mm, as viewers do)


def _load(path):
    """The image and its voxels as float32, or a `VolumeError` naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if not path.is_file():
        raise VolumeError(f"{path}: not a regular file")
    try:
        image = nib.load(path)
        shape, dtype = image.shape, image.get_data_dtype()
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError,
            OverflowError, zlib.error) as error:  # fmt: skip
        raise _unreadable(path, error) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: a {type(image).__name__}, not a NIfTI volume")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise VolumeError(f"{path}: shape {shape} holds more than {MAX_VOXELS:,} values, far more than a scan")
    if dtype.fields is not None or dtype.kind not in "biuf":  # RGB24, complex, ...: not intensities
        raise VolumeError(f"{path}: voxels of type {dtype}; expected real numbers (integers or floats)")
    try:
        voxels = np.asarray(image.dataobj, dtype=np.float32)
    except (nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, TypeError, OverflowError,
            zlib.error) as error:  # fmt: skip
        raise _unreadable(path, error) from None
    if voxels.ndim == 5 and voxels.shape[3] == 1:  # (X, Y, Z, 1, C): how some tools store channels
        voxels = voxels[:, :, :, 0]
    if not np.isfinite(voxels).all():
        raise VolumeError(f"{path}: holds NaN or infinite values")
    if voxels.ndim >= 3 and min(voxels.shape[:3]) < 1:
        raise VolumeError(f"{path}: an empty volume of shape {voxels.shape}")
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: its affine is not a valid voxel-to-world mapping")
    return image, voxels


def _unreadable(path, error):
    reason = " ".join(str(error).split())  # nibabel's messages may span lines
    return VolumeError(f"{path}: not a readable NIfTI volume ({type(error).__name__}: {reason})")


def case_id_of(path):
    """A case id from a file name: characters a case id cannot hold (spaces, brackets, ...) become `_`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", nifti_stem(path)).lstrip("._-")[:100]
    return stem.replace("..", "_") or "volume"


def _need_three(path, what):
    return VolumeError(
        f"{path}: {what}; the model needs three co-registered sequences in the training order "
        f"({', '.join(data.CHANNELS)}): a 4-D NIfTI with those three on its last axis, or three 3-D "
        "files given as --pre, --flair and --post (a FLAIR alone: --flair FILE --fill-from-flair)"
    )


def load_4d(path, case_id=None):
    """A 4-D NIfTI whose last axis holds pre-contrast, FLAIR and post-contrast."""
    image, voxels = _load(path)
    if voxels.ndim == 3:
        raise _need_three(path, f"a 3-D volume {voxels.shape} (one sequence)")
    if voxels.ndim != 4 or voxels.shape[3] != len(SEQUENCES):
        raise _need_three(path, f"shape {voxels.shape}, not (X, Y, Z, 3)")
    return _volume(case_id or case_id_of(path), voxels, _reference(image), (Path(path),))


FILLED_WARNING = (
    "{filled} filled with FLAIR (--fill-from-flair), as the Kaggle set fills a sequence a case lacks: "
    "expect a lower Dice than from all three sequences (the shipped model's cost is in the README)"
)


def load_sequences(pre=None, flair=None, post=None, case_id=None, fill_from_flair=False):
    """Three co-registered 3-D NIfTI files, one per sequence (same shape and affine). With
    `fill_from_flair`, a missing pre- or post-contrast file is replaced by the FLAIR, as the Kaggle set
    fills a sequence a case lacks (4 of the 88 shared cases are FLAIR only); the volume's warnings say so."""
    given = dict(zip(SEQUENCES, (pre, flair, post)))
    missing = [name for name, path in given.items() if path is None]
    have = ", ".join(f"--{name} {path}" for name, path in given.items() if path is not None) or "nothing"
    if fill_from_flair and flair is None:
        raise VolumeError(
            f"given {have}; --fill-from-flair fills the sequences missing beside --flair FILE: give --flair"
        )
    if missing and not fill_from_flair:
        raise VolumeError(
            f"given {have}; missing {', '.join('--' + name for name in missing)}: the model takes three sequences "
            f"({', '.join(data.CHANNELS)}); to fill the missing ones with the FLAIR, as the Kaggle set does for "
            "cases that lack them, add --fill-from-flair"
        )
    loaded = {}
    for name, path in given.items():
        if path is None:
            continue
        image, voxels = _load(path)
        if voxels.ndim != 3:
            raise VolumeError(f"--{name} {path}: shape {voxels.shape}, expected one 3-D sequence")
        loaded[name] = (image, voxels)
    flair_image, flair_voxels = loaded["flair"]
    for name, (image, voxels) in loaded.items():
        if voxels.shape != flair_voxels.shape or not np.allclose(image.affine, flair_image.affine, atol=1e-3):
            raise VolumeError(
                f"--{name} {given[name]} and --flair {given['flair']} are not on the same grid (shapes "
                f"{voxels.shape} and {flair_voxels.shape}, affines differ by up to "
                f"{np.abs(image.affine - flair_image.affine).max():.3g}): co-register them first"
            )
    for first, second in (("pre", "flair"), ("pre", "post"), ("flair", "post")):
        if first in loaded and second in loaded and np.array_equal(loaded[first][1], loaded[second][1]):
            raise VolumeError(
                f"--{first} {given[first]} and --{second} {given[second]} hold the same image: "
                "each sequence must be its own file"
                + (" (for a missing one, leave it out and add --fill-from-flair)" if "flair" in (first, second) else "")
            )
    voxels = np.stack([loaded.get(name, loaded["flair"])[1] for name in SEQUENCES], axis=-1)
    per_channel = tuple(Path(given[name] or flair) for name in SEQUENCES)  # a filled channel: the FLAIR file
    sources = tuple(path for name, path in zip(SEQUENCES, per_channel) if name in loaded)  # each file once
    volume = _volume(case_id or case_id_of(flair), voxels, _reference(flair_image), sources, per_channel)
    if missing:
        filled = " and ".join(dict(zip(SEQUENCES, data.CHANNELS))[name] for name in missing)
        volume.warnings.insert(0, FILLED_WARNING.format(filled=filled))
    return volume


def _reference(image):
    """An empty uint8 3-D image with the geometry (shape, affine, qform/sform, zooms) of `image`."""
    header = image.header.copy()
    header.set_data_shape(image.shape[:3])
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = 0, 1
    header.set_intent("none")  # a mask, whatever the input was (e.g. a "vector" of three sequences)
    return type(image)(np.zeros(image.shape[:3], np.uint8), image.affine, header)


def _volume(case_id, voxels, reference, sources, per_channel=None):
    """`per_channel`: the file each channel came from, for messages (default: `sources`, one per channel, or one
    file for all three)."""
    guards.check_case_id(case_id, sources[0])
    per_channel = per_channel or (sources * len(data.CHANNELS) if len(sources) == 1 else sources)
    columns, rows, slices = _to_ras(np.empty(voxels.shape[:3], np.uint8), reference.affine).shape
    if slices > MAX_SLICES or min(rows, columns) < MIN_PLANE:
        raise VolumeError(
            f"{sources[0]}: axial planes of {columns} x {rows} voxels, {slices} of them; expected planes of at least "
            f"{MIN_PLANE} x {MIN_PLANE} and at most {MAX_SLICES} slices (an axial MRI volume of a head)"
        )
    for channel in sorted(range(len(data.CHANNELS)), key=lambda c: c != data.FLAIR_CHANNEL):  # FLAIR first
        if voxels[..., channel].min() == voxels[..., channel].max():
            raise VolumeError(f"{per_channel[channel]}: the {data.CHANNELS[channel]} sequence is constant")
    scaled = to_uint8(_to_ras(voxels, reference.affine))
    warnings = geometry_warnings(reference) + intensity_warnings(scaled)  # before the planes are padded
    return Volume(case_id, to_slices(scaled), reference, sources, warnings)


# the grey levels the middle 99.8 % of a sequence's voxels span after `to_uint8` (`grey_levels`), over the 88 shared
# Kaggle cases: 46 at the fewest, median about 165. The model standardizes each slice, so a narrower span costs it
# little until the 8-bit rounding leaves the brain too few levels: with the shipped model, on three of its test cases
# with one voxel at 5 to 50 times (and -10, -50) a sequence's maximum, `results/intensity-spike.json` of
# `benchmarks/intensity_spike.py` (at 50 times, 3-4 levels, every tumor slice lost: also `tests/test_volumes.py`)
FEW_GREY_LEVELS = 32


def grey_levels(sequence):
    """The grey levels the middle 99.8 % of `sequence`'s voxels span (uint8: 0-255)."""
    low, high = np.percentile(sequence, [0.1, 99.9])
    return float(high - low)


def intensity_warnings(voxels):
    """The sequences of `voxels` (uint8, `to_uint8`'s mapping, before padding: `(..., 3)`) whose voxels a few outliers
    squeezed into a few grey levels, in words: the mapping takes the volume's minimum to 0 and its maximum to 255,
    and a spike or an artefact far above (or below) the rest leaves the brain a few levels, where the model may find
    nothing (may be empty)."""
    found = []
    for channel, name in enumerate(data.CHANNELS):
        levels = grey_levels(voxels[..., channel])
        if levels < FEW_GREY_LEVELS:
            found.append(
                f"the {name} sequence is squeezed: 99.8 % of its voxels span {levels:.0f} grey levels of 255 after its "
                "minimum -> 0 and maximum -> 255 (the shared Kaggle cases: 46 at the fewest), so a few voxels far "
                "brighter or darker than the rest (a spike, an artefact) set the scale, and the model may find "
                "nothing; clip the volume at its 0.1th and 99.9th percentiles and predict again"
            )
    return found


def geometry_warnings(image):
    """What about a volume's geometry makes its masks or volume less trustworthy, in words (may be empty)."""
    found = []
    if image.header["qform_code"] == 0 and image.header["sform_code"] == 0:
        found.append("no qform or sform in the header: voxel size and position are guesses (1 mm assumed)")
    edges = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    in_plane = sorted(edges[list(np.argsort(np.abs(image.affine[2, :3]))[:2])])  # the two axes least along S
    if in_plane[1] > 1.1 * in_plane[0]:
        size = f"{in_plane[0]:.3g} x {in_plane[1]:.3g} mm"
        found.append(f"in-plane voxels of {size} are not square: the model sees a stretched head")
    return found


def to_uint8(voxels):
    """Per sequence, the volume's minimum -> 0 and maximum -> 255, rounded (the Kaggle mapping)."""
    out = np.empty(voxels.shape, np.uint8)
    for channel in range(voxels.shape[-1]):  # one sequence at a time, in float64: exact, and memory stays small
        sequence = voxels[..., channel].astype(np.float64)
        low, high = sequence.min(), sequence.max()
        out[..., channel] = np.clip(np.rint((sequence - low) * (255.0 / (high - low))), 0, 255)
    return out


def _orientation(affine):
    return orientations.io_orientation(affine)


def _to_ras(voxels, affine):
    return orientations.apply_orientation(voxels, orientations.ornt_transform(_orientation(affine), RAS))


def _from_ras(voxels, affine):
    return orientations.apply_orientation(voxels, orientations.ornt_transform(RAS, _orientation(affine)))


def ras_to_planes(ras):
    """RAS+ voxels `(X, Y, ...)` -> axial planes `(Z, rows, cols, ...)` as the Kaggle slices show them:
    rows run anterior to posterior, columns the patient's right to left."""
    return np.ascontiguousarray(np.moveaxis(ras[::-1, ::-1], (0, 1, 2), (2, 1, 0)))


def planes_to_ras(planes):
    """The inverse of `ras_to_planes`."""
    return np.ascontiguousarray(np.moveaxis(planes, (2, 1, 0), (0, 1, 2))[::-1, ::-1])


def _padding(rows, cols):
    """Centred padding of a plane to a square: ((top, bottom), (left, right))."""
    side = max(rows, cols)
    return tuple(((side - n) // 2, side - n - (side - n) // 2) for n in (rows, cols))


def to_slices(ras):
    """RAS+ voxels `(X, Y, Z, 3)` uint8 -> Kaggle-style slices `(Z, 256, 256, 3)`: anterior at the
    top, the patient's right on the left, each plane padded (centred) to a square and resized to 256."""
    planes = ras_to_planes(ras)
    (top, bottom), (left, right) = _padding(*planes.shape[1:3])
    planes = np.pad(planes, [(0, 0), (top, bottom), (left, right), (0, 0)])  # 0: each sequence's minimum
    if planes.shape[1] == data.NATIVE_SIZE:
        return planes
    size = (data.NATIVE_SIZE, data.NATIVE_SIZE)
    return np.stack([cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR) for plane in planes])


def mask_to_volume(masks, volume):
    """Masks `(Z, 256, 256)` of `volume.images` -> a uint8 0/1 array on the file's own grid."""
    columns, rows, slices = _to_ras(np.empty(volume.shape, np.uint8), volume.reference.affine).shape
    masks = np.asarray(masks, dtype=np.uint8)
    if len(masks) != slices:
        raise ValueError(f"{len(masks)} masks for a volume of {slices} axial slices")
    (top, _), (left, _) = _padding(rows, columns)
    side = max(rows, columns)
    if side != masks.shape[1]:  # pixel-centre aligned nearest neighbour, as the bilinear resize going in
        masks = np.stack([cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST_EXACT) for mask in masks])
    planes = masks[:, top : top + rows, left : left + columns]
    return _from_ras(planes_to_ras(planes), volume.reference.affine).astype(np.uint8)


def save_mask(mask, volume, path):
    """Write the 0/1 mask with the scan's affine and header (data type uint8), atomically."""
    from lgg.files import atomic_path

    if tuple(mask.shape) != tuple(volume.shape):
        raise ValueError(f"mask of shape {mask.shape} for a volume of shape {volume.shape}")
    reference = volume.reference
    image = type(reference)(mask.astype(np.uint8), reference.affine, reference.header.copy())
    image.set_qform(*reference.get_qform(coded=True))
    image.set_sform(*reference.get_sform(coded=True))
    with atomic_path(path) as temporary:  # the temporary keeps the .nii.gz ending nibabel goes by
        nib.save(image, temporary)
