"""Fit H&E px -> ``global`` px transforms to landmark pairs, and judge the fit.

Every fit reports, per landmark, its residual and its leave-one-out error in um (the error at
that landmark of the same fit made without it: how well an unseen point is placed), the RMSE
over the pairs used, and plain-language warnings for fits that are degenerate or suspicious.
The algebra is scikit-image's (``AffineTransform``, ``SimilarityTransform``,
``ThinPlateSplineTransform``, ``measure.ransac``); the per-region model is described in
:mod:`napari_morphomol.registration.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.cluster.vq import kmeans2
from skimage.measure import ransac
from skimage.transform import AffineTransform, SimilarityTransform, ThinPlateSplineTransform

from napari_morphomol.coords import XENIUM_PIXEL_SIZE_UM, as_points_xy
from napari_morphomol.errors import InputError
from napari_morphomol.registration.landmarks import LandmarkPairs
from napari_morphomol.registration.transforms import (
    AffineXY,
    PerRegionAffine,
    PolygonWeights,
    SoftVoronoiWeights,
    ThinPlateSplineXY,
)

LANDMARKS_PER_AUTO_REGION = 6
"""Automatic per-region fits make one region per this many active landmarks ..."""
MAX_AUTO_REGIONS = 16
"""... and at most this many regions."""
MIN_LANDMARKS_PER_REGION = 3.0
"""A region whose landmark weight sums to less than this is warned about: its affine stays
close to the global one because too few landmarks pin it down."""

AUTO_BLEND_SIGMA_FACTOR = 0.6
"""Automatic regions blend with sigma = this times the median distance between neighbouring
region centres (best of 0.3-0.8 on the deformed synthetic samples)."""

DEFAULT_REGION_STIFFNESS = 0.02
"""Ridge weight pulling each region's affine towards the single best affine. It makes regions
with few landmarks well-posed; in px^2 per (px of deviation)^2, so small next to click noise."""

DEFAULT_OUTLIER_THRESHOLD_UM = 15.0
"""Robust fits flag a landmark as an outlier when it misses by more than this."""

COLLINEAR_RATIO = 0.05
"""Landmarks whose spread across their main line is below this fraction of the spread along it
are called collinear."""
SCALE_TOLERANCE = 0.10
"""Warn when the fitted scale differs from the pixel-size ratio by more than this fraction."""
ANISOTROPY_LIMIT = 1.10
"""Warn when one axis is stretched more than this factor relative to the other (shear too)."""
SCALE_SANITY_RANGE = (0.1, 10.0)
"""Without the H&E pixel size, scales outside this range are called extreme."""
LOO_OUTLIER_FACTOR = 3.0
LOO_OUTLIER_MIN_UM = 5.0


@dataclass(frozen=True)
class FitOptions:
    """Settings of a fit (kept with the result so it can be redone or recorded). Checked when made:
    an unknown model, or regions given to a model without regions, is an InputError."""

    model: str = "affine"
    """A row of :data:`REGISTRATION_MODELS`."""
    robust: bool = False
    """Run RANSAC first (with the model itself for global models, with an affine for per-region
    and spline models) and drop the pairs missing by more than ``outlier_threshold_um``."""
    outlier_threshold_um: float = DEFAULT_OUTLIER_THRESHOLD_UM
    n_regions: int | None = None
    """Per-region model: this many automatic regions (k-means of the landmarks)."""
    region_polygons_he_px: tuple[tuple[tuple[float, float], ...], ...] | None = None
    """Per-region model: one polygon per region, in H&E px (instead of ``n_regions``)."""
    blend_sigma_px: float | None = None
    region_stiffness: float = DEFAULT_REGION_STIFFNESS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in REGISTRATION_MODELS:
            raise InputError(f"unknown registration model {self.model!r}; choose one of "
                             f"{', '.join(REGISTRATION_MODELS)}")
        takes_regions = REGISTRATION_MODELS[self.model].takes_regions
        if self.n_regions is not None and not takes_regions:
            raise InputError(f"a number of regions only applies to the per-region model, not {self.model}")
        if self.region_polygons_he_px is not None:
            if not takes_regions:
                raise InputError("region polygons only apply to the per-region model; use model='per-region'")
            polygons = tuple(tuple(map(tuple, as_points_xy(p).tolist())) for p in self.region_polygons_he_px)
            object.__setattr__(self, "region_polygons_he_px", polygons)
        object.__setattr__(self, "outlier_threshold_um", float(self.outlier_threshold_um))
        object.__setattr__(self, "region_stiffness", float(self.region_stiffness))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class FittedTransform:
    """A fitted H&E px -> ``global`` px transform with its quality figures.

    ``matrix`` is the 3 x 3 matrix for translation, similarity and affine fits and ``None`` for
    per-region and thin-plate-spline fits; ``best_affine`` is always a 3 x 3 matrix (the single
    least-squares affine of the pairs used), for places that can hold only one affine.
    Arrays ``residuals_um``, ``loo_um``, ``used`` and ``outliers`` have one entry per landmark of
    ``pairs`` (inactive ones included; ``loo_um`` is NaN where no leave-one-out fit was possible).
    """

    transform: AffineXY | PerRegionAffine | ThinPlateSplineXY
    pairs: LandmarkPairs
    options: FitOptions
    xenium_pixel_size_um: float
    used: np.ndarray
    outliers: np.ndarray
    residuals_um: np.ndarray
    loo_um: np.ndarray
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model(self) -> str:
        return self.options.model

    @property
    def matrix(self) -> np.ndarray | None:
        return self.transform.matrix if isinstance(self.transform, AffineXY) else None

    @property
    def best_affine(self) -> np.ndarray:
        return np.asarray(self.transform.best_affine)

    @property
    def rmse_um(self) -> float:
        return float(np.sqrt(np.mean(self.residuals_um[self.used] ** 2)))

    def apply_xy(self, points_he_px: np.ndarray) -> np.ndarray:
        """H&E px -> ``global`` px."""
        return self.transform.apply_xy(points_he_px)

    def inverse_apply_xy(self, points_global_px: np.ndarray) -> np.ndarray:
        """``global`` px -> H&E px."""
        return self.transform.inverse_apply_xy(points_global_px)

    def quality_table(self) -> pd.DataFrame:
        """One row per landmark: positions, whether used, residual and leave-one-out error (um)."""
        p = self.pairs
        return pd.DataFrame(
            {
                "name": list(p.names),
                "active": p.active,
                "used": self.used,
                "outlier": self.outliers,
                "he_x_px": p.he_px[:, 0],
                "he_y_px": p.he_px[:, 1],
                "global_x_px": p.global_px[:, 0],
                "global_y_px": p.global_px[:, 1],
                "residual_um": self.residuals_um,
                "loo_um": self.loo_um,
            }
        )


def fit_transform(
    pairs: LandmarkPairs,
    options: FitOptions | None = None,
    *,
    xenium_pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
    he_pixel_size_um: float | None = None,
    leave_one_out: bool = True,
) -> FittedTransform:
    """Fit a registration model to the active pairs and measure residuals, RMSE and leave-one-out errors.

    Parameters
    ----------
    pairs
        Landmark pairs, H&E px -> Xenium ``global`` px.
    options
        The model and how it is fitted (:class:`FitOptions`): robust outlier removal, regions.
        None: a plain affine fit.
    xenium_pixel_size_um
        Size of one ``global`` px (errors are reported in um).
    he_pixel_size_um
        The H&E pixel size when known: the fit checks its scale against the pixel-size ratio.
    leave_one_out
        Also refit without each used pair in turn (``loo_um``; skip it for speed).

    Returns
    -------
    FittedTransform
        The transform, which pairs were used or dropped, residuals and warnings.

    Raises
    ------
    InputError
        Too few active pairs for the model or its regions, or a non-positive pixel size.
    """
    if not xenium_pixel_size_um > 0:
        raise InputError(f"the Xenium pixel size must be > 0 um, got {xenium_pixel_size_um}")
    options = FitOptions() if options is None else options
    model, n_regions, polygons = options.model, options.n_regions, options.region_polygons_he_px
    entry = REGISTRATION_MODELS[model]
    _require_pairs(model, pairs.n_active)
    if entry.takes_regions and polygons is None and n_regions is not None:
        per_region = REGISTRATION_MODELS["affine"].min_pairs
        if n_regions < 1 or per_region * n_regions > pairs.n_active:
            raise InputError(
                f"{n_regions} automatic regions need at least {per_region * max(n_regions, 1)} "
                f"active landmark pairs (3 per region); there are {pairs.n_active}. "
                "Add landmarks or ask for fewer regions."
            )
    outliers = np.zeros(len(pairs), dtype=bool)
    if options.robust:
        outliers = _ransac_outliers(pairs, options, xenium_pixel_size_um)
    used = pairs.active & ~outliers
    transform = _fit_model(pairs.he_px[used], pairs.global_px[used], options)
    residuals_um = _errors_um(transform.apply_xy(pairs.he_px), pairs.global_px, xenium_pixel_size_um)
    loo_um = np.full(len(pairs), np.nan)
    if leave_one_out:
        loo_um = _leave_one_out_um(pairs, used, options, xenium_pixel_size_um)
    fitted_warnings = _warnings(
        pairs, used, outliers, transform, options, loo_um, xenium_pixel_size_um, he_pixel_size_um
    )
    return FittedTransform(
        transform=transform,
        pairs=pairs,
        options=options,
        xenium_pixel_size_um=float(xenium_pixel_size_um),
        used=used,
        outliers=outliers,
        residuals_um=residuals_um,
        loo_um=loo_um,
        warnings=tuple(fitted_warnings),
    )


def _require_pairs(model: str, n: int) -> None:
    need = REGISTRATION_MODELS[model].min_pairs
    if n < need:
        raise InputError(
            f"the {model} model needs at least {need} active landmark pair{'s' if need > 1 else ''}"
            f"; there {'is' if n == 1 else 'are'} {n}. Add landmark pairs or pick a "
            "simpler model (translation needs 1, similarity 2, affine 3)."
        )


def _errors_um(predicted_global_px: np.ndarray, true_global_px: np.ndarray, pixel_size_um: float) -> np.ndarray:
    return np.linalg.norm(predicted_global_px - true_global_px, axis=1) * pixel_size_um


class _Translation(AffineTransform):
    """Translation-only estimator with scikit-image's interface (for ``ransac``)."""

    @classmethod
    def from_estimate(cls, src: np.ndarray, dst: np.ndarray) -> _Translation:
        return cls(translation=np.mean(np.asarray(dst) - np.asarray(src), axis=0))


