"""Seeded synthetic Sentinel-2 time series of crop fields (a stand-in for PASTIS / Beqaa tiles).

A tile is built in four steps:

1. **Parcels**: a Voronoi partition of a rotated, stretched plane (elongated fields) whose seed
   density gives the area's mean field size; each parcel draws a class from the area's priors.
2. **Phenology**: per class a double-logistic NDVI curve over the season day ``s`` (days since
   1 September of the year before harvest)::

       green(s) = v0 + (vw - v0) L(s; e, 10) + (vmax - vw) L(s; sos, rs)
       ndvi(s)  = v0 + (green(s) - v0) (1 - L(s; eos, rf))      L(s; m, r) = 1 / (1 + e^{-(s-m)/r})

   ``e`` is emergence (winter cereals show a low winter plateau ``vw``), ``sos``/``eos`` green-up
   and senescence/harvest. Winter wheat greens up in March and is harvested in late June; barley
   two weeks earlier; maize and sunflower green up in May-June; alfalfa/grassland stays green with
   cuts; fallow stays bare with a weedy spring bump. Each field jitters the dates (~7 days) and
   ``vmax``; the *year* shifts all dates and scales vigour.
3. **Reflectance**: for each band a linear mix ``f·veg + (1-f)·soil`` of a green-vegetation and
   the area's soil spectrum (wetter soil is darker in winter). The cover fraction ``f`` is the one
   whose B8/B4 NDVI equals the curve (the mix's NDVI is a ratio of lines in ``f``, solved exactly),
   plus smooth within-field variation and Gaussian sensor noise.
4. **Acquisitions and atmosphere**: 9 monthly composites (15 Nov .. 15 Jul, jittered) or
   irregular dates; clouds (bright, SWIR-darker blobs) with shadows (darkened, shifted blobs).

Domain shift: ``area`` changes the soil spectrum, class priors and field size; ``year`` shifts
phenology, vigour, cloudiness and soil wetness. Everything derives from the given generator, so a
seed reproduces a data set bit for bit. Class ids: see :data:`CLASSES`; :data:`WHEAT_VS_OTHER`
maps them to winter wheat (1) vs other (0). Unlabelled parcels keep their class in ``labels`` and
are ``False`` in ``mask`` (the loss ignores them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from slimtune.io import atomic_write

__all__ = [
    "CLASSES",
    "BANDS",
    "WINTER_WHEAT",
    "WHEAT_VS_OTHER",
    "AREAS",
    "AreaProfile",
    "YearProfile",
    "year_profile",
    "season_doy",
    "ndvi_curve",
    "generate_tile",
    "generate",
    "plot_tile",
]

CLASSES = (
    "other",
    "winter_wheat",
    "winter_barley",
    "maize",
    "sunflower",
    "alfalfa_grassland",
    "fallow_bare_soil",
)
"""Class names; the class id is the index (0 = background/other: built-up, trees, roads)."""
WINTER_WHEAT = 1
WHEAT_VS_OTHER = {c: int(c == WINTER_WHEAT) for c in range(len(CLASSES))}
"""Label map multi-class -> binary (1 = winter wheat, 0 = other)."""
BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
_RED, _NIR = BANDS.index("B4"), BANDS.index("B8")

# Reflectance spectra (B2 .. B12) of full green cover, built-up surfaces and cloud tops.
_VEG = np.array([0.03, 0.07, 0.035, 0.10, 0.30, 0.40, 0.45, 0.46, 0.22, 0.10])
_BUILT = np.array([0.12, 0.14, 0.16, 0.18, 0.19, 0.20, 0.21, 0.21, 0.25, 0.22])
_CLOUD = np.array([0.46, 0.46, 0.47, 0.47, 0.48, 0.48, 0.49, 0.49, 0.34, 0.24])

# Phenology per class: (emergence e, winter level vw, sos, rs, eos, rf, vmax, base v0).
_PHENO: dict[int, tuple[float, float, float, float, float, float, float, float]] = {
    1: (75, 0.38, 190, 9, 290, 7, 0.82, 0.14),  # winter wheat: green-up Mar, harvest late Jun
    2: (70, 0.38, 178, 9, 275, 7, 0.78, 0.14),  # winter barley: ~2 weeks earlier
    3: (0, 0.14, 280, 8, 400, 10, 0.86, 0.14),  # maize: sown Apr-May, peak Jul-Aug
    4: (0, 0.14, 262, 8, 360, 8, 0.74, 0.14),  # sunflower: sown Apr, peak Jun-Jul
    5: (-60, 0.45, 180, 12, 500, 10, 0.78, 0.20),  # alfalfa/grassland: perennial (+ cuts)
    6: (0, 0.14, 200, 12, 250, 10, 0.40, 0.12),  # fallow: weedy spring bump
}


@dataclass(frozen=True)
class AreaProfile:
    """What changes between areas (regions)."""

    soil: tuple[float, ...]
    """Dry soil reflectance for the 10 bands."""
    priors: tuple[float, ...]
    """Class probabilities of a parcel (one per class, summing to 1)."""
    field_px: float
    """Mean field size in pixels (10 m pixels: 100 px = 1 ha)."""

    def __post_init__(self) -> None:
        if len(self.soil) != len(BANDS) or not all(0 < s < 1 for s in self.soil):
            raise ValueError(f"soil must hold {len(BANDS)} reflectances in (0, 1), got {self.soil}")
        p = np.asarray(self.priors, dtype=float)
        if p.shape != (len(CLASSES),) or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise ValueError(
                f"priors must be {len(CLASSES)} probabilities summing to 1, got {self.priors}"
            )
        if not self.field_px > 1:
            raise ValueError(f"field_px must be > 1, got {self.field_px!r}")


AREAS: dict[str, AreaProfile] = {
    # Source domain (France-like, PASTIS-style): brown soil, varied crops, medium fields.
    "A": AreaProfile(
        (0.08, 0.11, 0.14, 0.17, 0.19, 0.21, 0.23, 0.24, 0.32, 0.28),
        (0.12, 0.22, 0.12, 0.18, 0.12, 0.14, 0.10),
        120.0,
    ),
    # Target domain (Beqaa-like): red, brighter soil, wheat-dominated, small fields.
    "B": AreaProfile(
        (0.10, 0.14, 0.21, 0.25, 0.27, 0.28, 0.29, 0.30, 0.39, 0.34),
        (0.15, 0.35, 0.10, 0.07, 0.05, 0.10, 0.18),
        60.0,
    ),
    # Cross-area test: pale calcareous soil, summer-crop dominated, large fields.
    "C": AreaProfile(
        (0.13, 0.17, 0.20, 0.23, 0.25, 0.26, 0.27, 0.28, 0.36, 0.30),
        (0.10, 0.15, 0.08, 0.30, 0.17, 0.12, 0.08),
        180.0,
    ),
}


@dataclass(frozen=True)
class YearProfile:
    """What changes between years (derived deterministically from the year)."""

    shift: float
    """Days added to every phenological date (late spring > 0)."""
    vigour: float
    """Multiplier of the peak green-up (drought < 1)."""
    cloud_prob: float
    """Probability that an acquisition is cloudy."""
    wetness: float
    """Winter soil wetness in [0, 1] (wet soil is darker)."""


def year_profile(year: int) -> YearProfile:
    """The weather of ``year``: a deterministic draw (the same year always gives the same)."""
    r = np.random.default_rng([int(year), 2023])
    return YearProfile(
        shift=float(r.uniform(-12, 12)),
        vigour=float(r.uniform(0.9, 1.05)),
        cloud_prob=float(r.uniform(0.15, 0.4)),
        wetness=float(r.uniform(0.2, 0.8)),
    )


def season_doy(year: int, season_days: np.ndarray) -> np.ndarray:
    """Day of year (0..365) of season days (days since 1 September of ``year - 1``)."""
    start = dt.date(year - 1, 9, 1)
    out = []
    for s in np.asarray(season_days, dtype=int):
        d = start + dt.timedelta(days=int(s))
        out.append((d - dt.date(d.year, 1, 1)).days)
    return np.asarray(out, dtype=np.int64)


def _logistic(s: np.ndarray, mid: float, rate: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip((s - mid) / rate, -50, 50)))


def ndvi_curve(cls: int, s: np.ndarray, shift: float = 0.0, vigour: float = 1.0) -> np.ndarray:
    """Double-logistic NDVI of crop class ``cls`` (1..6) on season days ``s`` (module docstring)."""
    if cls not in _PHENO:
        raise ValueError(f"no phenology for class {cls!r}; crop classes are {sorted(_PHENO)}")
    e, vw, sos, rs, eos, rf, vmax, v0 = _PHENO[cls]
    vmax = v0 + (vmax - v0) * vigour
    s = np.asarray(s, dtype=float)
    green = (
        v0 + (vw - v0) * _logistic(s, e + shift, 10) + (vmax - vw) * _logistic(s, sos + shift, rs)
    )
    ndvi = v0 + (green - v0) * (1 - _logistic(s, eos + shift, rf))
    if cls == 5:  # cuts of alfalfa/grassland in May, June and July
        for cut in (255, 290, 325):
            ndvi = ndvi - 0.3 * np.exp(-0.5 * ((s - cut - shift) / 6) ** 2)
    return ndvi


def _cover(ndvi: np.ndarray, soil: np.ndarray, veg: np.ndarray = _VEG) -> np.ndarray:
    """Vegetation fraction f in [0, 1] whose soil/vegetation mix has the given B8/B4 NDVI."""
    rs, ns, rv, nv = soil[..., _RED], soil[..., _NIR], veg[_RED], veg[_NIR]
    num = ns - rs - ndvi * (ns + rs)
    den = ndvi * (nv - ns + rv - rs) - (nv - ns - rv + rs)
    return np.clip(num / np.where(np.abs(den) < 1e-9, 1e-9, den), 0.0, 1.0)


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth noise with unit standard deviation (last two axes filtered)."""
    z = ndimage.gaussian_filter(
        rng.standard_normal(shape), sigma=(0,) * (len(shape) - 2) + (sigma, sigma)
    )
    return z / max(float(z.std()), 1e-9)


