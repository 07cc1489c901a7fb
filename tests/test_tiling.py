"""tiling: tile origins cover the image, tent weights never vanish, blending is seamless."""

import numpy as np
import pytest

from vsbench.tiling import blend, blend_weights, tent, tile_origins, tile_starts


def test_tiles_cover_the_volume_and_weights_never_vanish():
    for size, tile, overlap in ((100, 32, 0.25), (64, 64, 0.25), (20, 64, 0.5), (97, 16, 0.0)):
        starts = tile_starts(size, tile, overlap)
        t = min(tile, size)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + t] = True
        assert covered.all() and starts[-1] + t == size and starts == sorted(set(starts))
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]
    w = tent(7)
    np.testing.assert_allclose(w, [0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25])
    assert blend_weights(5, 8).min() > 0 and blend_weights(5, 8).shape == (5, 8)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(10, 4, 1.0)


def test_origins_are_row_major_and_clipped():
    assert tile_origins((128, 128), 64, 0.5) == [(y, x) for y in (0, 32, 64) for x in (0, 32, 64)]
    assert tile_origins((40, 100), 64, 0.0) == [(0, 0), (0, 36)]


def test_blend_of_crops_reproduces_the_image():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 70, 90)).astype(np.float32)
    origins = tile_origins(image.shape[-2:], 32, 0.25)
    tiles = [image[:, y : y + 32, x : x + 32] for y, x in origins]
    np.testing.assert_allclose(blend(tiles, origins, image.shape[-2:]), image, rtol=1e-5, atol=1e-6)


def test_blend_weights_each_tile_by_its_tent():
    """Two overlapping constant tiles: the overlap is the tent-weighted mean, not a seam."""
    out = blend([np.zeros((1, 4)), np.ones((1, 4))], [(0, 0), (0, 2)], (1, 6))
    w = tent(4)  # [0.5, 1, 1, 0.5]
    expected = [0, 0, w[0] / (w[2] + w[0]), w[1] / (w[3] + w[1]), 1, 1]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_blend_rejects_gaps_and_mismatched_lists():
    with pytest.raises(ValueError, match="cover"):
        blend([np.ones((2, 2))], [(0, 0)], (2, 4))
    with pytest.raises(ValueError, match="origins"):
        blend([np.ones((2, 2))], [], (2, 2))
