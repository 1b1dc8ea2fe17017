"""The typed config of one task's fine-tuning, what `run_fit` takes: the sections of `configs/fit/*.yaml` that
fmn-pl owns (model, data, export) as dataclasses with their classes' options (tests/test_configs.py checks they
agree), and Lightning's own `trainer` section as Lightning's data (LightningCLI types it when it parses).
Light: the pipeline builds it before torch loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union


@dataclass
class ModelOptions:
    """The `model:` section: `GLUETransformer`'s options (its task is `data.task`)."""

    model_name_or_path: str
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_epsilon: float = 1e-8
    num_labels: Optional[int] = None
    attn_implementation: Optional[str] = None


@dataclass
class DataOptions:
    """The `data:` section: `GLUEDataModule`'s options (its tokenizer is the model's)."""

    task: str = "rte"
    data_dir: str = "nyu-mll/glue"
    max_length: Optional[int] = None
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    sample_seed: int = 0
    group_by_length: bool = False
    eval_splits: Optional[list[str]] = None
    unpadded_shards: bool = False
    holdout_samples: int = 0
    num_workers: int = 0


@dataclass
class ExportOptions:
    """The `export:` section: `ExportCheckpoint`'s options (where the task checkpoint goes, which epoch)."""

    dirpath: Optional[str] = None
    select: Literal["best", "last"] = "best"
    overwrite: bool = False
    monitor: str = "val/score"
    resume_dir: Optional[str] = None


@dataclass
class FitConfig:
    """One task's fine-tuning: `run_fit(FitConfig(...))` runs what `fmn-pl fit --config <its to_data()>` runs."""

    model: ModelOptions
    data: DataOptions = field(default_factory=DataOptions)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Lightning's `Trainer` options, as in a fit config's `trainer:` section (loggers and callbacks by class_path)."""
    export: ExportOptions = field(default_factory=ExportOptions)
    seed_everything: Union[int, bool] = 42
    ckpt_path: Optional[str] = None
    """A Lightning checkpoint to resume from (`last`: the export's resume checkpoint)."""

    def to_data(self) -> dict[str, Any]:
        """The config as `fmn-pl fit --config` reads it (what the pipeline writes for the stage); no `ckpt_path`
        when it starts afresh."""
        data = asdict(self)
        if self.ckpt_path is None:
            del data["ckpt_path"]
        return data