def _parcels(rng: np.random.Generator, size: int, field_px: float) -> np.ndarray:
    """Voronoi parcel ids (H, W) of elongated fields with mean area ``field_px``."""
    pad = size // 2
    n = max(2, int(rng.poisson((size + 2 * pad) ** 2 / field_px)))
    seeds = rng.uniform(-pad, size + pad, (n, 2))
    theta, stretch = rng.uniform(0, np.pi), rng.uniform(1.0, 2.5)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    yy, xx = np.mgrid[0:size, 0:size]
    pix = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    scale = np.array([1.0, 1.0 / stretch])
    d = (((pix @ rot.T)[:, None] - (seeds @ rot.T)[None]) * scale) ** 2
    _, ids = np.unique(d.sum(-1).argmin(1), return_inverse=True)
    return ids.reshape(size, size)


def _dates(rng: np.random.Generator, dates: str, n_dates: int) -> np.ndarray:
    """Season days of the acquisitions, sorted."""
    if dates == "monthly":  # 15 Nov (season day 75) .. 15 Jul, monthly composites
        return np.array([75 + round(30.4 * i) + int(rng.integers(-5, 6)) for i in range(9)])
    if dates == "irregular":
        return np.sort(rng.choice(np.arange(61, 334), size=n_dates, replace=False))
    raise ValueError(f"dates must be 'monthly' or 'irregular', got {dates!r}")


