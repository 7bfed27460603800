"""Out-of-distribution test images, built at run time from what is available offline.

Nothing here is committed as an image: synthetic inputs are generated from seeds, photos come
from the files scikit-image ships inside its wheel (never its pooch downloads), the CT slice is
pydicom's bundled example, and the MRI variants are transformed copies of test-split images.

Each category says whether the guard should refuse it (`expect_refusal`):
- refuse: noise, gradients, text, checkerboards, blank images, colour and grey photos, the CT
  slice, a false-colour MRI, an intensity-inverted MRI (a contrast the network never saw, so
  its class would be meaningless) and a small patch cut out of an MRI (no head in view).
- pass: MRIs rotated by a few degrees or by 90/180 degrees, mirrored, or mildly cropped.
  They are still brain MRI slices; the data set itself mixes axial, coronal and sagittal views
  and orientation conventions, so refusing them would refuse real scans.

`exposure_negatives` is different: the altered *training-split* slices that `brainmri
calibrate` shows the outlier-exposure head as "refuse". It shares two transform families with
the test categories (patches, inversion) but never their images, sizes or seeds, so those two
categories are reported as "exposed" and the rest as unseen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["OODImage", "RealNegative", "mri_variants", "photo_images", "ct_images",
           "synthetic_images", "exposure_negatives", "real_negatives", "as_mr_dicom",
           "ct_bone_air", "ct_like", "default_ood_root", "made_from_slices", "EXPOSED_CATEGORIES",
           "SYNTHETIC_CATEGORIES"]

SYNTHETIC_CATEGORIES = ("noise", "gradient", "text", "checkerboard", "blank")
# Test categories whose family the exposure head saw: transforms of training-split images, and
# synthetic images drawn from other seeds (`trust._synthetic_negatives`).
EXPOSED_CATEGORIES = ("mri_inverted", "mri_patch", *SYNTHETIC_CATEGORIES)


@dataclass(frozen=True)
class OODImage:
    """One encoded test image with its category and the decision the guard should make."""

    category: str
    name: str
    data: bytes
    expect_refusal: bool
    label: str | None = None  # the true class, for transformed MRIs


@dataclass(frozen=True)
class RealNegative:
    """One real image that is not a brain MRI slice (`ood_train/`), with its category and source."""

    category: str
    source: str  # the repository it came from
    path: Path


def default_ood_root() -> Path:
    """`$BRAINMRI_OOD_DATA`, else `ood_train/` beside the data sets (`../shared/data/ood_train`)."""
    import os

    # The checkout, from this file's place (brainmri/training/): config.PROJECT_ROOT is on top,
    # and nothing in training imports from there.
    project_root = Path(__file__).resolve().parents[2]
    default = project_root.parent / "shared" / "data" / "ood_train"
    return Path(os.environ.get("BRAINMRI_OOD_DATA", default))


def real_negatives(root: Path) -> list[RealNegative]:
    """Every image listed in `root/SOURCES.tsv` (category, repo, ..., output_file) that exists.

    Raises:
        FileNotFoundError: `root` has no SOURCES.tsv.
    """
    import csv

    root = Path(root)
    with (root / "SOURCES.tsv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    found = []
    for row in rows:
        path = root / row["output_file"]
        if path.is_file():
            found.append(RealNegative(row["category"], row["repo"], path))
    return found


def as_mr_dicom(grey: np.ndarray) -> bytes:
    """An 8-bit MONOCHROME2 MR DICOM holding `grey`: the DICOM version of a PNG/JPEG slice."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.uid import MRImageStorage
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(grey, np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def _jpeg(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def synthetic_images(per_category: int = 8, size: int = 256, seed: int = 0) -> Iterator[OODImage]:
    """Noise, gradients, text, checkerboards and blank images (grey and colour, PNG and JPEG)."""
    rng = np.random.default_rng(seed)
    words = ["BRAIN", "MRI", "lorem ipsum", "Report 2024", "glioma?", "CT HEAD", "hello world", "0123456789"]
    for i in range(per_category):
        kind = i % 4
        if kind == 0:
            noise = rng.integers(0, 256, (size, size), dtype=np.uint8)
        elif kind == 1:
            noise = np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)
        elif kind == 2:
            noise = cv2.resize(rng.integers(0, 256, (size // 16, size // 16), dtype=np.uint8),
                               (size, size), interpolation=cv2.INTER_CUBIC)  # smooth blobs
        else:
            noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        yield OODImage("noise", f"noise-{i}", _png(noise), True)

        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        angle = rng.uniform(0, np.pi)
        if i % 2 == 0:
            ramp = np.cos(angle) * xx + np.sin(angle) * yy
        else:
            ramp = np.hypot(xx - rng.uniform(0.2, 0.8), yy - rng.uniform(0.2, 0.8))
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) or 1.0)
        if i % 4 == 3:
            ramp = 1.0 - ramp
        gradient = (ramp * 255).astype(np.uint8)
        yield OODImage("gradient", f"gradient-{i}", _png(gradient), True)

        background, ink = (255, 0) if i % 2 == 0 else (0, 255)
        text = np.full((size, size), background, np.uint8)
        for line in range(int(rng.integers(1, 6))):
            cv2.putText(text, words[(i + line) % len(words)], (int(rng.integers(4, 40)), 40 + 45 * line),
                        cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.6, 1.4)), ink, 2, cv2.LINE_AA)
        yield OODImage("text", f"text-{i}", _jpeg(text) if i % 3 == 0 else _png(text), True)

        cell = int([4, 8, 16, 32, 64][i % 5])
        board = (((np.arange(size)[:, None] // cell) + (np.arange(size)[None, :] // cell)) % 2 * 255)
        yield OODImage("checkerboard", f"checkerboard-{i}", _png(board.astype(np.uint8)), True)

        level = int([0, 255, 128, 40, 200, 0, 255, 90][i % 8])
        blank = np.full((size, size) if i % 2 == 0 else (size, size, 3), level, np.uint8)
        yield OODImage("blank", f"blank-{i}", _png(blank), True)


def _skimage_dir() -> Path | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.__file__).parent


# Files inside the scikit-image wheel (no download). Colour and grey photos/micrographs.
_COLOUR_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "ihc.png", "retina.jpg", "motorcycle_left.png", "color.png", "logo.png")
_GREY_PHOTOS = ("camera.png", "coins.png", "moon.png", "page.png", "text.png", "brick.png", "grass.png",
                "gravel.png", "clock_motion.png", "cell.png", "microaneurysms.png", "horse.png",
                "phantom.png", "chessboard_GRAY.png")


def photo_images() -> Iterator[OODImage]:
    """scikit-image's bundled sample photos; nothing when scikit-image is not installed."""
    folder = _skimage_dir()
    if folder is None:
        return
    for category, names in (("colour_photo", _COLOUR_PHOTOS), ("grey_photo", _GREY_PHOTOS)):
        for name in names:
            path = folder / name
            if path.is_file():
                yield OODImage(category, name, path.read_bytes(), True)


def ct_images() -> Iterator[OODImage]:
    """pydicom's bundled CT slice, as DICOM and as windowed 8-bit PNGs; nothing without pydicom."""
    try:
        import pydicom
        from pydicom import examples
    except ImportError:
        return
    path = examples.get_path("ct")
    yield OODImage("ct", "CT_small.dcm", Path(path).read_bytes(), True)
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    for i, (low, high) in enumerate(((0.0, 100.0), (0.5, 99.5), (5.0, 95.0))):
        lo, hi = np.percentile(pixels, (low, high))
        image = (np.clip((pixels - lo) / (hi - lo or 1.0), 0, 1) * 255).astype(np.uint8)
        yield OODImage("ct", f"CT_small-window{i}.png", _png(image), True)
        yield OODImage("ct", f"CT_small-window{i}-512.jpg",
                       _jpeg(cv2.resize(image, (512, 512), interpolation=cv2.INTER_CUBIC)), True)


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def _centre_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = int(h * fraction), int(w * fraction)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def mri_variants(grey_images: list[np.ndarray], labels: list[str] | None = None,
                 seed: int = 0) -> Iterator[OODImage]:
    """Transformed copies of real MRI slices (uint8 grey arrays), see the module docstring."""
    rng = np.random.default_rng(seed)
    for i, image in enumerate(grey_images):
        label = labels[i] if labels else None
        yield OODImage("mri_rotated_small", f"rot-small-{i}", _png(_rotate(image, rng.uniform(-12, 12))), False, label)
        yield OODImage("mri_rotated_90_180", f"rot90-{i}",
                       _png(np.ascontiguousarray(np.rot90(image, k=int(rng.integers(1, 4))))), False, label)
        yield OODImage("mri_mirrored", f"mirror-{i}", _png(np.ascontiguousarray(image[:, ::-1])), False, label)
        yield OODImage("mri_cropped_mild", f"crop90-{i}", _png(_centre_crop(image, 0.9)), False, label)
        yield OODImage("mri_inverted", f"invert-{i}", _png(255 - image), True, label)
        h, w = image.shape
        top, left = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        patch = image[top : top + h // 4, left : left + w // 4]
        yield OODImage("mri_patch", f"patch-{i}", _png(patch), True, label)
        colour = cv2.applyColorMap(image, cv2.COLORMAP_JET)
        yield OODImage("mri_false_colour", f"false-colour-{i}", _jpeg(colour), True, label)


def made_from_slices(collection: str) -> str:
    """The `source` of a synthetic negative made from one of `collection`'s training slices."""
    return f"training split: {collection}"


def exposure_negatives(grey_images: list[np.ndarray], seed: int = 20261122) -> Iterator[bytes]:
    """PNG bytes of altered training slices for outlier exposure: a patch and an inversion each.

    Patches take 20-45 % of each side anywhere away from the edges (the test patches are 25 %
    from the inner quarter), so the head learns "part of a scan", not one crop geometry.
    """
    rng = np.random.default_rng(seed)
    for image in grey_images:
        h, w = image.shape
        frac = rng.uniform(0.2, 0.45)
        ph, pw = max(8, int(h * frac)), max(8, int(w * frac))
        top = int(rng.integers(h // 6, max(h // 6 + 1, h - ph - h // 6)))
        left = int(rng.integers(w // 6, max(w // 6 + 1, w - pw - w // 6)))
        yield _png(np.ascontiguousarray(image[top : top + ph, left : left + pw]))
        yield _png(255 - image)



def _head_rings(grey: np.ndarray, skin: float, bone: float, least_bone: int = 1):
    """The head's filled outline, less a skin band, less a bone band (`skin` and `bone` as
    shares of the side, the bone at least `least_bone` pixels); None when no head stands out."""
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (blurred > max(otsu / 2, 8)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    head = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(head)
    cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, -1)
    side = max(grey.shape)
    skin, bone = max(1, int(side * skin)), max(least_bone, int(side * bone))
    outer = cv2.erode(filled, np.ones((2 * skin + 1, 2 * skin + 1), np.uint8))
    inner = cv2.erode(outer, np.ones((2 * bone + 1, 2 * bone + 1), np.uint8))
    return filled, outer, inner


def ct_like(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A head-CT look-alike built from a grey MRI slice (uint8 in, uint8 out).

    The non-brain image most like a brain MRI is a head CT: the same round head on black, but
    the skull is the brightest thing in it (a thick white ring) and the brain is a flat mid-grey
    with little grey/white contrast. Keeping the slice's own outline and inner structure and
    changing only that physics teaches the guard "bone bright, tissue flat" rather than one
    outline, so it needs no real head CT to learn it.
    """
    image = grey.astype(np.float32) / 255.0
    skin = rng.uniform(0.0, 0.015)
    rings = _head_rings(grey, skin, rng.uniform(0.02, 0.06), least_bone=2)
    if rings is None:
        return grey
    filled, outer, inner = rings
    sigma = rng.uniform(0.7, 2.0)
    soft = cv2.GaussianBlur(image, (0, 0), sigma)
    # Brain window: tissue at 30-55 % grey with 15-45 % of the MRI's contrast.
    level, spread = rng.uniform(0.3, 0.55), rng.uniform(0.15, 0.45)
    # A head too small to keep any tissue inside its bone ring (a slice near the end of a
    # volume) has no inner mean; centring on the whole image keeps `tissue` an array.
    centre = soft[inner > 0].mean() if inner.any() else soft.mean()
    tissue = level + spread * (soft - centre)
    out = np.zeros_like(image)
    out[filled > 0] = rng.uniform(0.25, 0.45)  # skin and scalp: soft tissue
    out[outer > 0] = rng.uniform(0.85, 1.0)  # bone
    out[inner > 0] = tissue[inner > 0]
    out += rng.normal(0, rng.uniform(0.0, 0.03), out.shape).astype(np.float32) * (filled > 0)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def ct_bone_air(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A head-CT look-alike in which the MRI's signal voids become bone or air (uint8 in, out).

    Cortical bone and air both give no MRI signal, so they are dark on every sequence; on CT
    bone is the brightest thing and air the darkest. `ct_like` paints only a ring at the
    outline; this one also turns each dark region inside the head (skull base, sinuses, the
    skull under the scalp) white or black, and sets the brain window anywhere from dark to
    mid-grey, as real head CT is exported: the skull base and the dark windows `ct_like`
    never makes.
    """
    image = grey.astype(np.float32) / 255.0
    rings = _head_rings(grey, rng.uniform(0.0, 0.015), rng.uniform(0.015, 0.05))
    if rings is None:
        return grey
    filled, outer, inner = rings
    inside = filled > 0
    soft = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.7, 2.0))
    voids = inside & (soft < float(np.median(soft[inside])) * rng.uniform(0.3, 0.6))
    count, parts = cv2.connectedComponents(voids.astype(np.uint8), connectivity=8)
    level, spread = rng.uniform(0.1, 0.55), rng.uniform(0.1, 0.4)
    centre = soft[inner > 0].mean() if inner.any() else soft.mean()
    out = level + spread * (soft - centre)
    out[~inside] = 0.0
    out[inside & (inner == 0)] = rng.uniform(0.2, 0.45)  # scalp
    out[(outer > 0) & (inner == 0)] = rng.uniform(0.85, 1.0)  # the skull under it
    bone_share = rng.uniform(0.3, 0.9)
    for part in range(1, count):
        out[parts == part] = (rng.uniform(0.85, 1.0) if rng.random() < bone_share
                              else rng.uniform(0.0, 0.05))
    out += rng.normal(0, rng.uniform(0.0, 0.03), out.shape).astype(np.float32) * inside
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
