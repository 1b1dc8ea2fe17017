"""fmn-pl: fine-tune BERT-family models per GLUE task, measure mask-node Fisher, merge them.

The public API below is imported on first use (`fmn_pl.run_fit`, `from fmn_pl import merge_body`): `import fmn_pl`
itself loads neither torch nor Lightning (the CLI reads `fmn_pl.cores` before torch starts)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    # name: "module:attribute"
    "run_fit": "fmn_pl.fit:run_fit",
    "FitResult": "fmn_pl.fit:FitResult",
    "FitConfig": "fmn_pl.fit_config:FitConfig",
    "ModelOptions": "fmn_pl.fit_config:ModelOptions",
    "DataOptions": "fmn_pl.fit_config:DataOptions",
    "ExportOptions": "fmn_pl.fit_config:ExportOptions",
    "run_fisher": "fmn_pl.fisher_cli:run_fisher",
    "ArtifactResult": "fmn_pl.fisher_cli:ArtifactResult",
    "FisherConfig": "fmn_pl.kinds:FisherConfig",
    "KINDS": "fmn_pl.kinds:KINDS",
    "get_kind": "fmn_pl.kinds:get_kind",
    "run_merge": "fmn_pl.merge:run_merge",
    "merge_body": "fmn_pl.merge:merge_body",
    "MergeReport": "fmn_pl.merge_report:MergeReport",
    "MergeConfig": "fmn_pl.merge_config:MergeConfig",
    "SelectionOptions": "fmn_pl.options:SelectionOptions",
    "EvalOptions": "fmn_pl.options:EvalOptions",
    "PipelineConfig": "fmn_pl.pipeline_config:PipelineConfig",
    "PipelineReport": "fmn_pl.pipeline_results:PipelineReport",
    "METHODS": "fmn_pl.merging:METHODS",
    "MergeMethod": "fmn_pl.merging:MergeMethod",
    "MergeContext": "fmn_pl.merging:MergeContext",
    "Option": "fmn_pl.merging:Option",
    "method_class": "fmn_pl.merging:method_class",
    "CheckpointMeta": "fmn_pl.checkpoint:CheckpointMeta",
    "Evaluator": "fmn_pl.evaluate:Evaluator",
    "GLUEDataModule": "fmn_pl.data:GLUEDataModule",
    "task_datamodule": "fmn_pl.data:task_datamodule",
    "GLUETransformer": "fmn_pl.module:GLUETransformer",
}

__all__ = [
    "run_fit",
    "FitResult",
    "FitConfig",
    "ModelOptions",
    "DataOptions",
    "ExportOptions",
    "run_fisher",
    "ArtifactResult",
    "FisherConfig",
    "KINDS",
    "get_kind",
    "run_merge",
    "merge_body",
    "MergeReport",
    "MergeConfig",
    "SelectionOptions",
    "EvalOptions",
    "PipelineConfig",
    "PipelineReport",
    "METHODS",
    "MergeMethod",
    "MergeContext",
    "Option",
    "method_class",
    "CheckpointMeta",
    "Evaluator",
    "GLUEDataModule",
    "task_datamodule",
    "GLUETransformer",
]

if TYPE_CHECKING:  # the same names for type checkers (tests/test_api.py checks the three lists agree)
    from fmn_pl.checkpoint import CheckpointMeta
    from fmn_pl.data import GLUEDataModule, task_datamodule
    from fmn_pl.evaluate import Evaluator
    from fmn_pl.fisher_cli import ArtifactResult, run_fisher
    from fmn_pl.fit import FitResult, run_fit
    from fmn_pl.fit_config import DataOptions, ExportOptions, FitConfig, ModelOptions
    from fmn_pl.kinds import KINDS, FisherConfig, get_kind
    from fmn_pl.merge import merge_body, run_merge
    from fmn_pl.merge_config import MergeConfig
    from fmn_pl.merge_report import MergeReport
    from fmn_pl.merging import METHODS, MergeContext, MergeMethod, Option, method_class
    from fmn_pl.module import GLUETransformer
    from fmn_pl.options import EvalOptions, SelectionOptions
    from fmn_pl.pipeline_config import PipelineConfig
    from fmn_pl.pipeline_results import PipelineReport


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and kept, so that `import fmn_pl` stays light."""
    if name not in _API:
        raise AttributeError(f"module 'fmn_pl' has no attribute {name!r}")
    module, attr = _API[name].split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
