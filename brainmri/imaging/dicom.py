"""DICOM bytes to a grayscale float array, with pydicom; no tag value ever leaves this module.

Only the pixels come out. Patient names, ids, dates and every other attribute stay inside the
dataset object, which is dropped when `decode_dicom` returns; error messages are fixed text and
never quote a tag value. The header is read and checked (modality, size, frames, colour model,
transfer syntax) before any pixel data is read or decompressed.

A file whose Modality (0008,0060) names anything but MR (CT, X-ray, ultrasound, PET, ...) is
refused with `wrong_modality`: the header says for certain what the image is, so there is no
need to let the out-of-distribution guard guess. The message names the modality from a fixed
table of DICOM codes and never echoes the header's own text. A file with no Modality goes on
to the image checks like a PNG.

Grayscale pixels go through the modality LUT (rescale slope/intercept) and then the first VOI
LUT or window centre/width, as a viewer would display them; without a VOI the full value range
is kept and `imaging.preprocess` scales it by percentiles. MONOCHROME1 is inverted so that high
values are bright, like every PNG/JPEG. Multi-frame objects are refused: choosing one slice of a
volume for the user would let a result look like it covers the whole series.
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from .errors import ImageError

__all__ = ["MODALITY_NAMES", "decode_dicom"]

_EXPORT_HINT = "Export the slice uncompressed (Explicit VR Little Endian) or as a PNG."
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

# DICOM modality codes (PS3.3 C.7.3.1.1.1, PS3.16 CID 29/33) that hold images, in plain words
# for the `wrong_modality` message; only text from this table ever reaches a user.
MODALITY_NAMES = {
    "MR": "magnetic resonance",
    "CT": "computed tomography",
    "CR": "computed radiography X-ray",
    "DX": "digital radiography X-ray",
    "RG": "radiographic X-ray",
    "IO": "intra-oral dental X-ray",
    "PX": "panoramic dental X-ray",
    "MG": "mammography",
    "RF": "fluoroscopy X-ray",
    "XA": "X-ray angiography",
    "BMD": "bone densitometry",
    "US": "ultrasound",
    "IVUS": "intravascular ultrasound",
    "PT": "PET, positron emission tomography",
    "NM": "nuclear medicine",
    "OT": "other modality",
    "XC": "external-camera photography",
    "ES": "endoscopy",
    "OP": "ophthalmic photography",
    "OPT": "ophthalmic tomography",
    "IVOCT": "intravascular optical coherence tomography",
    "SM": "slide microscopy",
    "GM": "general microscopy",
    "DG": "diaphanography",
    "TG": "thermography",
    "RTIMAGE": "radiotherapy portal imaging",
    "SEG": "segmentation",
}
# Letters whose spoken name starts with a vowel sound take "an": "an MG", "a CT", "a US".
_AN_LETTERS = frozenset("AEFHILMNORSX")


def _pydicom():
    """Import pydicom on first use, with value validation silenced.

    pydicom's default validation warns about malformed values and quotes them (a patient name
    included), and warnings may end up in a log; only pixels are used here, so nothing is lost.
    """
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


def _damaged() -> ImageError:
    return ImageError("corrupt_image", "The DICOM file is damaged or incomplete.")


def _read(data: bytes, header_only: bool):
    """Parse a DICOM Part 10 file (File Meta header required: `force=False`)."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=header_only, force=False)
    except Exception as exc:  # pydicom raises many types for malformed input
        raise _damaged() from exc


def _check_modality(ds) -> None:
    """Refuse a header whose Modality is present and is not MR; a missing one passes.

    Raises:
        ImageError: `wrong_modality`, naming the modality from MODALITY_NAMES only.
    """
    try:
        value = ds.get("Modality")
    except Exception as exc:  # a damaged element
        raise _damaged() from exc
    # A malformed multi-valued Modality has no single code: it is simply "not MR".
    code = str(value).strip().upper() if isinstance(value, str) else ("?" if value else "")
    if not code or code == "MR":
        return
    name = MODALITY_NAMES.get(code)
    if name is None:  # unknown or damaged: say so without quoting the header's text
        what = "not an MR (magnetic resonance) image (its header names another modality)"
    else:
        article = "an" if code[0] in _AN_LETTERS else "a"
        what = f"{article} {code} ({name}) image"
    raise ImageError(
        "wrong_modality",
        f"This DICOM file is {what}; BrainMRI only reads MR brain slices.",
    )


