"""Synthetic gene panel (:class:`ProgramPanel`), expression model and per-block transcript sampling.

Expression is log-linear in per-cell latent variables z = [cell-type one-hot, ifn, hypoxia,
proliferating, tumour nuclear-size z-score]: rate_cg = scale_c * exp(b_g + W_g . z_c).
Core genes load on cell types and on the hidden states (ifn, hypoxia), never on the
morphology states; add-on genes split into groups that load on cell type, on a hidden state,
or on a morphology state. scale_c fixes each cell's expected core total to its library size,
so core totals carry no trace of the morphology states either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_morphomol.errors import InputError
from napari_morphomol.synthetic.tissue import CELL_TYPES, Cells, ellipse_radius, owning_cell

LATENTS = (*CELL_TYPES, "ifn", "hypoxia", "proliferating", "tumour_nuclear_size")
_IFN, _HYPOXIA, _PROLIF, _NUCSIZE = (len(CELL_TYPES) + k for k in range(4))

_MARKERS = {
    "tumour": (
        "EPCAM KRT8 KRT18 KRT19 KRT7 CDH1 CLDN4 ELF3 MUC1 CEACAM5 TACSTD2 SOX9 ERBB2 KRT5 AGR2 SPINT2 FXYD3 "
        "CLDN7 KRT23 LCN2"
    ),
    "fibroblast": (
        "COL1A1 COL1A2 COL3A1 DCN LUM PDGFRA PDGFRB FAP POSTN SFRP2 FN1 THY1 ACTA2 TAGLN MMP2 COL5A1 COL6A3 "
        "VCAN SPARC CTSK"
    ),
    "endothelial": (
        "PECAM1 VWF CDH5 CLDN5 KDR EMCN PLVAP ENG FLT1 ESAM TIE1 RAMP2 AQP1 CD34 EGFL7 SOX17 NOTCH4 ROBO4 "
        "MMRN1 SELP"
    ),
    "T_cell": "CD3E CD3D CD2 CD8A CD4 TRAC IL7R CD247 GZMK CCR7 LCK CD5 CD6 CD28 ICOS CTLA4 PDCD1 TCF7 LEF1 CD96",
    "B_cell": (
        "MS4A1 CD19 CD79A CD79B PAX5 BANK1 CR2 FCRL5 MZB1 IGHM CD22 BLK TNFRSF13C VPREB3 FCRLA CD37 POU2AF1 "
        "SPIB TCL1A CIITA"
    ),
    "macrophage": (
        "CD68 CD163 CSF1R C1QA C1QB C1QC LYZ ITGAM MRC1 APOE FCGR3A AIF1 MS4A7 TYROBP FCER1G CD14 MSR1 "
        "SIGLEC1 VSIG4 LILRB4"
    ),
    "necrotic": "HSPA1A HMOX1 DDIT3 GADD45A ATF3 JUN FOS EGR1",
}
_CORE_STATES = {
    "ifn": "STAT1 IRF1 IRF7 ISG15 IFIT1 IFIT3 MX1 OAS1 CXCL9 CXCL10 GBP1 IDO1 HLA-DRA PSMB9 TAP1 GBP5",
    "hypoxia": "VEGFA CA9 SLC2A1 PGK1 LDHA BNIP3 NDRG1 ADM ENO1 P4HA1 HK2 ALDOA",
}
_ADDON = {
    "tumour": "KRT17 S100A2 SCGB2A2 MUC16 TFF1 CEACAM6",
    "fibroblast": "COL11A1 CTHRC1 MFAP5 COMP",
    "endothelial": "ACKR1 SELE PLVAP2 CLEC14A",
    "T_cell": "CD8B PRF1 NKG7 GZMB",
    "B_cell": "FCER2 CD72 MEF2C",
    "macrophage": "MARCO SPP1 CD209 FOLR2",
    "ifn": "IFI27 IFI44L RSAD2 OASL HERC5 ISG20 IFITM1 BST2 XAF1 CXCL11 IFI6 MX2",
    "hypoxia": "ANKRD37 EGLN3 PFKFB4 ERO1A KDM3A MXI1 ANGPTL4 LOX INSIG2 FAM162A",
    "proliferating": "MKI67 TOP2A CENPF BIRC5 CCNB1 UBE2C PCLAF TYMS MCM2 CDK1 AURKA KIF20A",
    "tumour_nuclear_size": "",
}

CONTROL_PREFIXES = {
    "NegControlProbe": ("negative_control_probe", "Negative Control Probe", 20),
    "NegControlCodeword": ("negative_control_codeword", "Negative Control Codeword", 20),
    "UnassignedCodeword": ("unassigned_codeword", "Unassigned Codeword", 20),
}
CONTROL_RATE_PER_TRANSCRIPT = 1e-4
"""Expected control-feature transcripts per cell transcript, per control feature."""
EXTRACELLULAR_SHARE = 0.08
"""Unassigned transcripts outside any cell, as a share of the cells' transcripts."""
NUCLEAR_SHARE = 0.4
REDRAWS = 3
DIFFUSION_UM = 0.7
LOW_QV_SHARE = 0.12


