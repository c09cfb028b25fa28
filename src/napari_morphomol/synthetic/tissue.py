"""Synthetic tissue: smooth random fields -> regions -> cells with types, states and shapes.

Everything lives in world micrometres (x right, y down, origin at the morphology image's
top-left corner). Cells sit on a jittered node grid (at most one cell per node), which gives
region-dependent density without overlaps piling up, and lets any point find its candidate
cells in constant time: the cell owning a point is among the 5 x 5 nodes around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_morphomol.synthetic.kernels import owner_kernel

FIELD_STEP_UM = 8.0
"""Resolution of the coarse random fields; sampled bilinearly everywhere else."""

REGION_STEP_UM = 1.0
"""Resolution of the region map, computed once from the fields."""

NODE_UM = 8.0
"""Node grid pitch: at most one cell per node, so 15,625 candidate sites per mm^2."""

NODE_JITTER = 0.35
"""Cell centres jitter +- this fraction of a node around the node centre."""

NODE_REACH = 2
"""Nodes searched on each side: covers cell radii up to (NODE_REACH - NODE_JITTER) nodes."""

_FAR_UM = 1e9

BLOCK_NODES = 64
"""Cells, transcripts and cell rows are produced per block of 64 x 64 nodes (512 um)."""

REGIONS = ("background", "stroma", "tumour", "immune_aggregate", "necrosis")
BACKGROUND, STROMA, TUMOUR, IMMUNE, NECROSIS = range(len(REGIONS))

CELL_TYPES = ("tumour", "fibroblast", "endothelial", "T_cell", "B_cell", "macrophage", "necrotic")

# Cells per mm^2 by region, and cell-type mix (rows = regions, columns = CELL_TYPES).
REGION_DENSITY_PER_MM2 = np.array([0.0, 4400.0, 8800.0, 13000.0, 2600.0])
REGION_TYPE_MIX = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [0.02, 0.55, 0.15, 0.12, 0.04, 0.12, 0.0],
        [0.85, 0.06, 0.03, 0.03, 0.0, 0.03, 0.0],
        [0.0, 0.05, 0.04, 0.50, 0.33, 0.08, 0.0],
        [0.10, 0.0, 0.0, 0.05, 0.0, 0.15, 0.70],
    ]
)
REGION_TYPE_MIX[0, 1] = 1.0  # never used (no cells on background); keeps rows normalised
TUMOUR_MARGIN_TYPE_MIX = np.array([0.0, 0.3, 0.08, 0.35, 0.07, 0.2, 0.0])
MARGIN_WIDTH = 0.5
"""Stroma whose tumour field is within this of the tumour threshold is tumour margin."""

# Per cell type: nucleus radius mean and sd (um), nucleus aspect ratio, hematoxylin
# (chromatin) darkness, DAPI brightness, cell radius (um), cytoplasm eosin, mean transcripts.
NUCLEUS_RADIUS_UM = np.array([4.0, 2.6, 2.6, 2.7, 2.9, 3.4, 1.8])
NUCLEUS_RADIUS_SD = np.array([0.15, 0.12, 0.12, 0.08, 0.08, 0.12, 0.2])  # log-normal sd
NUCLEUS_ASPECT = np.array([1.25, 3.0, 2.2, 1.05, 1.05, 1.4, 1.1])
CHROMATIN_DARKNESS = np.array([0.85, 1.0, 0.95, 1.35, 1.3, 0.7, 1.8])
DAPI_BRIGHTNESS = np.array([1.0, 1.1, 1.0, 1.5, 1.45, 0.8, 1.9])
CELL_RADIUS_UM = np.array([8.0, 6.5, 5.5, 4.0, 4.3, 9.0, 4.5])
CYTOPLASM_EOSIN = np.array([0.5, 0.5, 0.45, 0.25, 0.25, 0.6, 0.95])
CYTOPLASM_HEMATOXYLIN = np.array([0.12, 0.03, 0.03, 0.06, 0.06, 0.05, 0.1])
VESICULAR = np.array([0.45, 0.0, 0.1, 0.0, 0.0, 0.25, 0.0])
"""How much lighter the nucleus centre is than its rim (open chromatin of tumour cells)."""
MEAN_TRANSCRIPTS = np.array([210.0, 120.0, 120.0, 90.0, 95.0, 175.0, 40.0])

FIBRE_PERIOD_UM = 4.0
_FIBRE_STREAM_SCALE_UM = 120.0
"""Stream function = fibre field * this: about one fibre per FIBRE_PERIOD_UM."""

PROLIFERATING_RADIUS_GAIN = 1.3
PROLIFERATING_DARKNESS_GAIN = 1.5


@dataclass(frozen=True)
class TissueFields:
    """Smooth standard-normal random fields on a coarse grid, plus the region thresholds."""

    step_um: float
    fields: dict[str, np.ndarray]
    """Random fields, plus immune_proximity and necrosis_proximity in [0, 1]."""
    thresholds: dict[str, float]
    region_raster: np.ndarray
    """Region id at REGION_STEP_UM over the section (computed once by _exact_region)."""

    def sample(self, name: str, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Bilinear value of a field at world points (grid nodes at (i + 0.5) * step)."""
        return _bilinear(self.fields[name], x_um / self.step_um - 0.5, y_um / self.step_um - 0.5)

    def fibre_phase(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Phase (radians) of the collagen fibre stripes: level lines of a smooth stream function."""
        stream = self.sample("fibre_stream", x_um, y_um) * np.float32(_FIBRE_STREAM_SCALE_UM)
        return stream * np.float32(2 * np.pi / FIBRE_PERIOD_UM)

    def fibre_direction(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Angle (radians) along the fibres, which elongated stromal nuclei follow."""
        h = 2.0
        gx = self.sample("fibre_stream", x_um + h, y_um) - self.sample("fibre_stream", x_um - h, y_um)
        gy = self.sample("fibre_stream", x_um, y_um + h) - self.sample("fibre_stream", x_um, y_um - h)
        return np.arctan2(gy, gx) + np.pi / 2

    def region(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Region id (index into REGIONS) at world points; background outside the section."""
        h, w = self.region_raster.shape
        col = np.floor(np.asarray(x_um, dtype=np.float32) * np.float32(1 / REGION_STEP_UM)).astype(np.int32)
        row = np.floor(np.asarray(y_um, dtype=np.float32) * np.float32(1 / REGION_STEP_UM)).astype(np.int32)
        inside = (col >= 0) & (row >= 0) & (col < w) & (row < h)
        out = self.region_raster[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]
        return np.where(inside, out, np.uint8(BACKGROUND))


def _exact_region(fields: dict[str, np.ndarray], t: dict[str, float], x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    gx, gy = x_um / FIELD_STEP_UM - 0.5, y_um / FIELD_STEP_UM - 0.5
    tumour = _bilinear(fields["tumour"], gx, gy)
    in_tumour = tumour > t["tumour"]
    out = np.full(np.shape(x_um), STROMA, dtype=np.uint8)
    out[in_tumour] = TUMOUR
    out[in_tumour & (tumour > t["tumour_core"]) & (_bilinear(fields["necrosis"], gx, gy) > t["necrosis"])] = NECROSIS
    out[~in_tumour & (_bilinear(fields["immune"], gx, gy) > t["immune"])] = IMMUNE
    out[_bilinear(fields["tissue"], gx, gy) < t["tissue"]] = BACKGROUND
    return out


def _bilinear(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    gx = np.clip(np.asarray(gx, dtype=np.float32), 0, grid.shape[1] - 1.001)
    gy = np.clip(np.asarray(gy, dtype=np.float32), 0, grid.shape[0] - 1.001)
    ix = gx.astype(np.int32)
    iy = gy.astype(np.int32)
    fx = gx - ix
    fy = gy - iy
    g00 = grid[iy, ix]
    g01 = grid[iy, ix + 1]
    g10 = grid[iy + 1, ix]
    g11 = grid[iy + 1, ix + 1]
    top = g00 + (g01 - g00) * fx
    bottom = g10 + (g11 - g10) * fx
    return top + (bottom - top) * fy


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_um: float) -> np.ndarray:
    noise = rng.standard_normal(shape)
    field = ndimage.gaussian_filter(noise, scale_um / FIELD_STEP_UM, mode="reflect")
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def make_fields(rng: np.random.Generator, size_um: tuple[float, float]) -> TissueFields:
    """Random fields at FIELD_STEP_UM over the section plus a margin, and region thresholds."""
    margin = 4
    shape = (int(np.ceil(size_um[1] / FIELD_STEP_UM)) + margin, int(np.ceil(size_um[0] / FIELD_STEP_UM)) + margin)
    fields = {
        "tissue": _smooth_field(rng, shape, 300.0),
        "tumour": _smooth_field(rng, shape, 110.0),
        "necrosis": _smooth_field(rng, shape, 60.0),
        "immune": _smooth_field(rng, shape, 40.0),
        "ifn": _smooth_field(rng, shape, 150.0),
        "hypoxia": _smooth_field(rng, shape, 120.0),
        "proliferation": _smooth_field(rng, shape, 200.0),
        "fibre_stream": _smooth_field(rng, shape, 120.0),
        "nuclear_size": _smooth_field(rng, shape, 250.0),
    }
    thresholds = {
        "tissue": -1.6,  # about 5 % of the section is bare glass (holes, tears)
        "tumour": 0.1,
        "tumour_core": 1.0,
        "necrosis": 0.3,
        "immune": 1.2,
    }
    immune = (fields["immune"] > thresholds["immune"]) & (fields["tumour"] <= thresholds["tumour"])
    necrosis = (fields["tumour"] > thresholds["tumour_core"]) & (fields["necrosis"] > thresholds["necrosis"])
    immune_proximity = _proximity(immune, 70.0)
    necrosis_proximity = _proximity(necrosis, 50.0)
    # Morphology-state fields are made exactly uncorrelated, over this section's tumour, with the
    # hidden states and their drivers, so that nuclei carry no chance information about them.
    drivers = [
        ifn_state(fields["ifn"], immune_proximity),
        hypoxia_state(fields["hypoxia"], necrosis_proximity),
        fields["ifn"],
        fields["hypoxia"],
        immune_proximity,
        necrosis_proximity,
    ]
    design = np.column_stack([np.ones(immune.size)] + [d.ravel().astype(np.float64) for d in drivers])
    tumour = fields["tumour"].ravel() > thresholds["tumour"]
    if tumour.sum() < 10 * design.shape[1]:
        tumour = np.ones_like(tumour)
    for name in ("proliferation", "nuclear_size"):
        f = fields[name].ravel().astype(np.float64)
        f = f - design @ np.linalg.lstsq(design[tumour], f[tumour], rcond=None)[0]
        fields[name] = (f / (f[tumour].std() + 1e-12)).reshape(immune.shape).astype(np.float32)
    raster_w = int(np.ceil(size_um[0] / REGION_STEP_UM))
    raster_h = int(np.ceil(size_um[1] / REGION_STEP_UM))
    raster = np.empty((raster_h, raster_w), dtype=np.uint8)
    x = ((np.arange(raster_w) + 0.5) * REGION_STEP_UM).astype(np.float32)
    for row0 in range(0, raster_h, 256):
        y = ((np.arange(row0, min(row0 + 256, raster_h)) + 0.5) * REGION_STEP_UM).astype(np.float32)
        xx, yy = np.meshgrid(x, y)
        raster[row0 : row0 + len(y)] = _exact_region(fields, thresholds, xx, yy)
    fields["immune_proximity"] = immune_proximity
    fields["necrosis_proximity"] = necrosis_proximity
    return TissueFields(step_um=FIELD_STEP_UM, fields=fields, thresholds=thresholds, region_raster=raster)


def _proximity(mask: np.ndarray, reach_um: float) -> np.ndarray:
    """1 inside the mask, decaying as exp(-distance / reach) outside."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    distance_um = ndimage.distance_transform_edt(~mask) * FIELD_STEP_UM
    return np.exp(-distance_um / reach_um).astype(np.float32)


@dataclass(frozen=True)
class Cells:
    """One row per cell, ordered block by block (row-major blocks, row-major nodes within)."""

    x_um: np.ndarray
    y_um: np.ndarray
    node_x: np.ndarray
    node_y: np.ndarray
    block: np.ndarray
    region: np.ndarray
    cell_type: np.ndarray
    nucleus_a_um: np.ndarray
    nucleus_b_um: np.ndarray
    nucleus_angle: np.ndarray
    cell_radius_um: np.ndarray
    darkness: np.ndarray
    dapi: np.ndarray
    eosin: np.ndarray
    cytoplasm_hematoxylin: np.ndarray
    vesicular: np.ndarray
    ifn: np.ndarray
    hypoxia: np.ndarray
    proliferating: np.ndarray
    nuclear_size_z: np.ndarray
    library_size: np.ndarray
    block_starts: np.ndarray
    node_index: np.ndarray
    """(ny, nx) int32: cell row at each node, -1 for none."""
    lookup: dict[str, np.ndarray]
    """Node grids padded by NODE_REACH, flattened: cell x, y (far away when empty), radius^2, row."""

    def __len__(self) -> int:
        return len(self.x_um)

    @property
    def nucleus_radius_um(self) -> np.ndarray:
        return np.sqrt(self.nucleus_a_um * self.nucleus_b_um)


def block_grid(size_um: tuple[float, float]) -> tuple[int, int, int, int]:
    """Node grid (nx, ny) and block grid (bx, by) sizes covering the section."""
    nx = int(np.ceil(size_um[0] / NODE_UM))
    ny = int(np.ceil(size_um[1] / NODE_UM))
    return nx, ny, -(-nx // BLOCK_NODES), -(-ny // BLOCK_NODES)


def make_cells(seed: int, fields: TissueFields, size_um: tuple[float, float],
               sarcomatoid_region_um: tuple[float, float, float, float] | None = None) -> Cells:
    """Place cells block by block; each block has its own random stream, so blocks are independent.
    Tumour cells inside ``sarcomatoid_region_um`` (x0, y0, x1, y1; None: none) take the spindle form
    of :func:`sarcomatoid_nuclei`."""
    nx, ny, bx, by = block_grid(size_um)
    parts = []
    for block_y in range(by):
        for block_x in range(bx):
            rng = np.random.default_rng([seed, 1, block_y, block_x])
            part = _block_cells(rng, fields, block_x, block_y, nx, ny, block_y * bx + block_x)
            if sarcomatoid_region_um is not None:
                x0, y0, x1, y1 = sarcomatoid_region_um
                inside = ((part["cell_type"] == 0) & (part["x_um"] >= x0) & (part["x_um"] < x1)
                          & (part["y_um"] >= y0) & (part["y_um"] < y1))
                part = sarcomatoid_nuclei(part, inside, fields)
            parts.append(part)
    columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    keep = _without_overlapping_nuclei(columns, nx, ny)
    del columns["priority"]
    columns = {key: value[keep] for key, value in columns.items()}
    counts = np.bincount(columns["block"], minlength=bx * by)
    block_starts = np.concatenate([[0], np.cumsum(counts)])
    node_index = np.full((ny, nx), -1, dtype=np.int32)
    node_index[columns["node_y"], columns["node_x"]] = np.arange(len(columns["x_um"]), dtype=np.int32)
    padded = np.pad(node_index, NODE_REACH, constant_values=-1)
    has = padded >= 0
    rows = np.maximum(padded, 0)
    lookup = {
        "x": np.where(has, columns["x_um"][rows], _FAR_UM).astype(np.float32).ravel(),
        "y": np.where(has, columns["y_um"][rows], _FAR_UM).astype(np.float32).ravel(),
        "r2": np.where(has, columns["cell_radius_um"][rows].astype(np.float32) ** 2, 0).astype(np.float32).ravel(),
        "cell": padded.ravel(),
        "shape": np.array(padded.shape),
    }
    return Cells(**columns, block_starts=block_starts, node_index=node_index, lookup=lookup)


def _block_cells(
    rng, fields: TissueFields, block_x: int, block_y: int, nx: int, ny: int, block_id: int
) -> dict[str, np.ndarray]:
    """The columns of :class:`Cells` for one block (plus a thinning priority), drawn from ``rng``
    in a fixed order: sites, types, states, nucleus shape and stain, library size, priority."""
    site = _sites(rng, fields, block_x, block_y, nx, ny)
    x, y = site["x_um"], site["y_um"]
    n = len(x)
    cell_type = _cell_types(rng, fields, x, y, site["region"])
    states = _states(rng, fields, x, y, cell_type)
    proliferating = states["proliferating"]
    shape = _nucleus_and_cell(rng, fields, x, y, cell_type, proliferating, states["nuclear_size_z"])
    library = MEAN_TRANSCRIPTS[cell_type] * np.exp(0.3 * rng.standard_normal(n) - 0.045)
    return {
        **site,
        "block": np.full(n, block_id, dtype=np.int32),
        "cell_type": cell_type,
        **shape,
        "eosin": (CYTOPLASM_EOSIN[cell_type] * np.exp(0.1 * rng.standard_normal(n))).astype(np.float32),
        "cytoplasm_hematoxylin": CYTOPLASM_HEMATOXYLIN[cell_type].astype(np.float32),
        # mitotic (proliferating) nuclei are condensed: no open chromatin
        "vesicular": np.where(proliferating, 0.0, VESICULAR[cell_type]).astype(np.float32),
        "ifn": states["ifn"].astype(np.float32),
        "hypoxia": states["hypoxia"].astype(np.float32),
        "proliferating": proliferating,
        "nuclear_size_z": states["nuclear_size_z"].astype(np.float32),
        "library_size": library.astype(np.float32),
        "priority": rng.random(n),
    }


def _sites(rng, fields: TissueFields, block_x: int, block_y: int, nx: int, ny: int) -> dict[str, np.ndarray]:
    """Jittered node sites of the block accepted with their region's density: position, node, region."""
    x0, y0 = block_x * BLOCK_NODES, block_y * BLOCK_NODES
    gy, gx = np.mgrid[y0 : min(y0 + BLOCK_NODES, ny), x0 : min(x0 + BLOCK_NODES, nx)]
    gx = gx.ravel().astype(np.int32)
    gy = gy.ravel().astype(np.int32)
    n = len(gx)
    x = (gx + 0.5 + rng.uniform(-NODE_JITTER, NODE_JITTER, n)) * NODE_UM
    y = (gy + 0.5 + rng.uniform(-NODE_JITTER, NODE_JITTER, n)) * NODE_UM
    region = fields.region(x, y)
    accept_p = REGION_DENSITY_PER_MM2[region] * (NODE_UM * 1e-3) ** 2
    keep = rng.random(n) < accept_p
    return {"x_um": x[keep], "y_um": y[keep], "node_x": gx[keep], "node_y": gy[keep], "region": region[keep]}


def _cell_types(rng, fields: TissueFields, x: np.ndarray, y: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Cell type (uint8 index into CELL_TYPES) from the region's mix; lymphocytes and macrophages
    crowd the stroma at the tumour margin."""
    tumour_field = fields.sample("tumour", x, y)
    margin = np.clip((tumour_field - (fields.thresholds["tumour"] - MARGIN_WIDTH)) / MARGIN_WIDTH, 0, 1)
    margin = np.where(region == STROMA, margin, 0.0)[:, None]
    mix = (1 - margin) * REGION_TYPE_MIX[region] + margin * TUMOUR_MARGIN_TYPE_MIX[None, :]
    cumulative = np.cumsum(mix, axis=1)
    cell_type = (rng.random(len(x))[:, None] > cumulative).sum(axis=1).clip(max=len(CELL_TYPES) - 1)
    return cell_type.astype(np.uint8)


def _states(rng, fields: TissueFields, x: np.ndarray, y: np.ndarray, cell_type: np.ndarray) -> dict[str, np.ndarray]:
    """Hidden states (ifn, hypoxia: smooth fields that only some core genes reveal) and morphology
    states (proliferating, nuclear_size_z: visible in the nuclei, revealed by no core gene)."""
    n = len(x)
    ifn = ifn_state(fields.sample("ifn", x, y), fields.sample("immune_proximity", x, y))
    hypoxia = hypoxia_state(fields.sample("hypoxia", x, y), fields.sample("necrosis_proximity", x, y))
    is_tumour = cell_type == 0
    # the Ki-67 index of carcinomas ranges from a few per cent in quiescent regions to half the cells
    p_prolif = 0.02 + 0.48 * _sigmoid(2.5 * fields.sample("proliferation", x, y))
    proliferating = is_tumour & (rng.random(n) < p_prolif)
    # nuclear size: mostly a regional trait (grade varies across the tumour), partly per cell
    nuclear_size_z = (0.9 * fields.sample("nuclear_size", x, y) + 0.45 * rng.standard_normal(n)).clip(-2.5, 2.5)
    return {"ifn": ifn, "hypoxia": hypoxia, "proliferating": proliferating, "nuclear_size_z": nuclear_size_z}


def _nucleus_and_cell(
    rng, fields: TissueFields, x, y, cell_type, proliferating, nuclear_size_z
) -> dict[str, np.ndarray]:
    """Nucleus ellipse (semi-axes, angle), chromatin darkness, DAPI brightness and cell radius (float32)."""
    n = len(x)
    radius = NUCLEUS_RADIUS_UM[cell_type] * np.exp(NUCLEUS_RADIUS_SD[cell_type] * nuclear_size_z)
    radius = np.where(proliferating, radius * PROLIFERATING_RADIUS_GAIN, radius)
    aspect = NUCLEUS_ASPECT[cell_type] * np.exp(0.12 * rng.standard_normal(n))
    aspect = np.where(proliferating, 1.05, np.maximum(aspect, 1.0))
    fibre_angle = fields.fibre_direction(x, y)
    random_angle = rng.uniform(0, np.pi, n)
    elongated = (cell_type == 1) | (cell_type == 2)
    angle = np.where(elongated, fibre_angle + 0.25 * rng.standard_normal(n), random_angle)
    darkness = CHROMATIN_DARKNESS[cell_type] * np.exp(0.1 * rng.standard_normal(n))
    darkness = np.where(proliferating, darkness * PROLIFERATING_DARKNESS_GAIN, darkness)
    dapi = DAPI_BRIGHTNESS[cell_type] * np.exp(0.1 * rng.standard_normal(n))
    dapi = np.where(proliferating, dapi * PROLIFERATING_DARKNESS_GAIN, dapi)
    cell_radius = CELL_RADIUS_UM[cell_type] * np.exp(0.1 * rng.standard_normal(n))
    max_radius = (NODE_REACH - NODE_JITTER) * NODE_UM
    cell_radius = np.clip(np.maximum(cell_radius, radius * np.sqrt(aspect) + 1.0), None, max_radius)
    return {
        "nucleus_a_um": (radius * np.sqrt(aspect)).astype(np.float32),
        "nucleus_b_um": (radius / np.sqrt(aspect)).astype(np.float32),
        "nucleus_angle": angle.astype(np.float32),
        "cell_radius_um": cell_radius.astype(np.float32),
        "darkness": darkness.astype(np.float32),
        "dapi": dapi.astype(np.float32),
    }


SARCOMATOID_RADIUS_GAIN = 1.5
SARCOMATOID_ASPECT = 3.2
SARCOMATOID_DARKNESS_GAIN = 1.4


def sarcomatoid_nuclei(columns: dict[str, np.ndarray], rows: np.ndarray, fields: TissueFields) -> dict[str, np.ndarray]:
    """The cells at ``rows`` (a mask) with the spindle nuclei of a sarcomatoid tumour, a form no
    cohort tumour has: 1.5 x larger, 3.2 x longer than wide, along the fibres, darker, without open
    chromatin. Draws nothing at random, so the rest of the sample stays as it was."""
    out = dict(columns)
    radius = np.sqrt(columns["nucleus_a_um"] * columns["nucleus_b_um"]) * SARCOMATOID_RADIUS_GAIN
    root = np.sqrt(SARCOMATOID_ASPECT)
    angle = fields.fibre_direction(columns["x_um"], columns["y_um"])
    max_radius = (NODE_REACH - NODE_JITTER) * NODE_UM
    changed = {
        "nucleus_a_um": radius * root, "nucleus_b_um": radius / root, "nucleus_angle": angle,
        "darkness": columns["darkness"] * SARCOMATOID_DARKNESS_GAIN, "vesicular": np.zeros_like(columns["vesicular"]),
        "cell_radius_um": np.clip(np.maximum(columns["cell_radius_um"], radius * root + 1.0), None, max_radius),
    }
    for key, value in changed.items():
        out[key] = np.where(rows, value, columns[key]).astype(columns[key].dtype)
    return out


NUCLEUS_OVERLAP = 0.85
"""Two nuclei closer than this fraction of their summed radii cannot both stay."""


def _without_overlapping_nuclei(columns: dict[str, np.ndarray], nx: int, ny: int) -> np.ndarray:
    """Keep-mask of a one-pass hard-core thinning: a cell goes when a neighbouring nucleus of
    higher priority overlaps it, so nuclei touch at most a little (as in a real section)."""
    x, y = columns["x_um"], columns["y_um"]
    gx, gy = columns["node_x"], columns["node_y"]
    radius = np.sqrt(columns["nucleus_a_um"].astype(np.float64) * columns["nucleus_b_um"])
    priority = columns["priority"]
    node = np.full((ny + 2, nx + 2), -1, dtype=np.int64)
    node[gy + 1, gx + 1] = np.arange(len(x))
    drop = np.zeros(len(x), dtype=bool)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if ox == 0 and oy == 0:
                continue
            other = node[gy + 1 + oy, gx + 1 + ox]
            o = np.maximum(other, 0)
            close = (x - x[o]) ** 2 + (y - y[o]) ** 2 < (NUCLEUS_OVERLAP * (radius + radius[o])) ** 2
            drop |= (other >= 0) & close & (priority[o] > priority)
    return ~drop


def ifn_state(ifn_field: np.ndarray, immune_proximity: np.ndarray) -> np.ndarray:
    """Interferon response: near immune aggregates and where a smooth random field is high."""
    return _sigmoid(2.5 * (ifn_field + 2.0 * immune_proximity - 0.8))


def hypoxia_state(hypoxia_field: np.ndarray, necrosis_proximity: np.ndarray) -> np.ndarray:
    """Hypoxia: near necrosis and where a smooth random field is high."""
    return _sigmoid(2.5 * (hypoxia_field + 2.5 * necrosis_proximity - 1.0))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def owning_cell(cells: Cells, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Row of the cell whose territory holds each point, or -1.

    A territory is the cell's disk (cell_radius_um) cut by the Voronoi diagram of the cell
    centres: the same rule draws the cell masks, the cell polygons and assigns transcripts.
    """
    shape = np.shape(x_um)
    x = np.ascontiguousarray(x_um, dtype=np.float32).ravel()
    y = np.ascontiguousarray(y_um, dtype=np.float32).ravel()
    owner = np.empty(x.shape, dtype=np.int32)
    lk = cells.lookup
    ny, nx = cells.node_index.shape
    owner_kernel(
        x, y, lk["x"], lk["y"], lk["r2"], lk["cell"], int(lk["shape"][1]), nx, ny, NODE_REACH, np.float32(NODE_UM),
        owner,
    )
    return owner.reshape(shape)


def cells_in_box(cells: Cells, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> np.ndarray:
    """Rows of cells whose node lies in the box (grown by NODE_REACH nodes), sorted."""
    ny, nx = cells.node_index.shape
    ix0 = max(int(np.floor(x0_um / NODE_UM)) - NODE_REACH, 0)
    iy0 = max(int(np.floor(y0_um / NODE_UM)) - NODE_REACH, 0)
    ix1 = min(int(np.floor(x1_um / NODE_UM)) + NODE_REACH + 1, nx)
    iy1 = min(int(np.floor(y1_um / NODE_UM)) + NODE_REACH + 1, ny)
    if ix1 <= ix0 or iy1 <= iy0:
        return np.zeros(0, dtype=np.int32)
    rows = cells.node_index[iy0:iy1, ix0:ix1].ravel()
    return np.sort(rows[rows >= 0])


def ellipse_radius(dx, dy, a, b, angle) -> np.ndarray:
    """Normalised radius of offsets from a nucleus centre: 1 on its elliptic boundary."""
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    along = dx * cos_a + dy * sin_a
    across = -dx * sin_a + dy * cos_a
    return np.sqrt((along / a) ** 2 + (across / b) ** 2).astype(np.float32)