def generate_tile(
    rng: np.random.Generator,
    area: str | AreaProfile = "A",
    year: int = 2020,
    size: int = 24,
    *,
    dates: str = "monthly",
    n_dates: int = 20,
    clouds: bool = True,
    cloud_mask: bool = False,
    noise: float = 0.008,
    labelled_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """One synthetic tile (see module docstring).

    Args:
        rng: source of all randomness.
        area: an :data:`AREAS` key or an :class:`AreaProfile`.
        year: harvest year (the season runs from autumn ``year - 1``).
        size: tile side in pixels.
        dates: ``"monthly"`` (9 composites, Nov..Jul) or ``"irregular"`` (``n_dates`` days).
        n_dates: number of acquisitions for irregular dates.
        clouds: add clouds and shadows.
        cloud_mask: also return ``clouds`` (T, H, W) bool, True under clouds or shadows.
        noise: standard deviation of the additive sensor noise (reflectance units).
        labelled_fraction: probability that a parcel is labelled (``mask`` True).

    Returns:
        ``images`` (T, 10, H, W) float32 reflectance, ``doy`` (T,) int64 (0..365), ``labels``
        (H, W) int64 class ids, ``mask`` (H, W) bool labelled pixels, optionally ``clouds``.
    """
    prof = AREAS.get(area) if isinstance(area, str) else area
    if prof is None:
        raise ValueError(f"unknown area {area!r}; known: {sorted(AREAS)} (or pass an AreaProfile)")
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size!r}")
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction!r}")
    yp = year_profile(year)
    days = _dates(rng, dates, n_dates)
    t = len(days)
    ids = _parcels(rng, size, prof.field_px)
    n = int(ids.max()) + 1
    cls = rng.choice(len(CLASSES), size=n, p=np.asarray(prof.priors))
    labelled = rng.random(n) < labelled_fraction
    # Winter (Nov-Feb) soil is wet and darker.
    wet = yp.wetness * np.exp(-0.5 * ((days - 120) / 45.0) ** 2)
    soil0 = (
        np.asarray(prof.soil)
        * rng.uniform(0.9, 1.1, (n, 1))
        * rng.uniform(0.97, 1.03, (n, len(BANDS)))
    )
    soil = soil0[:, None, :] * (1 - 0.35 * wet)[None, :, None]  # (n, T, C)
    veg = np.broadcast_to(_VEG, (n, t, len(BANDS))).copy()
    frac = np.zeros((n, t))
    for j in range(n):
        c = int(cls[j])
        if c == 0:  # other: built-up (bare-like, bright) or trees (evergreen)
            if rng.random() < 0.5:
                soil[j] = _BUILT * rng.uniform(0.85, 1.2)
                frac[j] = rng.uniform(0.0, 0.1)
            else:
                veg[j] = _VEG * np.array([0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8])
                frac[j] = rng.uniform(0.6, 0.85)
            continue
        jitter = yp.shift + rng.normal(0, 7)
        ndvi = ndvi_curve(c, days, shift=jitter, vigour=yp.vigour * rng.uniform(0.92, 1.05))
        frac[j] = _cover(ndvi, soil[j])
    f = frac[ids].transpose(2, 0, 1)  # (T, H, W)
    f = np.clip(f * (1 + 0.08 * _smooth(rng, (t, size, size), size / 8)), 0, 1)
    img = f[:, None] * veg[ids].transpose(2, 3, 0, 1) + (1 - f[:, None]) * soil[ids].transpose(
        2, 3, 0, 1
    )
    img = img + rng.normal(0, noise, img.shape)
    cloudy = np.zeros((t, size, size), bool)
    if clouds:
        winter = np.exp(-0.5 * ((days - 130) / 60.0) ** 2)
        for i in np.flatnonzero(rng.random(t) < yp.cloud_prob * (0.5 + winter)):
            blob = _smooth(rng, (1, size, size), size / 6)[0]
            alpha = np.clip((blob - np.quantile(blob, rng.uniform(0.4, 0.9))) / 0.6, 0, 1)
            shadow = ndimage.shift(alpha, rng.integers(2, size // 4 + 3, 2), order=0)
            img[i] *= 1 - 0.55 * (shadow * (1 - alpha))[None]
            img[i] = (
                img[i] * (1 - alpha[None])
                + (_CLOUD * rng.uniform(0.8, 1.1))[:, None, None] * alpha[None]
            )
            cloudy[i] = (alpha > 0.3) | (shadow * (1 - alpha) > 0.3)
    out = {
        "images": np.clip(img, 0.0, 1.0).astype(np.float32),
        "doy": season_doy(year, days),
        "labels": cls[ids].astype(np.int64),
        "mask": labelled[ids],
    }
    if cloud_mask:
        out["clouds"] = cloudy
    return out


def _atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` to a temporary file, then rename it to ``path``."""

    def _w(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write(fh)

    atomic_write(path, _w)


def generate(
    out_dir: str | os.PathLike[str],
    area: str = "A",
    year: int = 2020,
    tiles: int = 100,
    seed: int = 0,
    **tile_kwargs: Any,
) -> list[Path]:
    """Write ``tiles`` tiles as ``tile_00000.npz`` ... plus ``meta.json`` into ``out_dir``.

    Tile ``i`` uses ``SeedSequence([seed, crc32(area), year, i])``, so any tile can be
    regenerated alone and existing complete tiles are kept (a stopped run resumes).

    Args:
        out_dir: destination folder (created).
        area: an :data:`AREAS` key.
        year: harvest year.
        tiles: number of tiles.
        seed: base seed.
        **tile_kwargs: passed to :func:`generate_tile` (size, dates, clouds, ...).

    Returns:
        The paths of the tiles.
    """
    if not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"tiles must be a positive integer, got {tiles!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(tiles):
        path = out / f"tile_{i:05d}.npz"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(
            np.random.SeedSequence([seed, zlib.crc32(area.encode()), year, i])
        )
        tile = generate_tile(rng, area, year, **tile_kwargs)
        _atomic_write(path, lambda fh, tile=tile: np.savez_compressed(fh, **tile))
    meta = {
        "generator": "studies.wheat.s2synth",
        "classes": {str(i): name for i, name in enumerate(CLASSES)},
        "bands": list(BANDS),
        "binary": {
            "name": "winter_wheat_vs_other",
            "map": {str(k): v for k, v in WHEAT_VS_OTHER.items()},
        },
        "area": area,
        "area_profile": asdict(AREAS[area]) if area in AREAS else None,
        "year": year,
        "year_profile": asdict(year_profile(year)),
        "seed": seed,
        "tiles": tiles,
        "tile_kwargs": tile_kwargs,
    }
    _atomic_write(out / "meta.json", lambda fh: json.dump(meta, fh, indent=2), mode="w")
    return paths


def plot_tile(npz_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Plot a tile: RGB composites over time, mean NDVI per class, and the label map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(npz_path) as z:
        img, doy, lab = z["images"], z["doy"], z["labels"]
    t = len(doy)
    fig = plt.figure(figsize=(max(8, 1.6 * t), 6.5))
    grid = fig.add_gridspec(2, t)
    for i in range(t):
        ax = fig.add_subplot(grid[0, i])
        rgb = img[i, [BANDS.index("B4"), BANDS.index("B3"), BANDS.index("B2")]].transpose(1, 2, 0)
        ax.imshow(np.clip(rgb * 3.5, 0, 1))
        ax.set_title(f"doy {int(doy[i])}", fontsize=8)
        ax.axis("off")
    order = np.argsort((doy - 244) % 366)  # season order (from 1 September)
    ndvi = (img[:, _NIR] - img[:, _RED]) / np.maximum(img[:, _NIR] + img[:, _RED], 1e-6)
    ax = fig.add_subplot(grid[1, : t // 2 + 1])
    for c in np.unique(lab):
        curve = ndvi[:, lab == c].mean(1)[order]
        ax.plot(np.arange(t), curve, marker="o", color=plt.cm.tab10(int(c)), label=CLASSES[int(c)])
    ax.set_xticks(np.arange(t), [str(int(d)) for d in doy[order]], fontsize=7)
    ax.set(xlabel="day of year", ylabel="mean NDVI", ylim=(-0.1, 1.0))
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, t // 2 + 1 :])
    im = ax.imshow(lab, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set_title("labels", fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = Path(out_png)
    _atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``slimtune data s2-synth --out DIR [--area A] [--year 2020] [--tiles 100] [--seed 0]``."""
    import argparse

    from tqdm import tqdm

    ap = argparse.ArgumentParser(
        prog="slimtune data s2-synth",
        description="Generate synthetic Sentinel-2 time-series tiles (.npz) with crop labels.",
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument(
        "--area",
        default="A",
        choices=sorted(AREAS),
        help="area profile (A source, B target, C cross-area)",
    )
    ap.add_argument("--year", type=int, default=2020, help="harvest year")
    ap.add_argument("--tiles", type=int, default=100, help="number of tiles")
    ap.add_argument("--seed", type=int, default=0, help="base seed")
    ap.add_argument(
        "--figure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write tile_00000.png",
    )
    args = ap.parse_args(argv)
    paths: list[Path] = []
    try:
        for i in tqdm(range(args.tiles), desc=f"s2-synth {args.area}/{args.year}", unit="tile"):
            paths = generate(args.out, area=args.area, year=args.year, tiles=i + 1, seed=args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    if args.figure and paths:
        plot_tile(paths[0], args.out / "tile_00000.png")
    print(f"{len(paths)} tiles -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
