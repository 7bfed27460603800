"""Bytes to model input: decode PNG/JPEG/DICOM safely, then prepare what the network sees.

The lowest room: it imports nothing else from brainmri, and no Flask or TensorFlow. `load_scan`
is the one preprocessing path that serving, batch prediction, training and evaluation share.
"""

from .decode import DEFAULT_MAX_PIXELS
from .decode import SUPPORTED_FORMATS
from .decode import Decoded
from .decode import colourfulness
from .decode import decode_file
from .decode import decode_image
from .decode import image_dimensions
from .decode import peak_brightness
from .decode import sniff_format
from .dicom import MODALITY_NAMES
from .dicom import decode_dicom
from .archives import read_zip
from .errors import ImageError
from .preprocessing import PREPROCESSING
from .preprocessing import PREPROCESSING_VERSION
from .preprocessing import HeadCrop
from .preprocessing import Scan
from .preprocessing import apply_head_crop
from .preprocessing import crop_to_head
from .preprocessing import load_scan
from .preprocessing import locate_head
from .preprocessing import preprocess
from .preprocessing import read_scan
from .preprocessing import resize_mask
from .preprocessing import strip_frame
from .preprocessing import to_uint8
from .studies import Study
from .studies import StudyLimits
from .studies import StudySlice
from .studies import read_study
from .volumes import is_nifti
from .volumes import read_nifti

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MODALITY_NAMES",
    "PREPROCESSING",
    "PREPROCESSING_VERSION",
    "SUPPORTED_FORMATS",
    "Decoded",
    "HeadCrop",
    "ImageError",
    "Scan",
    "Study",
    "StudyLimits",
    "StudySlice",
    "apply_head_crop",
    "colourfulness",
    "crop_to_head",
    "decode_dicom",
    "decode_file",
    "decode_image",
    "image_dimensions",
    "is_nifti",
    "load_scan",
    "locate_head",
    "peak_brightness",
    "preprocess",
    "read_nifti",
    "read_scan",
    "read_study",
    "read_zip",
    "resize_mask",
    "sniff_format",
    "strip_frame",
    "to_uint8",
]
