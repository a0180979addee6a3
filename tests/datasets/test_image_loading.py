"""ImageListDataset: loading, transforms, and corrupt images (named error or counted skip)."""

import logging

import pytest
import torch
from PIL import Image

from vpeft.datasets import Datum, ImageListDataset


def _img(path, mode="RGB", color=0):
    Image.new(mode, (8, 8), color).save(path, format="PNG")
    return str(path)


def test_loads_rgb_with_transform(tmp_path):
    items = [Datum(_img(tmp_path / "a.png", "L", 200), 1, "a"), Datum(_img(tmp_path / "b.png"), 0, "b")]
    ds = ImageListDataset(items, transform=lambda im: torch.tensor(list(im.getpixel((0, 0)))))
    x, y = ds[0]
    assert y == 1 and x.tolist() == [200, 200, 200]  # grayscale converted to RGB
    img, _ = ImageListDataset(items)[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    assert ds.targets == [1, 0] and len(ds) == 2
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3) and batch[1].tolist() == [1, 0]


def test_corrupt_or_missing_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    ds = ImageListDataset([Datum(str(bad), 0, "x"), Datum(str(tmp_path / "gone.png"), 0, "x")])
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]
    with pytest.raises(ValueError, match="gone.png"):
        ds[1]


def test_skip_corrupt_logs_the_count(tmp_path, caplog):
    good = [Datum(_img(tmp_path / f"g{i}.png"), i, str(i)) for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"garbage")
    bad = [Datum(str(tmp_path / "bad.png"), 9, "bad"), Datum(str(tmp_path / "missing.png"), 9, "bad")]
    with caplog.at_level(logging.WARNING, logger="vpeft.datasets.folder"):
        ds = ImageListDataset([good[0], bad[0], good[1], bad[1], good[2]], skip_corrupt=True)
    assert ds.items == good and len(ds.skipped) == 2
    assert "skipped 2 of 5" in caplog.text and "bad.png" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 images"):
        ImageListDataset(bad, skip_corrupt=True)