def _estimate_global(model: str, he: np.ndarray, glob: np.ndarray) -> AffineXY:
    estimated = REGISTRATION_MODELS[model].estimator.from_estimate(he, glob)
    if not estimated:
        raise InputError(
            f"the {model} fit failed ({estimated}); the landmarks are degenerate "
            "(coincident or collinear). Spread the landmarks over the tissue."
        )
    return AffineXY(estimated.params)


def _fit_model(he: np.ndarray, glob: np.ndarray, options: FitOptions):
    return REGISTRATION_MODELS[options.model].fit(he, glob, options)


def _fit_global(he: np.ndarray, glob: np.ndarray, options: FitOptions) -> AffineXY:
    return _estimate_global(options.model, he, glob)


def _fit_spline(he: np.ndarray, glob: np.ndarray, options: FitOptions) -> ThinPlateSplineXY:
    best = _estimate_global("affine", he, glob).matrix
    spline = ThinPlateSplineTransform.from_estimate(he, glob)
    if not spline:
        raise InputError(f"the thin-plate spline fit failed ({spline}); spread the landmarks out")
    return ThinPlateSplineXY(spline=spline, best_affine=best)


def _fit_regions(he: np.ndarray, glob: np.ndarray, options: FitOptions) -> PerRegionAffine:
    return _fit_per_region(he, glob, _estimate_global("affine", he, glob).matrix, options)


