"""Token binning against a slow per-tile reference; boundaries are half-open [a, b) in cell coordinates."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from napari_morphomol.errors import InputError
from napari_morphomol.registration.transforms import AffineXY
from napari_morphomol.tiling import (
    GenePanel,
    TileGeometry,
    TilingOptions,
    TokenMapping,
    bin_transcripts,
    make_tiling,
)

XENIUM_PIXEL_SIZE_UM = 0.2125
GENES = ["A", "B", "C", "D", "E"]
CONTROLS = ["NegControlProbe_X", "BLANK_0001", "UnassignedCodeword_0007"]


class TwoRegionTransform:
    """A non-affine registration: one affine left of a vertical line in H&E px, another right of it."""

    def __init__(self, left: np.ndarray, right: np.ndarray, split_he_x: float) -> None:
        self.left, self.right, self.split = AffineXY(left), AffineXY(right), split_he_x

    def apply_xy(self, points_xy):
        pts = np.asarray(points_xy, dtype=np.float64)
        return np.where(pts[:, :1] < self.split, self.left.apply_xy(pts), self.right.apply_xy(pts))

    def inverse_apply_xy(self, points_xy):
        a = self.left.inverse_apply_xy(points_xy)
        b = self.right.inverse_apply_xy(points_xy)
        return np.where(a[:, :1] < self.split, a, b)


def affine(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def reference_tiles(df, geometry, panel, mapping, min_qv, rows, cols):
    """Per tile: select transcripts whose token coordinates lie in the tile's half-open box, count
    core and add-on genes per token at floor(q - tile origin), and add-on genes per tile."""
    keep = (df["qv"].to_numpy() >= min_qv) & ~df["feature_name"].astype(str).str.startswith(
        ("NegControl", "BLANK_", "Unassigned")).to_numpy()
    qx, qy = mapping.um_to_tokens_xy(df["x_location"].to_numpy(), df["y_location"].to_numpy())
    names = df["feature_name"].astype(str).to_numpy()
    s, t = geometry.stride_tokens, geometry.tokens_per_side
    tokens = np.zeros((len(rows), t, t, len(panel.core)), dtype=np.int64)
    addon = np.zeros((len(rows), len(panel.addon)), dtype=np.int64)
    addon_tokens = np.zeros((len(rows), t, t, len(panel.addon)), dtype=np.int64)
    for k, (i, j) in enumerate(zip(rows, cols, strict=True)):
        inside = keep & (qx >= s * j) & (qx < s * j + t) & (qy >= s * i) & (qy < s * i + t)
        for n in np.flatnonzero(inside):
            ty, tx = int(np.floor(qy[n] - s * i)), int(np.floor(qx[n] - s * j))
            if names[n] in panel.core:
                tokens[k, ty, tx, panel.core.index(names[n])] += 1
            elif names[n] in panel.addon:
                addon[k, panel.addon.index(names[n])] += 1
                addon_tokens[k, ty, tx, panel.addon.index(names[n])] += 1
    return tokens, addon, addon_tokens


@st.composite
def scenes(draw):
    tile_px, stride_px = draw(st.sampled_from([(512, 256), (256, 128), (448, 224), (512, 512)]))
    he_pixel_size_um = draw(st.floats(0.2, 1.0))
    width = draw(st.integers(int(1.0 * tile_px * 0.5 / he_pixel_size_um) + 1,
                             int(3.2 * tile_px * 0.5 / he_pixel_size_um)))
    height = draw(st.integers(int(1.0 * tile_px * 0.5 / he_pixel_size_um) + 1,
                              int(3.2 * tile_px * 0.5 / he_pixel_size_um)))
    geometry = TileGeometry(he_pixel_size_um=he_pixel_size_um, he_height_px=height, he_width_px=width, tile_px=tile_px,
                            stride_px=stride_px)
    matrix = affine(he_pixel_size_um / XENIUM_PIXEL_SIZE_UM * draw(st.floats(0.9, 1.1)), draw(st.floats(-0.3, 0.3)),
                    draw(st.floats(-200, 200)), draw(st.floats(-200, 200)))
    n = draw(st.integers(0, 400))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # points in token coordinates: a third exactly on token edges, some beyond the image
    ex, ey = geometry.extent_tokens_xy
    q = rng.uniform(-2, [ex + 2, ey + 2], size=(n, 2))
    q[: n // 3] = np.round(q[: n // 3])
    mapping = TokenMapping(geometry, AffineXY(matrix), XENIUM_PIXEL_SIZE_UM)
    he = geometry.tokens_to_he_px(q)
    um = mapping.transform.apply_xy(he) * XENIUM_PIXEL_SIZE_UM if n else np.zeros((0, 2))
    df = pd.DataFrame({
        "feature_name": pd.Categorical(rng.choice(GENES + CONTROLS, n), categories=GENES + CONTROLS),
        "x_location": um[:, 0], "y_location": um[:, 1],
        "qv": rng.choice([5.0, 19.99, 20.0, 30.0, 40.0], n).astype(np.float32),
    })
    return geometry, matrix, df


PANEL = GenePanel(core=("B", "A", "D"), addon=("E", "C"))


def all_tiles(geometry):
    rows, cols = np.divmod(np.arange(int(np.prod(geometry.grid_shape))), geometry.grid_shape[1])
    return rows, cols


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes(), st.booleans())
def test_binning_matches_per_tile_reference(scene, sparse):
    geometry, matrix, df = scene
    bins = bin_transcripts(df, geometry, PANEL, matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                           max_dense_bytes=0 if sparse else 1 << 30)
    assert bins.tokens.is_sparse == sparse
    rows, cols = all_tiles(geometry)
    mapping = TokenMapping(geometry, AffineXY(matrix), XENIUM_PIXEL_SIZE_UM)
    ref_tokens, ref_addon, ref_addon_tokens = reference_tiles(df, geometry, PANEL, mapping, 20.0, rows, cols)
    np.testing.assert_array_equal(bins.tokens.tile_tokens(geometry, rows, cols), ref_tokens)
    np.testing.assert_array_equal(bins.tile_addon_counts(rows, cols), ref_addon)
    assert bins.addon_tokens.is_sparse == sparse
    addon_tokens = bins.addon_tokens.tile_tokens(geometry, rows, cols)
    np.testing.assert_array_equal(addon_tokens, ref_addon_tokens)
    # per-token targets sum to the tile targets exactly
    np.testing.assert_array_equal(addon_tokens.sum(axis=(1, 2), dtype=np.int64), bins.tile_addon_counts(rows, cols))
    # a tile's tokens sum to the core transcripts inside it
    np.testing.assert_array_equal(bins.tile_core_totals(rows, cols), ref_tokens.sum(axis=(1, 2, 3)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_a_count_past_the_dense_type_is_counted_again_wider(scene):
    geometry, matrix, df = scene
    crowded = pd.concat([df] + [df.iloc[:20]] * 300, ignore_index=True)  # 300 more of each: past uint8
    narrow = bin_transcripts(crowded, geometry, PANEL, matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                             dense_dtype=np.uint8)
    wide = bin_transcripts(crowded, geometry, PANEL, matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                           dense_dtype=np.uint32)
    assume(wide.tokens.dense.max(initial=0) > np.iinfo(np.uint8).max)  # one of them was counted in a token
    np.testing.assert_array_equal(narrow.tokens.dense, wide.tokens.dense)
    np.testing.assert_array_equal(narrow.addon_tokens.dense, wide.addon_tokens.dense)
    assert narrow.counts == wide.counts


@settings(max_examples=40, deadline=None)
@given(scenes())
def test_every_transcript_is_accounted_for(scene):
    geometry, matrix, df = scene
    bins = bin_transcripts(df, geometry, PANEL, matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM)
    mapping = TokenMapping(geometry, AffineXY(matrix), XENIUM_PIXEL_SIZE_UM)
    qx, qy = mapping.um_to_tokens_xy(df["x_location"], df["y_location"])
    ex, ey = geometry.extent_tokens_xy
    names = df["feature_name"].astype(str)
    good = (df["qv"] >= 20).to_numpy()
    is_gene = names.isin(GENES).to_numpy()
    inside = (qx >= 0) & (qx < ex) & (qy >= 0) & (qy < ey)
    c = bins.counts
    assert c.total == len(df)
    assert c.low_qv == int((~good).sum())
    assert c.control == int((good & ~is_gene).sum())
    assert c.outside_image == int((good & is_gene & ~inside).sum())
    assert c.core_binned == int((good & inside & names.isin(PANEL.core).to_numpy()).sum())
    assert c.addon_binned + c.addon_outside_grid == int((good & inside & names.isin(PANEL.addon).to_numpy()).sum())
    assert int(bins.core_totals.sum()) == c.core_binned


def test_region_transform_and_dask_partitions_match_reference():
    rng = np.random.default_rng(3)
    geometry = TileGeometry(he_pixel_size_um=0.2737, he_height_px=4000, he_width_px=5000)
    base = 0.2737 / XENIUM_PIXEL_SIZE_UM
    transform = TwoRegionTransform(affine(base, 0.02, 30, -10), affine(base * 1.01, -0.01, 45, 5), split_he_x=2500.0)
    he = rng.uniform(0, [5000, 4000], size=(20000, 2))
    um = transform.apply_xy(he) * XENIUM_PIXEL_SIZE_UM
    df = pd.DataFrame({"feature_name": pd.Categorical(rng.choice(GENES, len(he))), "x_location": um[:, 0],
                       "y_location": um[:, 1], "qv": np.full(len(he), 30.0, np.float32)})
    ddf = dd.from_pandas(df, npartitions=4)
    bins = bin_transcripts(ddf, geometry, PANEL, transform, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM)
    rows, cols = all_tiles(geometry)
    mapping = TokenMapping(geometry, transform, XENIUM_PIXEL_SIZE_UM)
    ref_tokens, ref_addon, ref_addon_tokens = reference_tiles(df, geometry, PANEL, mapping, 20.0, rows, cols)
    np.testing.assert_array_equal(bins.tokens.tile_tokens(geometry, rows, cols), ref_tokens)
    np.testing.assert_array_equal(bins.tile_addon_counts(rows, cols), ref_addon)
    addon_tokens = bins.addon_tokens.tile_tokens(geometry, rows, cols)
    np.testing.assert_array_equal(addon_tokens, ref_addon_tokens)
    # per-token targets sum to the tile targets exactly
    np.testing.assert_array_equal(addon_tokens.sum(axis=(1, 2), dtype=np.int64), bins.tile_addon_counts(rows, cols))
    # the composed mapping is the registration followed by the geometry
    q = np.stack(mapping.um_to_tokens_xy(um[:, 0], um[:, 1]), axis=1)
    np.testing.assert_allclose(geometry.tokens_to_he_px(q), he, atol=1e-6)


def test_affine_mapping_is_the_composition():
    geometry = TileGeometry(he_pixel_size_um=0.3791, he_height_px=3000, he_width_px=3000)
    matrix = affine(0.3791 / XENIUM_PIXEL_SIZE_UM, 0.1, 12.0, -7.0)
    mapping = TokenMapping(geometry, AffineXY(matrix), XENIUM_PIXEL_SIZE_UM)
    um = np.random.default_rng(0).uniform(0, 1000, size=(100, 2))
    q = np.stack(mapping.um_to_tokens_xy(um[:, 0], um[:, 1]), axis=1)
    he = AffineXY(matrix).inverse_apply_xy(um / XENIUM_PIXEL_SIZE_UM)
    np.testing.assert_allclose(q, he * 0.3791 / 0.5 * 14 / 512, rtol=1e-12, atol=1e-9)


def test_transcript_filter_reports_kept_and_dropped():
    rng = np.random.default_rng(1)
    he_pixel_size_um = 0.5
    image = np.full((2048, 2048, 3), (170, 70, 140), np.uint8)
    # transcripts only in the first 256 x 256 um: the tiles touching it (rows, cols 0-1) pass
    um = rng.uniform(0, 256, size=(20000, 2))
    df = pd.DataFrame({"feature_name": pd.Categorical(rng.choice(GENES, len(um))), "x_location": um[:, 0],
                       "y_location": um[:, 1], "qv": np.full(len(um), 35.0, np.float32)})
    matrix = np.diag([he_pixel_size_um / XENIUM_PIXEL_SIZE_UM, he_pixel_size_um / XENIUM_PIXEL_SIZE_UM, 1.0])
    tiling = make_tiling(df, [image], he_pixel_size_um=he_pixel_size_um, he_to_global=matrix,
                         xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM, panel=PANEL,
                         options=TilingOptions(min_transcripts=1000))
    report = tiling.report
    assert report["grid_tiles"] == 49 and report["tissue_tiles"] == 49
    assert report["transcript_filter"] == {"min_transcripts": 1000, "kept": 4, "dropped": 45}
    assert (tiling.tiles["n_transcripts"] >= 1000).all()
    assert set(zip(tiling.tiles["row"], tiling.tiles["col"])) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert tiling.tokens(np.arange(len(tiling.tiles))).sum(axis=(1, 2, 3)).tolist() == tiling.tiles["n_core"].tolist()
    np.testing.assert_allclose(np.expm1(tiling.targets_log1p()).sum(axis=1), tiling.tiles["n_addon"], rtol=1e-5)


def test_panel_genes_missing_from_sample_are_listed():
    df = pd.DataFrame({"feature_name": pd.Categorical(["A", "B"]), "x_location": [1.0, 2.0],
                       "y_location": [1.0, 2.0], "qv": np.float32([30, 30])})
    image = np.zeros((1100, 1100, 3), np.uint8)
    panel = GenePanel(core=("A", "ZZZ1"), addon=("B", "QQQ2"))
    with pytest.raises(InputError, match="2 panel genes.*ZZZ1, QQQ2"):
        make_tiling(df, [image], he_pixel_size_um=0.5, he_to_global=np.eye(3),
                    xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                    panel=panel)


@pytest.mark.parametrize(
    ("core", "addon", "message"),
    [(("A", "A"), (), "twice"), (("A",), ("A",), "both core"), (("A", "BLANK_0001"), (), "control"), ((), (), "empty")],
)
def test_bad_panels_are_refused(core, addon, message):
    with pytest.raises(InputError, match=message):
        GenePanel(core=core, addon=addon)


def test_stride_must_be_whole_tokens():
    with pytest.raises(InputError, match="whole number of tokens"):
        TileGeometry(he_pixel_size_um=0.5, he_height_px=2000, he_width_px=2000, tile_px=512, stride_px=200)


def test_tissue_mask_and_region_select_tiles():
    he_pixel_size_um = 0.5
    image = np.full((3072, 3072, 3), 238, np.uint8)  # glass
    image[:, :1536] = (175, 75, 150)  # stained tissue on the left half
    um = np.random.default_rng(2).uniform(0, 1536, size=(50000, 2))
    df = pd.DataFrame({"feature_name": pd.Categorical(np.full(len(um), "A"), categories=GENES), "x_location": um[:, 0],
                       "y_location": um[:, 1], "qv": np.full(len(um), 30.0, np.float32)})
    matrix = np.diag([he_pixel_size_um / XENIUM_PIXEL_SIZE_UM, he_pixel_size_um / XENIUM_PIXEL_SIZE_UM, 1.0])
    common = dict(he_pixel_size_um=he_pixel_size_um, he_to_global=matrix, xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                  panel=PANEL)
    tiling = make_tiling(df, [image], options=TilingOptions(min_transcripts=0), **common)
    boxes = tiling.tiles[["he_x0", "he_x1"]].to_numpy()
    # background fraction <= 0.3: tiles reaching at most 30 % into the glass
    assert (boxes[:, 1] <= 1536 + 0.3 * 512 + 1e-9).all()
    assert tiling.report["grid_tiles"] == 121 and tiling.report["tissue_tiles"] == 11 * 5
    region = np.array([[0, 0], [1100, 0], [1100, 3072], [0, 3072]], dtype=float)  # H&E px
    inside = make_tiling(df, [image], options=TilingOptions(min_transcripts=0, region_he_px=region), **common)
    centres = (inside.tiles["he_x0"] + inside.tiles["he_x1"]) / 2
    assert inside.report["region_tiles"] == len(inside.tiles) == 11 * 4 and (centres < 1100).all()
    assert (inside.tiles["global_x"] * XENIUM_PIXEL_SIZE_UM == inside.tiles["um_x"]).all()
    np.testing.assert_allclose(inside.tiles["um_x"], centres * he_pixel_size_um)


def test_sparse_raster_round_trips_through_the_store(tmp_path):
    from napari_morphomol.tiling import read_tiles_zarr, write_tiles_zarr

    rng = np.random.default_rng(4)
    image = np.full((2048, 2048, 3), (170, 70, 140), np.uint8)
    um = rng.uniform(0, 1024, size=(30000, 2))
    df = pd.DataFrame({"feature_name": pd.Categorical(rng.choice(GENES, len(um))), "x_location": um[:, 0],
                       "y_location": um[:, 1], "qv": np.full(len(um), 30.0, np.float32)})
    matrix = np.diag([0.5 / XENIUM_PIXEL_SIZE_UM, 0.5 / XENIUM_PIXEL_SIZE_UM, 1.0])
    dense = make_tiling(df, [image], he_pixel_size_um=0.5, he_to_global=matrix,
                        xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                        panel=PANEL, options=TilingOptions(min_transcripts=100))
    sparse = make_tiling(df, [image], he_pixel_size_um=0.5, he_to_global=matrix,
                         xenium_pixel_size_um=XENIUM_PIXEL_SIZE_UM,
                         panel=PANEL, options=TilingOptions(min_transcripts=100, max_dense_bytes=0))
    assert sparse.bins.tokens.is_sparse and not dense.bins.tokens.is_sparse
    out = write_tiles_zarr(sparse, tmp_path / "t.zarr")
    store = read_tiles_zarr(out)
    np.testing.assert_array_equal(store.tokens[:], dense.bins.tokens.dense)
    np.testing.assert_array_equal(store.addon_tokens[:], dense.bins.addon_tokens.dense)
    for position in range(len(store.tiles)):
        np.testing.assert_array_equal(store.tile_tokens(position), dense.tokens([position])[0])
        np.testing.assert_array_equal(store.tile_addon_tokens(position), dense.addon_tokens([position])[0])
        np.testing.assert_array_equal(store.tile_addon_tokens(position).sum(axis=(0, 1)), store.addon_counts[position])
    assert store.report == sparse.report
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]  # no temporary left behind
