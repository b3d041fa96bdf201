"""The example inputs the manifests in manifests/ condition on.

    .venv/bin/python scripts/make_example_inputs.py            # street.mp4, if missing
    .venv/bin/python scripts/make_example_inputs.py --images   # also redraw the committed PNGs

- ``manifests/inputs/street.mp4``: the source clip of video-to-video examples, made by
  ``farm.inputs.synthetic_clip`` (17 frames, 64×64, 8 fps). Videos are never committed: setup and
  the tests make it.
- ``manifests/inputs/packshots/{bottle,sneaker,watch}.png``: 128×128 product shots on a plain
  backdrop (image-to-video), committed.
- ``manifests/inputs/keyframes/{open,close}.png``: 128×72 first and last frames (first-last-frame
  to video): the opening frame is a wide shot of a bottle on a table, the closing frame a close-up
  of it (a push-in), committed.

Everything is drawn with Pillow from fixed shapes: the same pictures on every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from farm.inputs import synthetic_clip

ROOT = Path(__file__).resolve().parent.parent / "manifests" / "inputs"
BACKDROP = (238, 234, 226)
SHADOW = (206, 201, 192)
SIDE = 128


def bottle() -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), BACKDROP)
    ImageDraw.Draw(image).ellipse((38, 108, 90, 120), fill=SHADOW)
    image.paste(_bottle_layer(), mask=_bottle_layer())
    return image


def _bottle_layer() -> Image.Image:
    """The bottle alone, on transparency (128×128)."""
    image = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    d.rounded_rectangle((42, 44, 86, 114), radius=12, fill=(46, 110, 74))  # body
    d.rectangle((56, 20, 72, 48), fill=(46, 110, 74))  # neck
    d.rectangle((54, 12, 74, 24), fill=(180, 150, 60))  # cap
    d.rectangle((42, 66, 86, 94), fill=(242, 236, 214))  # label
    d.line((50, 76, 78, 76), fill=(120, 40, 40), width=3)
    d.line((54, 84, 74, 84), fill=(90, 90, 90), width=2)
    d.line((48, 50, 48, 104), fill=(110, 170, 130), width=3)  # highlight
    return image


def sneaker() -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), BACKDROP)
    d = ImageDraw.Draw(image)
    d.ellipse((14, 92, 118, 104), fill=SHADOW)
    d.polygon([(20, 86), (26, 56), (52, 50), (74, 66), (108, 74), (112, 86)], fill=(200, 50, 46))  # upper
    d.rounded_rectangle((16, 84, 114, 96), radius=5, fill=(248, 248, 246))  # sole
    d.line((16, 92, 114, 92), fill=(60, 60, 60), width=2)
    for x in (40, 48, 56):  # laces
        d.line((x, 56, x + 8, 66), fill=(250, 250, 250), width=2)
    d.arc((40, 62, 100, 92), start=200, end=320, fill=(250, 250, 250), width=3)  # side stripe
    return image


def watch() -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), BACKDROP)
    d = ImageDraw.Draw(image)
    d.rectangle((50, 4, 78, 124), fill=(110, 72, 44))  # strap
    d.line((50, 20, 78, 20), fill=(80, 50, 30), width=2)
    d.line((50, 108, 78, 108), fill=(80, 50, 30), width=2)
    d.ellipse((30, 34, 98, 102), fill=(150, 154, 160))  # case
    d.ellipse((36, 40, 92, 96), fill=(250, 250, 244))  # face
    d.rectangle((97, 64, 103, 72), fill=(150, 154, 160))  # crown
    for x, y in ((64, 44), (64, 88), (42, 68), (86, 68)):
        d.rectangle((x - 1, y - 2, x + 1, y + 2), fill=(40, 40, 40))
    d.line((64, 68, 64, 50), fill=(30, 30, 30), width=3)  # hands
    d.line((64, 68, 78, 76), fill=(30, 30, 30), width=2)
    d.ellipse((62, 66, 66, 70), fill=(180, 40, 40))
    return image


def _table_scene(table: int, bottle_height: int) -> Image.Image:
    """A 128×72 frame: a wall, a table whose top edge is at row ``table``, the bottle standing on it."""
    image = Image.new("RGB", (128, 72), (214, 222, 230))
    d = ImageDraw.Draw(image)
    d.rectangle((0, table, 127, 71), fill=(150, 108, 70))
    d.line((0, table, 127, table), fill=(120, 84, 52), width=2)
    product = _bottle_layer().crop((42, 12, 87, 115))  # 45×103
    size = (round(45 * bottle_height / 103), bottle_height)
    product = product.resize(size, Image.Resampling.LANCZOS)
    base = table + 4
    d.ellipse((64 - size[0] * 0.7, base - 2, 64 + size[0] * 0.7, base + 2), fill=(120, 84, 52))  # shadow
    image.paste(product, ((128 - size[0]) // 2, base - size[1]), mask=product)
    return image


def keyframe_open() -> Image.Image:
    """The opening frame: a wide shot."""
    return _table_scene(table=50, bottle_height=30)


def keyframe_close() -> Image.Image:
    """The closing frame: the bottle close up."""
    return _table_scene(table=60, bottle_height=58)


PICTURES: dict[str, Callable[[], Image.Image]] = {
    "packshots/bottle.png": bottle,
    "packshots/sneaker.png": sneaker,
    "packshots/watch.png": watch,
    "keyframes/open.png": keyframe_open,
    "keyframes/close.png": keyframe_close,
}


def write_pictures(root: Path) -> list[Path]:
    written = []
    for name, draw in PICTURES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw().save(path, format="PNG", optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", action="store_true", help="redraw the committed PNGs too")
    parser.add_argument("--force", action="store_true", help="make street.mp4 again even if it exists")
    parser.add_argument("--out", type=Path, default=ROOT, help=f"folder to write into (default {ROOT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    street = args.out / "street.mp4"
    if args.force or not street.exists():
        synthetic_clip(street)
        print(f"wrote {street} ({street.stat().st_size} bytes)")
    if args.images:
        for path in write_pictures(args.out):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