def _region_weights(he: np.ndarray, options: FitOptions) -> SoftVoronoiWeights | PolygonWeights:
    if options.region_polygons_he_px is not None:
        polygons = [np.asarray(p, dtype=np.float64) for p in options.region_polygons_he_px]
        sigma = options.blend_sigma_px
        if sigma is None:
            sizes = [np.sqrt(np.prod(np.ptp(p, axis=0))) for p in polygons]
            sigma = 0.1 * float(np.median(sizes))
        return PolygonWeights(polygons, sigma, extent_he_px=he)
    k = options.n_regions
    if k is None:
        k = int(np.clip(len(he) // LANDMARKS_PER_AUTO_REGION, 1, MAX_AUTO_REGIONS))
    k = min(k, len(he))
    centres, labels = kmeans2(he, k, minit="++", seed=options.seed)
    centres = centres[np.unique(labels)]
    sigma = options.blend_sigma_px
    if sigma is None:
        if len(centres) > 1:
            d = np.linalg.norm(centres[:, None] - centres[None], axis=2)
            np.fill_diagonal(d, np.inf)
            sigma = AUTO_BLEND_SIGMA_FACTOR * float(np.median(d.min(axis=1)))
        else:
            sigma = max(float(np.ptp(he, axis=0).max()), 1.0)
    return SoftVoronoiWeights(centres, sigma)


def _fit_per_region(he: np.ndarray, glob: np.ndarray, best: np.ndarray, options: FitOptions) -> PerRegionAffine:
    """Region affines as deviations from the best single affine, fitted jointly.

    Each region k deviates from ``best`` by ``B_k (p - c_k) / sigma + t_k``. The blended model
    is linear in all (B_k, t_k), so one ridge least-squares solve fits them to what the blend
    itself predicts at the landmarks (not region by region), with ``region_stiffness`` as ridge.
    """
    weights = _region_weights(he, options)
    w = weights(he[:, 0], he[:, 1]).T
    scale = weights.sigma_px
    k = weights.n_regions
    local = (he[:, None, :] - weights.centres_he_px[None]) / scale
    design = np.concatenate([local, np.ones((len(he), k, 1))], axis=2) * w[:, :, None]
    design = design.reshape(len(he), 3 * k)
    residual = glob - AffineXY(best).apply_xy(he)
    gram = design.T @ design + options.region_stiffness * np.eye(3 * k)
    theta = np.linalg.solve(gram, design.T @ residual).reshape(k, 3, 2)
    matrices = np.repeat(best[None], k, axis=0)
    for i in range(k):
        dev_linear = theta[i, :2, :].T / scale
        matrices[i, :2, :2] += dev_linear
        matrices[i, :2, 2] += theta[i, 2, :] - dev_linear @ weights.centres_he_px[i]
    return PerRegionAffine(region_matrices=matrices, weights=weights, best_affine=best)


def _ransac_outliers(pairs: LandmarkPairs, options: FitOptions, pixel_size_um: float) -> np.ndarray:
    robust = REGISTRATION_MODELS[REGISTRATION_MODELS[options.model].robust_with]
    need = robust.min_pairs
    if pairs.n_active < need + 2:
        raise InputError(
            f"a robust {options.model} fit needs at least {need + 2} active landmark pairs to tell "
            f"outliers apart; there are {pairs.n_active}. Add pairs or fit without --robust."
        )
    idx = np.flatnonzero(pairs.active)
    _, inliers = ransac(
        (pairs.he_px[idx], pairs.global_px[idx]),
        robust.estimator,
        min_samples=need,
        residual_threshold=options.outlier_threshold_um / pixel_size_um,
        max_trials=1000,
        rng=options.seed,
    )
    if inliers is None or inliers.sum() < need:
        raise InputError(
            "the robust fit found no consistent set of landmarks; check that each pair joins "
            "the same feature in both images, or raise the outlier threshold"
        )
    outliers = np.zeros(len(pairs), dtype=bool)
    outliers[idx[~inliers]] = True
    return outliers


def _leave_one_out_um(pairs: LandmarkPairs, used: np.ndarray, options: FitOptions, pixel_size_um: float) -> np.ndarray:
    loo = np.full(len(pairs), np.nan)
    idx = np.flatnonzero(used)
    if len(idx) - 1 < REGISTRATION_MODELS[options.model].min_pairs:
        return loo
    for i in idx:
        keep = used.copy()
        keep[i] = False
        try:
            t = _fit_model(pairs.he_px[keep], pairs.global_px[keep], options)
        except InputError:
            continue
        loo[i] = _errors_um(t.apply_xy(pairs.he_px[i : i + 1]), pairs.global_px[i : i + 1], pixel_size_um)[0]
    return loo


def _warnings(
    pairs: LandmarkPairs,
    used: np.ndarray,
    outliers: np.ndarray,
    transform,
    options: FitOptions,
    loo_um: np.ndarray,
    xenium_pixel_size_um: float,
    he_pixel_size_um: float | None,
) -> list[str]:
    out = []
    names = np.array(pairs.names)
    if outliers.any():
        out.append(
            f"robust fit left out {outliers.sum()} landmark(s) missing by more than "
            f"{options.outlier_threshold_um:g} um: {', '.join(names[outliers])}"
        )
    he = pairs.he_px[used]
    if options.model not in ("translation", "similarity") and len(he) >= 3:
        sv = np.linalg.svd(he - he.mean(axis=0), compute_uv=False)
        if sv[0] == 0 or sv[1] / sv[0] < COLLINEAR_RATIO:
            out.append(
                "landmarks lie almost on one line: the fit is poorly determined across it; "
                "add landmarks away from that line"
            )
    for i, lin in enumerate(transform.linear_parts()):
        where = f" (region {i})" if len(transform.linear_parts()) > 1 else ""
        if np.linalg.det(lin) < 0:
            out.append(
                f"the fit mirrors the image{where} (negative determinant): the H&E image may be "
                "flipped relative to Xenium, or landmark pairs are mismatched"
            )
        s = np.linalg.svd(lin, compute_uv=False)
        scale = float(np.sqrt(s[0] * s[1]))
        if he_pixel_size_um is not None:
            expected = he_pixel_size_um / xenium_pixel_size_um
            if abs(scale / expected - 1) > SCALE_TOLERANCE:
                out.append(
                    f"fitted scale{where} {scale:.3f} differs from the pixel-size ratio {expected:.3f} "
                    f"(H&E {he_pixel_size_um:g} um/px / Xenium {xenium_pixel_size_um:g} um/px) by "
                    f"{abs(scale / expected - 1):.0%}: check the landmarks or the pixel sizes"
                )
        elif not SCALE_SANITY_RANGE[0] <= scale <= SCALE_SANITY_RANGE[1]:
            out.append(f"extreme fitted scale{where}: {scale:.3g} global px per H&E px")
        if s[1] > 0 and s[0] / s[1] > ANISOTROPY_LIMIT:
            out.append(
                f"the fit stretches one direction {s[0] / s[1]:.2f}x more than the other{where} "
                "(strong shear or anisotropic scale): check the landmarks"
            )
    if isinstance(transform, PerRegionAffine):
        load = transform.weights(he[:, 0], he[:, 1]).sum(axis=1)
        for i in np.flatnonzero(load < MIN_LANDMARKS_PER_REGION):
            out.append(
                f"region {i} holds only {load[i]:.1f} landmarks' worth of weight: its affine stays "
                "close to the single best affine; add landmarks there"
            )
    finite = np.isfinite(loo_um)
    if finite.sum() >= 4:
        typical = float(np.median(loo_um[finite]))
        bad = finite & (loo_um > max(LOO_OUTLIER_FACTOR * typical, LOO_OUTLIER_MIN_UM))
        for i in np.flatnonzero(bad):
            out.append(
                f"landmark {names[i]} disagrees with the others (leave-one-out error "
                f"{loo_um[i]:.1f} um vs typical {typical:.1f} um): check that pair"
            )
    return out


@dataclass(frozen=True)
class RegistrationModel:
    """One row of :data:`REGISTRATION_MODELS`: a transform model users can choose by name.

    A new model is a transform class (in :mod:`~napari_morphomol.registration.transforms`, with
    its record) and one row here; the CLI's ``--model``, the Register dock and the fit read the
    table.
    """

    name: str
    min_pairs: int
    """Fewest active landmark pairs the model can be fitted to."""
    fit: Callable[[np.ndarray, np.ndarray, FitOptions], object]
    """(H&E px (N, 2), global px (N, 2), options) -> a transform with ``apply_xy``."""
    robust_with: str
    """The global model whose estimator a robust fit uses to find outliers (RANSAC)."""
    estimator: type | None = None
    """scikit-image estimator of a global (single-matrix) model; None for the others."""
    takes_regions: bool = False
    """Whether the model takes regions (``n_regions`` or region polygons)."""


REGISTRATION_MODELS: dict[str, RegistrationModel] = {m.name: m for m in (
    RegistrationModel("translation", 1, _fit_global, "translation", _Translation),
    RegistrationModel("similarity", 2, _fit_global, "similarity", SimilarityTransform),
    RegistrationModel("affine", 3, _fit_global, "affine", AffineTransform),
    RegistrationModel("per-region", 3, _fit_regions, "affine", takes_regions=True),
    RegistrationModel("tps", 3, _fit_spline, "affine"),
)}
"""The registration models by name, in the order they are offered (simplest first)."""
