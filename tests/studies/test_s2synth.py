"""The synthetic Sentinel-2 generator and the tile dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studies.wheat import s2synth
from studies.wheat.s2 import BandStats, S2TileDataset
from studies.wheat.s2synth import BANDS, CLASSES, WHEAT_VS_OTHER, generate, generate_tile


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s2a")
    generate(out, area="A", year=2020, tiles=12, seed=0, labelled_fraction=0.8)
    return out


def _season_day(doy: np.ndarray) -> np.ndarray:
    """Days since 1 September (doy 243 in a common year)."""
    return (doy - 243) % 365


def test_tile_shapes_and_values() -> None:
    tile = generate_tile(np.random.default_rng(0), "A", 2020, size=24, cloud_mask=True)
    assert tile["images"].shape == (9, len(BANDS), 24, 24) and tile["images"].dtype == np.float32
    assert tile["doy"].shape == (9,) and tile["doy"].dtype == np.int64
    assert tile["labels"].shape == (24, 24) and tile["mask"].dtype == bool
    assert tile["clouds"].shape == (9, 24, 24)
    assert tile["images"].min() >= 0.0 and tile["images"].max() <= 1.0
    assert set(np.unique(tile["labels"])) <= set(range(len(CLASSES)))
    # Monthly composites from mid-November to mid-July, in time order.
    season = _season_day(tile["doy"])
    assert np.all(np.diff(season) > 20) and 65 <= season[0] <= 85 and 305 <= season[-1] <= 325
    irr = generate_tile(np.random.default_rng(0), "B", 2021, size=16, dates="irregular", n_dates=14)
    assert irr["images"].shape == (14, 10, 16, 16)
    assert np.all(np.diff(_season_day(irr["doy"])) > 0)


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", area="B", year=2021, tiles=2, seed=7)
    b = generate(tmp_path / "b", area="B", year=2021, tiles=2, seed=7)
    c = generate(tmp_path / "c", area="B", year=2021, tiles=2, seed=8)
    for pa, pb, pc in zip(a, b, c, strict=True):
        za, zb, zc = np.load(pa), np.load(pb), np.load(pc)
        for key in ("images", "doy", "labels", "mask"):
            np.testing.assert_array_equal(za[key], zb[key])
        assert not np.array_equal(za["images"], zc["images"])
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["bands"] == list(BANDS) and meta["classes"]["1"] == "winter_wheat"
    assert meta["binary"]["map"]["1"] == 1 and sum(meta["binary"]["map"].values()) == 1
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_phenology_wheat_peaks_before_maize() -> None:
    """Mean NDVI of winter wheat peaks >= 60 days before maize's (cloud-free tiles)."""
    rng = np.random.default_rng(3)
    ndvi_sum = {1: np.zeros(9), 3: np.zeros(9)}
    count = {1: 0, 3: 0}
    season = None
    for _ in range(10):
        tile = generate_tile(rng, "A", 2020, clouds=False)
        img, lab = tile["images"], tile["labels"]
        ndvi = (img[:, 6] - img[:, 2]) / (img[:, 6] + img[:, 2])
        season = _season_day(tile["doy"])
        for c in ndvi_sum:
            if (lab == c).any():
                ndvi_sum[c] += ndvi[:, lab == c].mean(1)
                count[c] += 1
    assert season is not None and count[1] and count[3]
    wheat, maize = ndvi_sum[1] / count[1], ndvi_sum[3] / count[3]
    assert season[maize.argmax()] - season[wheat.argmax()] >= 60
    assert wheat.max() > 0.6 and maize.max() > 0.6
    assert wheat[0] > maize[0]  # winter wheat is already up in November
    # Vegetation spectra: red low and NIR high at wheat's peak.
    curve = s2synth.ndvi_curve(1, np.array([240.0]))
    assert curve[0] > 0.7


