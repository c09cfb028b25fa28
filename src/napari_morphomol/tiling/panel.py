"""The core / add-on gene split, validated against the genes a sample actually measured."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from napari_morphomol.errors import InputError
from napari_morphomol.io.features import is_control_feature


@dataclass(frozen=True)
class GenePanel:
    """Ordered gene lists: ``core`` are the model's inputs, ``addon`` its targets."""

    core: tuple[str, ...]
    addon: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        core = tuple(str(g) for g in self.core)
        addon = tuple(str(g) for g in self.addon)
        if not core:
            raise InputError("the core panel is empty: give at least one input gene")
        for name, genes in (("core", core), ("add-on", addon)):
            dupes = sorted({g for g in genes if genes.count(g) > 1})
            if dupes:
                raise InputError(f"the {name} panel lists genes twice: {', '.join(dupes)}")
        both = sorted(set(core) & set(addon))
        if both:
            raise InputError(f"genes cannot be both core (input) and add-on (target): {', '.join(both)}")
        controls = sorted(g for g in core + addon if is_control_feature(g))
        if controls:
            raise InputError(f"control features are not genes; remove them from the panel: {', '.join(controls)}")
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "addon", addon)

    @classmethod
    def from_json(cls, path: str | Path) -> GenePanel:
        """A panel file ``{"core": [...], "addon": [...]}``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"panel file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("core"), list):
            raise InputError(f'{path} must be a JSON object {{"core": [genes...], "addon": [genes...]}}')
        return cls(core=tuple(data["core"]), addon=tuple(data.get("addon", [])))

    def validated(self, sample_features: list[str]) -> GenePanel:
        """Refuse genes the sample never measured, listing them all."""
        known = set(map(str, sample_features))
        unknown = [g for g in self.core + self.addon if g not in known]
        if unknown:
            shown = ", ".join(unknown[:50]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 50 else "")
            raise InputError(
                f"{len(unknown)} panel genes are not in this sample's transcripts: {shown}. "
                "Use the panel the model was trained on with a sample that measured those genes, "
                "or fix the gene names (they are case-sensitive)."
            )
        return self

    @classmethod
    def all_genes(cls, sample_features: list[str]) -> GenePanel:
        """Every measured gene as core, no add-on (for inspection without a split)."""
        return cls(core=tuple(sorted(str(f) for f in sample_features if not is_control_feature(f))))
