"""The example grid of docs/synthetic_data.md."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from eye_fundus.synthetic.catalogue import BROAD_CLASSES, _catalogue
from eye_fundus.synthetic.dataset import _plan
from eye_fundus.synthetic.render import _render_image


def write_example_grid(path, per_class: int = 4, image_size: int = 128, seed: int = 0) -> None:
    """Write a PNG grid: one row per broad class, ``per_class`` images per row, each
    captioned with its fine label (class name on the left).  Images are those of the
    default data set with this ``seed`` (distinct patients and fine labels preferred)."""
    catalogue = _catalogue(60, int(seed))
    specs = _plan(40 * per_class, 0, seed, catalogue)  # planning is cheap; render few
    font = ImageFont.load_default()
    label_w, line_h, pad = 80, 11, 6
    tile_w, tile_h = image_size + pad, image_size + 4 * line_h + pad
    grid = Image.new("RGB", (label_w + per_class * tile_w, len(BROAD_CLASSES) * tile_h), "white")
    draw = ImageDraw.Draw(grid)
    for row, broad in enumerate(BROAD_CLASSES):
        draw.text((4, row * tile_h + image_size // 2), broad, fill="black", font=font)
        chosen, patients, labels = [], set(), set()
        for spec in specs:
            if spec.fine.broad == broad and spec.patient not in patients and spec.fine.name not in labels:
                chosen.append(spec)
                patients.add(spec.patient)
                labels.add(spec.fine.name)
            if len(chosen) == per_class:
                break
        for col, spec in enumerate(chosen):
            x0, y0 = label_w + col * tile_w, row * tile_h
            f = spec.fine
            image = _render_image(image_size, seed, spec.stream, spec.patient, spec.visit, f.eye, f.broad,
                                  f.attributes)
            grid.paste(Image.fromarray(image), (x0, y0))
            lines = []
            for part in f.name.split(" | ")[1:]:  # wrap each label part to the tile width
                words = part.split()
                while words:
                    k = len(words)
                    while k > 1 and draw.textlength(" ".join(words[:k]), font=font) > image_size:
                        k -= 1
                    lines.append(" ".join(words[:k]))
                    words = words[k:]
            for k, line in enumerate(lines[:4]):
                draw.text((x0, y0 + image_size + 1 + line_h * k), line, fill="black", font=font)
    grid.save(path, optimize=True)