def test_domain_shift_knobs() -> None:
    def bare(area: str) -> np.ndarray:
        prof = s2synth.AREAS[area]
        only_fallow = s2synth.AreaProfile(prof.soil, (0, 0, 0, 0, 0, 0, 1.0), prof.field_px)
        tile = generate_tile(np.random.default_rng(0), only_fallow, 2020, clouds=False)
        return tile["images"][-1].mean(axis=(1, 2))  # July: bare soil after the weedy bump

    a, b = bare("A"), bare("B")
    np.testing.assert_allclose(a, s2synth.AREAS["A"].soil, rtol=0.1)
    assert b[2] > a[2] + 0.04  # area B's red soil is brighter in B4
    assert s2synth.AREAS["B"].field_px < s2synth.AREAS["A"].field_px
    assert s2synth.year_profile(2020) == s2synth.year_profile(2020)
    assert s2synth.year_profile(2020).shift != s2synth.year_profile(2021).shift
    with pytest.raises(ValueError, match="unknown area 'Z'"):
        generate_tile(np.random.default_rng(0), "Z", 2020)


def test_standardisation_is_zero_mean_unit_std(train_dir: Path) -> None:
    ds = S2TileDataset(train_dir)
    x = torch.stack([ds[i]["x"] for i in range(len(ds))])  # (N, T, C, H, W)
    per_band = x.transpose(0, 2).reshape(len(BANDS), -1).double()
    assert per_band.mean(1).abs().max() < 1e-4
    assert (per_band.std(1, unbiased=False) - 1).abs().max() < 1e-4
    # Statistics passed to another split are used as given.
    val = S2TileDataset(train_dir, stats=ds.stats)
    torch.testing.assert_close(val[0]["x"], ds[0]["x"])
    stats_path = train_dir / "stats.json"
    ds.stats.save(stats_path)
    assert BandStats.load(stats_path) == ds.stats


def test_label_map_and_ignore_index(train_dir: Path) -> None:
    ds = S2TileDataset(train_dir, label_map=WHEAT_VS_OTHER, ignore_index=-1)
    raw = np.load(sorted(train_dir.glob("*.npz"))[0])
    y = ds[0]["y"].numpy()
    assert set(np.unique(y)) <= {-1, 0, 1}
    np.testing.assert_array_equal(y == -1, ~raw["mask"])
    np.testing.assert_array_equal(y == 1, (raw["labels"] == 1) & raw["mask"])
    with pytest.raises(ValueError, match="label_map has no entry"):
        S2TileDataset(train_dir, stats=ds.stats, label_map={0: 0})[0]


def test_flips_are_consistent_and_deterministic(train_dir: Path) -> None:
    plain = S2TileDataset(train_dir)
    aug = S2TileDataset(train_dir, stats=plain.stats, train=True, seed=1)
    seen = set()
    for i in range(len(plain)):
        p, a = plain[i], aug[i]
        found = None
        for dims in ((), (-1,), (-2,), (-2, -1)):
            x = p["x"].flip(dims) if dims else p["x"]
            y = p["y"].flip(dims) if dims else p["y"]
            if torch.equal(x, a["x"]):
                found = dims
                assert torch.equal(y, a["y"])  # labels flipped like the images
        assert found is not None
        seen.add(found)
        assert torch.equal(aug[i]["x"], a["x"])  # same epoch, same flips
    assert len(seen) > 1
    before = [aug[i]["x"] for i in range(len(aug))]
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i]["x"], before[i]) for i in range(len(aug)))


def test_geotiff_needs_rasterio(tmp_path: Path) -> None:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        from studies.wheat.s2 import load_geotiff_stack

        with pytest.raises(ImportError, match="pip install rasterio"):
            load_geotiff_stack([tmp_path / "a.tif"], [10])
    else:  # pragma: no cover - depends on the environment
        pytest.skip("rasterio is installed")


def test_plot_tile(train_dir: Path, tmp_path: Path) -> None:
    out = s2synth.plot_tile(sorted(train_dir.glob("*.npz"))[0], tmp_path / "tile.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
