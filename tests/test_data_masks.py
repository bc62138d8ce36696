"""Mask and image decoding: RLE (compressed / uncompressed), polygons, PNG modes, nearest resize, EXIF, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_data_real_formats import _column_major_runs

from dualloop.data.masks import (
    BadSample,
    decode_polygons,
    decode_rle,
    decode_segmentation,
    encode_rle,
    read_image,
    read_png_mask,
    resize_nearest,
    rle_area,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


def _random_mask(h=23, w=31, seed=0):
    return (np.random.default_rng(seed).random((h, w)) > 0.6).astype(np.uint8)


def test_rle_round_trip_compressed_and_uncompressed():
    m = _random_mask()
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [23, 31]
    np.testing.assert_array_equal(decode_rle(rle, 23, 31), m)
    assert rle_area(rle) == int(m.sum()) and rle_area(None) == 0 and rle_area({}) == 0
    # uncompressed: run lengths in column-major order, starting with zeros
    runs = _column_major_runs(m)
    np.testing.assert_array_equal(decode_rle({"size": [23, 31], "counts": runs}, 23, 31), m)


def test_rle_size_mismatch_and_garbage_are_bad_samples():
    rle = encode_rle(_random_mask())
    with pytest.raises(BadSample, match="RLE size 23x31 differs from the image size 31x23"):
        decode_rle(rle, 31, 23, where="f.json")
    with pytest.raises(BadSample, match="counts sum"):
        decode_rle({"size": [4, 4], "counts": [3, 2]}, 4, 4)
    with pytest.raises(BadSample, match="not a COCO RLE"):
        decode_rle([1, 2, 3], 4, 4)


def test_polygons_match_pycocotools_rasterisation():
    square = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]
    m = decode_polygons(square, 12, 14)
    assert m.shape == (12, 14) and m.dtype == np.uint8
    assert m[5, 5] == 1 and m[0, 0] == 0 and m[5, 12] == 0
    assert abs(int(m.sum()) - 8 * 6) <= 14  # the area of the polygon, up to its boundary pixels
    both = decode_segmentation(square + [[11.0, 9.0, 13.0, 9.0, 13.0, 11.0]], 12, 14)
    assert both.sum() > m.sum()
    np.testing.assert_array_equal(decode_segmentation(square[0], 12, 14), m)  # flat, without the outer list
    with pytest.raises(BadSample, match="polygon"):
        decode_polygons([[1.0, 2.0]], 12, 14)


def test_png_modes_thresholds_and_resize(tmp_path):
    m = _random_mask(16, 20, seed=1)
    Image.fromarray(m * 255).save(tmp_path / "l.png")
    Image.fromarray(m.astype(bool)).save(tmp_path / "bit.png")
    assert Image.open(tmp_path / "bit.png").mode == "1"
    grey = (m * 127).astype(np.uint8)  # below the OpenImages threshold of 128
    Image.fromarray(grey).save(tmp_path / "grey.png")
    pal = Image.fromarray(m * 3).convert("P")
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_png_mask(tmp_path / "l.png"), m)
    np.testing.assert_array_equal(read_png_mask(tmp_path / "bit.png"), m)
    assert read_png_mask(tmp_path / "grey.png").sum() == 0
    np.testing.assert_array_equal(read_png_mask(tmp_path / "grey.png", threshold=1), m)
    np.testing.assert_array_equal(read_png_mask(tmp_path / "p.png", threshold=1), m)
    two_colour = Image.fromarray(m, mode="L").convert("P")  # indices 0/1 ...
    two_colour.putpalette([0, 0, 0, 255, 255, 255])  # ... black and white: a binary mask in palette form
    two_colour.save(tmp_path / "bw.png")
    assert Image.open(tmp_path / "bw.png").mode == "P"
    np.testing.assert_array_equal(read_png_mask(tmp_path / "bw.png"), m)  # as intensity (OpenImages' 128)
    np.testing.assert_array_equal(read_png_mask(tmp_path / "bw.png", threshold=1), m)  # as indices (SA-V)
    up = read_png_mask(tmp_path / "l.png", size=(32, 40))
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 2), np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadSample, match="unreadable mask PNG"):
        read_png_mask(tmp_path / "bad.png")


@pytest.mark.parametrize("shape,out", [((7, 9), (16, 5)), ((16, 16), (5, 7)), ((3, 3), (3, 3))])
def test_resize_nearest_is_torch_nearest(shape, out):
    m = _random_mask(*shape, seed=2)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=out, mode="nearest")
    np.testing.assert_array_equal(resize_nearest(m, *out), ref[0, 0].numpy().astype(np.uint8))


def test_read_image_keeps_stored_grid_and_flags_bad_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display": must NOT be applied
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "r.jpg").shape == (10, 20, 3)
    Image.fromarray(arr[..., 0]).save(tmp_path / "grey.png")
    g = read_image(tmp_path / "grey.png")
    assert g.shape == (10, 20, 3) and (g[..., 0] == arr[..., 0]).all()
    data = (tmp_path / "r.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSample, match="unreadable image"):
        read_image(tmp_path / "trunc.jpg")
    with pytest.raises(BadSample, match="missing"):
        read_image(tmp_path / "absent.jpg")
