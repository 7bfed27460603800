"""ZIP bytes to its member files, in memory, refusing bombs, path tricks and foreign content.

Nothing is extracted to disk; each member is read into memory with a hard cap on the bytes
actually inflated (a member's declared size can lie), and the whole archive's inflated total is
capped too. Names are used only to order the slices and to tell file types apart; they never
leave this module in a message.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from dataclasses import dataclass

from .errors import ImageError

__all__ = ["MAX_RATIO", "Member", "is_zip", "read_zip"]

# A member that inflates to more than this many times its compressed size is refused: MR slices
# compress 2-5x, a zip bomb 1000x.
MAX_RATIO = 100
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ALLOWED = (".png", ".jpg", ".jpeg", ".dcm", "")
# Operating-system clutter that archivers add; skipped, never opened.
_CLUTTER = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class Member:
    """One file from the archive: its path inside it (for ordering only) and its bytes."""

    name: str
    data: bytes


def is_zip(data: bytes) -> bool:
    """True when the bytes start like a ZIP archive."""
    return data[:4] in _ZIP_MAGIC


def _refuse(message: str) -> ImageError:
    return ImageError("bad_archive", message)


def _is_clutter(name: str) -> bool:
    base = posixpath.basename(name)
    return (name.startswith("__MACOSX/") or base.startswith("._")
            or base in _CLUTTER)


def read_zip(data: bytes, max_files: int, max_bytes: int) -> list[Member]:
    """The archive's slice files, in archive order, read into memory with limits.

    Args:
        data: the ZIP file's bytes.
        max_files: the most files it may hold (directories and OS clutter not counted).
        max_bytes: the most all members may inflate to together.

    Raises:
        ImageError: `bad_archive` (damaged, encrypted, nested, a path trick, a member that is not
            a PNG/JPEG/DICOM file, a compression ratio over MAX_RATIO), `too_many_slices` or
            `study_too_large`; the message names the limit.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise _refuse("The ZIP archive is damaged or incomplete.") from exc
    files = [info for info in infos if not info.is_dir() and not _is_clutter(info.filename)]
    if not files:
        raise _refuse("The ZIP archive holds no files.")
    if len(files) > max_files:
        raise ImageError("too_many_slices", f"The ZIP archive holds {len(files)} files; the limit "
                         f"is {max_files} slices a study (BRAINMRI_STUDY_MAX_SLICES).")
    declared = sum(info.file_size for info in files)
    if declared > max_bytes:
        raise ImageError("study_too_large", f"The ZIP archive inflates to {declared:,} bytes; the "
                         f"limit is {max_bytes:,} (BRAINMRI_STUDY_MAX_BYTES).")
    members: list[Member] = []
    total = 0
    for info in files:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise _refuse("The ZIP archive holds a path that points outside it (an absolute path "
                          "or '..'); it was refused.")
        if info.flag_bits & 0x1:
            raise _refuse("The ZIP archive is encrypted; send it without a password.")
        extension = posixpath.splitext(name.lower())[1]
        if extension in (".zip", ".gz", ".nii"):
            raise _refuse("The ZIP archive holds another archive or a volume; put the slices "
                          "(PNG, JPEG or DICOM) in it directly.")
        if extension not in _ALLOWED:
            raise _refuse("The ZIP archive holds a file that is not a PNG, JPEG or DICOM slice "
                          "(.png, .jpg, .jpeg, .dcm); it was refused.")
        if info.compress_size and info.file_size > MAX_RATIO * info.compress_size:
            raise _refuse(f"A file in the ZIP archive inflates more than {MAX_RATIO} times its "
                          "compressed size (a zip bomb?); it was refused.")
        budget = min(max_bytes - total, MAX_RATIO * max(info.compress_size, 1))
        try:
            with archive.open(info) as handle:
                content = handle.read(budget + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError,
                ValueError) as exc:
            raise _refuse("A file in the ZIP archive is damaged or uses an unsupported "
                          "compression.") from exc
        if len(content) > budget:  # the declared size lied
            if total + len(content) > max_bytes:
                raise ImageError("study_too_large", "The ZIP archive inflates to more than "
                                 f"{max_bytes:,} bytes, the limit (BRAINMRI_STUDY_MAX_BYTES).")
            raise _refuse(f"A file in the ZIP archive inflates more than {MAX_RATIO} times its "
                          "compressed size (a zip bomb?); it was refused.")
        total += len(content)
        if is_zip(content):
            raise _refuse("The ZIP archive holds another archive; put the slices in it directly.")
        members.append(Member(name, content))
    return members
