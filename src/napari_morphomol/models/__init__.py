"""The paper's model family (early/late fusion, morph-only, expr-only, Min-MAE), its checkpoint
format, training and metrics. Headless: torch, timm and Lightning only."""

from napari_morphomol.models.baseline import MinMAEBaseline, fit_min_mae_baseline
from napari_morphomol.models.checkpoint import (
    ModelCard,
    PanelMatch,
    build_model,
    check_tile_geometry,
    load_checkpoint,
    match_gene_panel,
    read_model_card,
    save_checkpoint,
)
from napari_morphomol.models.config import DEFAULT_BACKBONE, DEFAULT_VARIANT, VARIANTS, ModelConfig, ModelTileGeometry
from napari_morphomol.models.fusion import FusionModel, ModelOutput
from napari_morphomol.models.metrics import (
    mean_metrics,
    per_gene_metrics,
    table_markdown,
    variant_table,
    write_variant_table,
)
from napari_morphomol.models.shipped import shipped_model_path
from napari_morphomol.models.reference import (
    convert_reference_checkpoint,
    load_reference_checkpoint,
    read_reference_state_dict,
)

#: Lightning is slow to import and only needed to train: these load on first use.
_TRAINING_NAMES = ("Evaluation", "SampleSplit", "TrainingResult", "TrainingSettings", "evaluate_model", "split_by_sample", "train_model")


def __getattr__(name):
    if name in _TRAINING_NAMES:
        from napari_morphomol.models import training

        return getattr(training, name)
    raise AttributeError(f"module 'napari_morphomol.models' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_VARIANT",
    "VARIANTS",
    "Evaluation",
    "FusionModel",
    "MinMAEBaseline",
    "ModelCard",
    "ModelConfig",
    "ModelOutput",
    "PanelMatch",
    "SampleSplit",
    "ModelTileGeometry",
    "TrainingResult",
    "TrainingSettings",
    "build_model",
    "check_tile_geometry",
    "convert_reference_checkpoint",
    "evaluate_model",
    "fit_min_mae_baseline",
    "load_checkpoint",
    "load_reference_checkpoint",
    "match_gene_panel",
    "mean_metrics",
    "per_gene_metrics",
    "read_model_card",
    "read_reference_state_dict",
    "save_checkpoint",
    "shipped_model_path",
    "split_by_sample",
    "table_markdown",
    "train_model",
    "variant_table",
    "write_variant_table",
]