@dataclass(frozen=True)
class ProgramPanel:
    """The synthetic panel with each gene's expression program: all features in codeword order
    (core genes, add-on genes, then control features). Not the tiling panel
    (:class:`napari_morphomol.tiling.GenePanel`), which names only the genes a model uses."""

    names: list[str]
    n_core: int
    n_addon: int
    program: list[str]
    """Per gene: 'type:<cell type>', 'state:<latent>' or 'background'."""
    bias: np.ndarray
    loadings: np.ndarray
    """(n_genes, len(LATENTS))."""
    categories: list[str]
    feature_types: list[str]

    @property
    def n_genes(self) -> int:
        return self.n_core + self.n_addon

    @property
    def core(self) -> list[str]:
        return self.names[: self.n_core]

    @property
    def addon(self) -> list[str]:
        return self.names[self.n_core : self.n_genes]


def _take(pool: str, count: int, prefix: str, used: set[str]) -> list[str]:
    names = [n for n in pool.split() if n not in used][:count]
    k = 1
    while len(names) < count:
        name = f"{prefix}{k:03d}"
        if name not in used:
            names.append(name)
        k += 1
    used.update(names)
    return names


def _split(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``total`` by ``shares`` (summing to <= 1), one at least each."""
    counts = {k: max(1, int(total * v)) for k, v in shares.items()}
    spare = total - sum(counts.values())
    for k in sorted(shares, key=lambda k: -(total * shares[k] - int(total * shares[k])))[: max(spare, 0)]:
        counts[k] += 1
    return counts


PANEL_SEED = 20261129
"""Seeds every panel's gene biases and loadings. A gene's biology does not change between
patients, so every sample of a cohort shares its panel; the sample seed varies the tissue."""


def make_panel(n_core: int, n_addon: int) -> ProgramPanel:
    """The panel of ``n_core`` core and ``n_addon`` add-on genes plus the 60 control features.

    Parameters
    ----------
    n_core, n_addon
        Panel sizes (at least 24 core and 10 add-on genes).

    Returns
    -------
    ProgramPanel
        Names, programs, biases and loadings; the same for every sample of these sizes.
    """
    rng = np.random.default_rng([PANEL_SEED, n_core, n_addon])
    if n_core < 24:
        raise InputError(f"core panel of {n_core} genes is too small: use at least 24 core genes")
    if n_addon < 10:
        raise InputError(f"add-on panel of {n_addon} genes is too small: use at least 10 add-on genes")
    used: set[str] = set()
    core_names, core_program = _core_genes(n_core, used)
    addon_names, addon_program = _addon_genes(n_addon, used)
    names, program = core_names + addon_names, core_program + addon_program
    bias, loadings = _program_weights(rng, program)
    categories = ["predesigned_gene"] * n_core + ["custom_gene"] * n_addon
    feature_types = ["Gene Expression"] * len(names)
    k = 0
    for prefix, (category, feature_type, count) in CONTROL_PREFIXES.items():
        for _ in range(count):
            names.append(f"{prefix}_{k:05d}")
            categories.append(category)
            feature_types.append(feature_type)
            k += 1
    return ProgramPanel(names, n_core, n_addon, program, bias, loadings, categories, feature_types)


def _program(group: str) -> str:
    return f"type:{group}" if group in CELL_TYPES else f"state:{group}"


def _core_genes(n_core: int, used: set[str]) -> tuple[list[str], list[str]]:
    """Core gene names and programs: cell-type markers, hidden-state genes, then background genes."""
    core_shares = {t: 0.09 for t in CELL_TYPES if t != "necrotic"} | {"necrotic": 0.02, "ifn": 0.05, "hypoxia": 0.04}
    core_counts = {k: max(1, int(round(n_core * v))) for k, v in core_shares.items()}
    names: list[str] = []
    program: list[str] = []
    for group, count in core_counts.items():
        pool = _MARKERS.get(group) or _CORE_STATES[group]
        names += _take(pool, count, f"SYN{group[:3].upper()}", used)
        program += [_program(group)] * count
    n_background = n_core - len(names)
    if n_background < 0:
        raise InputError(f"core panel of {n_core} genes cannot hold the marker groups: use more core genes")
    names += _take("", n_background, "SYNBG", used)
    program += ["background"] * n_background
    return names, program


def _addon_genes(n_addon: int, used: set[str]) -> tuple[list[str], list[str]]:
    """Add-on gene names and programs: type markers (40 %), hidden and morphology states (15 % each)."""
    addon_types = [t for t in CELL_TYPES if t != "necrotic"]
    addon_shares = {t: 0.4 / len(addon_types) for t in addon_types}
    addon_shares |= {"ifn": 0.15, "hypoxia": 0.15, "proliferating": 0.15, "tumour_nuclear_size": 0.15}
    counts = _split(n_addon, addon_shares)
    if sum(counts.values()) != n_addon:
        raise InputError(f"add-on panel of {n_addon} genes cannot hold its groups: use more add-on genes")
    names: list[str] = []
    program: list[str] = []
    for group, count in counts.items():
        prefix = "SYNNUC" if group == "tumour_nuclear_size" else f"SYNA{group[:3].upper()}"
        names += _take(_ADDON[group], count, prefix, used)
        program += [_program(group)] * count
    return names, program


def _program_weights(rng: np.random.Generator, program: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Bias (n_genes,) and loadings (n_genes, len(LATENTS)) of each gene's program, drawn in gene order."""
    n_genes = len(program)
    bias = np.empty(n_genes)
    loadings = np.zeros((n_genes, len(LATENTS)))
    n_types = len(CELL_TYPES)
    for g, prog in enumerate(program):
        kind, _, what = prog.partition(":")
        if kind == "type":
            bias[g] = rng.normal(-1.8, 0.4)
            loadings[g, CELL_TYPES.index(what)] = rng.uniform(2.2, 3.5)
        elif kind == "state":
            j = LATENTS.index(what)
            loadings[g, :n_types] = rng.normal(0.0, 0.3, n_types)
            if what == "tumour_nuclear_size":
                bias[g] = rng.normal(-1.0, 0.3)
                loadings[g, 0] += 1.0
                loadings[g, j] = rng.uniform(0.9, 1.3)
            elif what == "proliferating":
                bias[g] = rng.normal(-2.5, 0.3)
                loadings[g, j] = rng.uniform(3.0, 4.0)
            else:
                bias[g] = rng.normal(-1.8, 0.3)
                loadings[g, j] = rng.uniform(2.5, 3.5)
        else:
            bias[g] = rng.normal(-0.8, 0.8)
            loadings[g, :n_types] = rng.normal(0.0, 0.6, n_types)
    return bias, loadings


def latent_matrix(cell_type, ifn, hypoxia, proliferating, nuclear_size_z) -> np.ndarray:
    """(cells, len(LATENTS)) latent z of cells given as per-cell arrays (cell type as its index)."""
    cell_type = np.asarray(cell_type)
    z = np.zeros((len(cell_type), len(LATENTS)), dtype=np.float64)
    z[np.arange(len(cell_type)), cell_type] = 1.0
    z[:, _IFN] = ifn
    z[:, _HYPOXIA] = hypoxia
    z[:, _PROLIF] = proliferating
    z[:, _NUCSIZE] = np.where(cell_type == 0, nuclear_size_z, 0.0)
    return z


def expected_gene_counts(bias: np.ndarray, loadings: np.ndarray, n_core: int, z: np.ndarray,
                         library_size: np.ndarray) -> np.ndarray:
    """(cells, genes) expected transcripts of each gene, without counting noise: core totals equal
    each cell's library size (the invariant of the module docstring)."""
    rate = np.exp(np.asarray(bias)[None, :] + z @ np.asarray(loadings).T)
    return rate * (np.asarray(library_size) / rate[:, :n_core].sum(axis=1))[:, None]


def expected_counts(panel: ProgramPanel, cells: Cells, rows: np.ndarray) -> np.ndarray:
    """(cells, features) expected transcripts of ``cells``' ``rows``, control features included."""
    z = latent_matrix(cells.cell_type[rows], cells.ifn[rows], cells.hypoxia[rows], cells.proliferating[rows],
                      cells.nuclear_size_z[rows])
    genes = expected_gene_counts(panel.bias, panel.loadings, panel.n_core, z, cells.library_size[rows])
    n_controls = len(panel.names) - panel.n_genes
    controls = np.repeat((cells.library_size[rows] * CONTROL_RATE_PER_TRANSCRIPT)[:, None], n_controls, axis=1)
    return np.hstack([genes, controls])


@dataclass
class BlockTranscripts:
    x_um: np.ndarray
    y_um: np.ndarray
    z_um: np.ndarray
    feature: np.ndarray
    cell: np.ndarray
    """Row of the owning cell, -1 when unassigned."""
    overlaps_nucleus: np.ndarray
    nucleus_distance_um: np.ndarray
    qv: np.ndarray

    def __len__(self) -> int:
        return len(self.x_um)


def sample_block(
    rng: np.random.Generator,
    panel: ProgramPanel,
    cells: Cells,
    rows: np.ndarray,
    region_of,
    block_box_um: tuple[float, float, float, float],
) -> BlockTranscripts:
    """Transcripts of the block's cells plus extracellular ones inside the block's tissue.

    Parameters
    ----------
    rng
        The block's random stream (drawn from in a fixed order, so a block is reproducible).
    panel, cells
        The sample's panel and cells.
    rows
        Rows of the block's cells.
    region_of
        ``region_of(x_um, y_um)``: region ids at world points (0 is background).
    block_box_um
        The block's (x0, y0, x1, y1) in world um.

    Returns
    -------
    BlockTranscripts
        The cells' transcripts first, then the extracellular ones.
    """
    x, y, feature, cell, rho, r_eff = _cell_transcripts(rng, panel, cells, rows)
    fx, fy, free_feature = _extracellular_transcripts(rng, panel, cells, region_of, block_box_um, len(x))
    x = np.concatenate([x, fx])
    y = np.concatenate([y, fy])
    feature = np.concatenate([feature, free_feature])
    cell = np.concatenate([cell, np.full(len(fx), -1, dtype=np.int32)])
    rho = np.concatenate([rho, np.full(len(fx), 2.0, dtype=np.float32)])
    r_eff = np.concatenate([r_eff, np.full(len(fx), 3.0, dtype=np.float32)])
    z, qv = _depth_and_quality(rng, x, y, feature >= panel.n_genes)
    return BlockTranscripts(
        x_um=x.astype(np.float32),
        y_um=y.astype(np.float32),
        z_um=z,
        feature=feature,
        cell=cell,
        overlaps_nucleus=(rho < 1.0).astype(np.uint8) * (cell >= 0),
        nucleus_distance_um=(np.maximum(rho - 1.0, 0.0) * r_eff).astype(np.float32),
        qv=qv,
    )


def _cell_transcripts(rng: np.random.Generator, panel: ProgramPanel, cells: Cells, rows: np.ndarray):
    """x, y (um), feature, owning cell (-1 when spilled over), normalised nucleus radius and
    effective nucleus radius (um) of the transcripts drawn for the cells ``rows``."""
    counts = rng.poisson(expected_counts(panel, cells, rows))
    local, feature = np.nonzero(counts)
    reps = counts[local, feature]
    local = np.repeat(local.astype(np.int32), reps)
    feature = np.repeat(feature.astype(np.int32), reps)
    gen = rows[local]
    a = cells.nucleus_a_um[gen]
    b = cells.nucleus_b_um[gen]
    angle = cells.nucleus_angle[gen]
    cell_r = cells.cell_radius_um[gen]
    nuclear = rng.random(len(gen), dtype=np.float32) < NUCLEAR_SHARE
    dx, dy = _offsets(rng, nuclear, a, b, angle, cell_r)
    owner = owning_cell(cells, cells.x_um[gen] + dx, cells.y_um[gen] + dy)
    # transcripts fill the cell's territory (its disk cut by the neighbours'): redraw those that
    # fell outside, so a cell's counts do not depend on its size; the few left spill over
    for _ in range(REDRAWS):
        again = np.flatnonzero(owner != gen)
        if len(again) == 0:
            break
        rdx, rdy = _offsets(rng, nuclear[again], a[again], b[again], angle[again], cell_r[again])
        dx[again], dy[again] = rdx, rdy
        owner[again] = owning_cell(cells, cells.x_um[gen[again]] + rdx, cells.y_um[gen[again]] + rdy)
    cell = np.where(owner == gen, gen, -1).astype(np.int32)
    rho = ellipse_radius(dx, dy, a, b, angle)
    return cells.x_um[gen] + dx, cells.y_um[gen] + dy, feature, cell, rho, np.sqrt(a * b)


def _extracellular_transcripts(rng, panel: ProgramPanel, cells: Cells, region_of, block_box_um, n_cell_transcripts):
    """x, y (um) and feature of extracellular transcripts: uniform in the block's tissue, outside
    every territory, about EXTRACELLULAR_SHARE of the cells' transcripts."""
    x0, y0, x1, y1 = block_box_um
    n_free = rng.poisson(EXTRACELLULAR_SHARE * n_cell_transcripts)
    fx = rng.uniform(x0, x1, n_free).astype(np.float32)
    fy = rng.uniform(y0, y1, n_free).astype(np.float32)
    keep = (region_of(fx, fy) != 0) & (owning_cell(cells, fx, fy) < 0)
    fx, fy = fx[keep], fy[keep]
    free_p = np.exp(panel.bias - panel.bias.max())
    free_p = np.concatenate([free_p, np.full(len(panel.names) - panel.n_genes, free_p.mean() * 0.3)])
    free_feature = rng.choice(len(panel.names), size=len(fx), p=free_p / free_p.sum()).astype(np.int32)
    return fx, fy, free_feature


def _depth_and_quality(rng, x: np.ndarray, y: np.ndarray, is_control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z (um, float32) of a slightly tilted section about 11 um above the coverslip, and qv."""
    n = len(x)
    z = (
        np.float32(11.0) + np.float32(2e-4) * x + np.float32(1e-4) * y
        + np.float32(1.8) * rng.standard_normal(n, dtype=np.float32)
    )
    low_share = np.where(is_control, np.float32(0.5), np.float32(LOW_QV_SHARE))
    low = rng.random(n, dtype=np.float32) < low_share
    # good calls pile up towards 40 (1 - U^(1/6) is Beta(1, 6)); failed ones spread below 20
    spread = rng.random(n, dtype=np.float32)
    qv = np.where(low, np.float32(20.0) * spread, np.float32(20.0) + np.float32(20.0) * spread ** np.float32(1 / 6))
    return np.clip(z, 0.5, 30.0), qv


def _offsets(rng, nuclear, a, b, angle, cell_r) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from the cell centre: uniform in the nucleus ellipse or in the cell disk, then diffused."""
    n = len(nuclear)
    radius01 = np.sqrt(rng.random(n, dtype=np.float32))
    theta = rng.random(n, dtype=np.float32) * np.float32(2 * np.pi)
    u = radius01 * np.cos(theta)
    v = radius01 * np.sin(theta)
    ex = np.where(nuclear, a * u, cell_r * u)
    ey = np.where(nuclear, b * v, cell_r * v)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    dx = np.where(nuclear, ex * cos_a - ey * sin_a, ex)
    dy = np.where(nuclear, ex * sin_a + ey * cos_a, ey)
    dx += np.float32(DIFFUSION_UM) * rng.standard_normal(n, dtype=np.float32)
    dy += np.float32(DIFFUSION_UM) * rng.standard_normal(n, dtype=np.float32)
    return dx, dy
