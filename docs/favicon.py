"""Draw static/favicon.ico: the brand mark, an axial brain slice in white on the accent blue.

Run once (``uv run python docs/favicon.py``) and commit the result; nothing runs it at serve time.
Drawn at 256 px and scaled down, so the 16, 32 and 48 px images in the ICO stay smooth. The
colour is the pages' --accent (static/css/app.css).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from PIL import ImageDraw

ACCENT = "#1f5fae"
SIZES = [(16, 16), (32, 32), (48, 48)]
OUT = Path(__file__).resolve().parent.parent / "static" / "favicon.ico"


def draw(side: int = 256) -> Image.Image:
    """The mark on a `side` px transparent square."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    s = side / 256  # the shapes below are laid out on a 256 px grid
    pen.rounded_rectangle((0, 0, side - 1, side - 1), radius=round(56 * s), fill=ACCENT)
    # The slice: an oval head, the midline between the hemispheres, and the two lateral
    # ventricles curving away from it, ") (", as an axial MRI slice shows them.
    pen.ellipse((40 * s, 46 * s, 216 * s, 214 * s), fill="white")
    pen.line((128 * s, 56 * s, 128 * s, 204 * s), fill=ACCENT, width=round(20 * s))
    for box, start, end in (((40, 86, 108, 174), 290, 70), ((148, 86, 216, 174), 110, 250)):
        pen.arc(tuple(v * s for v in box), start, end, fill=ACCENT, width=round(18 * s))
    return image


def main() -> None:
    """Write the ICO with every size in SIZES."""
    draw().save(OUT, format="ICO", sizes=SIZES)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
