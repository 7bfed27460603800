"""The error every imaging step raises for input that cannot become a model input.

It lives here, below the decoders, so that `decode` and `dicom` both raise it without importing
each other; `web/errors.py` maps its codes to HTTP.
"""

from __future__ import annotations

__all__ = ["ImageError"]


class ImageError(ValueError):
    """An input that cannot become a model input; `message` is safe to show to a user.

    `code` is a stable machine-readable reason (`empty_file`, `not_an_image`,
    `unsupported_type`, `corrupt_image`, `image_too_large`, `multi_frame`); `web/errors.py`
    maps it to HTTP.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