def _check_header(ds, max_pixels: int) -> tuple[int, str]:
    """Validate the header; return (samples per pixel, photometric interpretation).

    Raises:
        ImageError: not an image, not MR, too large, multi-frame, unsupported colour model or
            a compressed transfer syntax with no decoder installed.
    """
    from pydicom.pixels import get_decoder

    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(
            "not_an_image",
            "The DICOM file holds no image (it may be a report, a structured document or a "
            "presentation state). Upload the image series' slice instead.",
        )
    # Before the size and frame checks: "this is a CT" is the answer that helps most.
    _check_modality(ds)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
        syntax = ds.file_meta.TransferSyntaxUID
    except Exception as exc:  # missing file meta, or a value that is not a number
        raise _damaged() from exc
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise ImageError("corrupt_image", "The DICOM header declares an empty image.")
    if rows * columns * frames > max_pixels:
        raise ImageError(
            "image_too_large", f"The DICOM image is larger than the limit of {max_pixels:,} pixels."
        )
    if frames > 1:
        raise ImageError(
            "multi_frame",
            "This DICOM file holds several frames (a multi-frame series or volume). Only single "
            "slices are classified: export the one slice you want analysed as its own file.",
        )
    grey = samples == 1 and photometric in _GRAYSCALE
    if not (grey or (samples == 3 and photometric in _COLOUR)):
        raise ImageError(
            "unsupported_type",
            "This DICOM colour model is not supported. Export the slice as greyscale DICOM or PNG.",
        )
    if not syntax.is_transfer_syntax:
        raise ImageError(
            "unsupported_type", f"The DICOM transfer syntax is unknown. {_EXPORT_HINT}"
        )
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageError(
                "unsupported_type",
                f"This DICOM file is compressed with {syntax.name}, and no decoder for it is "
                f"installed. {_EXPORT_HINT}",
            )
    return samples, photometric


def _grayscale_values(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Modality LUT, then the first VOI LUT/window, then MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    try:
        values = apply_voi_lut(values, ds, index=0)
    except Exception:  # an invalid window (width < 1, bad LUT): keep the full range instead
        pass
    values = np.asarray(values, np.float64)
    inverse = str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        values = values.max() + values.min() - values
    return values


def decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode a single-frame DICOM image into a 2-D float32 grayscale array.

    Args:
        data: the file's bytes, starting with the 128-byte preamble and ``DICM``.
        max_pixels: refuse images whose header declares more pixels than this.

    Returns:
        (rows, columns) grayscale after the modality and VOI LUTs (MONOCHROME1 inverted), or
        the luma of a colour image: uint8 for an 8-bit display image (`_is_8_bit_display`),
        float32 otherwise.

    Raises:
        ImageError: damaged, non-image, non-MR (`wrong_modality`), multi-frame, oversized or
            undecodable input.
    """
    samples, photometric = _check_header(_read(data, header_only=True), max_pixels)
    ds = _read(data, header_only=False)
    if "PixelData" not in ds:
        raise ImageError("not_an_image", "The DICOM file holds no pixel data.")
    try:
        pixels = ds.pixel_array  # colour is converted to RGB by pydicom
        if samples == 3:
            if pixels.ndim != 3 or pixels.shape[2] != 3:
                raise ValueError("unexpected colour array shape")
            values = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        else:
            if pixels.ndim != 2:
                raise ValueError("unexpected grayscale array shape")
            values = _grayscale_values(pixels, ds, photometric)
    except ImageError:
        raise
    except Exception as exc:  # short pixel data, bad bit depths, decoder failures
        raise _damaged() from exc
    values = np.asarray(values, np.float64)
    # A slope or intercept near 1e38 gives values float32 cannot hold (inf after the cast).
    if not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float32).max:
        raise _damaged()
    if _is_8_bit_display(ds, photometric, values):
        return values.astype(np.uint8)
    return np.ascontiguousarray(values, dtype=np.float32)


def _is_8_bit_display(ds, photometric: str, values: np.ndarray) -> bool:
    """Whether the decoded values are 8-bit display values (0 black, 255 white), as a PNG's.

    True for an unsigned 8-bit colour or MONOCHROME2 image whose LUTs left whole numbers in
    0..255: its full scale is known, so `decode.peak_brightness` can judge it like the PNG or
    JPEG it was exported beside. MONOCHROME1 is left out because its inversion above runs
    between the image's own extremes, not the full scale.
    """
    try:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
    except (TypeError, ValueError):
        return False
    if bits > 8 or signed or photometric == "MONOCHROME1":
        return False
    if str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE":
        return False
    return bool(values.min() >= 0 and values.max() <= 255 and np.all(values == np.rint(values)))
