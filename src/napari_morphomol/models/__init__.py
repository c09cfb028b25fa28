"""The paper's model family (early/late fusion, morph-only, expr-only, Min-MAE), its checkpoint
format, training and metrics. Headless: torch, timm and Lightning only.

Entry points: :class:`ModelConfig` (a variant of :data:`VARIANT_TABLE` and its sizes) and
:func:`build_model` give a model; :class:`FusionModel` runs features -> pool -> heads and declares
its outputs as :class:`OutputSpec` rows; :func:`train_model` / :func:`evaluate_model` train and
score it; :func:`save_checkpoint` / :func:`load_checkpoint` keep it with its :class:`ModelCard`;
:func:`convert_reference_checkpoint` reads the paper's reference code's weights;
:func:`fit_calibration` gives a trained model its :class:`Calibration` (conformal intervals and
the out-of-distribution threshold, docs/trust.md).
"""

from napari_morphomol._lazy import lazy_attributes

#: Public names and the submodule defining each. They load on first use, so that reading a
#: model card, the variant names or the CLI's --help does not import torch, timm or Lightning.
_SOURCES = {
    "baseline": ("MinMAEBaseline", "fit_min_mae_baseline"),
    "checkpoint": ("ModelCard", "PanelMatch", "build_model", "check_tile_geometry", "load_checkpoint",
                   "match_gene_panel", "read_model_card", "save_checkpoint"),
    "config": ("ADDON_TOKEN_HEAD", "DEFAULT_BACKBONE", "DEFAULT_VARIANT", "VARIANT_TABLE", "VARIANTS", "ModelConfig",
               "OutputSpec", "Variant", "addon_token_log1p"),
    "fusion": ("Features", "FusionModel", "ModelOutput"),
    "metrics": ("mean_metrics", "per_gene_metrics", "table_markdown", "variant_table", "write_variant_table"),
    "shipped": ("shipped_model_path",),
    "reference": ("convert_reference_checkpoint", "load_reference_checkpoint", "read_reference_state_dict"),
    "training": ("TOKEN_LOSSES", "Evaluation", "SampleSplit", "TrainingResult", "TrainingSettings", "evaluate_model",
                 "split_by_sample", "train_model"),
    "trust": ("CALIBRATED_LEVELS", "Calibration", "fit_calibration"),
}
__getattr__ = lazy_attributes("napari_morphomol.models", _SOURCES)

__all__ = [
    "ADDON_TOKEN_HEAD",
    "CALIBRATED_LEVELS",
    "DEFAULT_BACKBONE",
    "DEFAULT_VARIANT",
    "VARIANTS",
    "VARIANT_TABLE",
    "TOKEN_LOSSES",
    "Calibration",
    "Evaluation",
    "Features",
    "FusionModel",
    "MinMAEBaseline",
    "ModelCard",
    "ModelConfig",
    "ModelOutput",
    "OutputSpec",
    "PanelMatch",
    "SampleSplit",
    "TrainingResult",
    "TrainingSettings",
    "Variant",
    "addon_token_log1p",
    "build_model",
    "check_tile_geometry",
    "convert_reference_checkpoint",
    "evaluate_model",
    "fit_calibration",
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
