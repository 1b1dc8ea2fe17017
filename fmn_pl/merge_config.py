"""`MergeConfig`: every option of one merge, as `fmn-pl merge`, a YAML file, the pipeline and `run_merge` share
it, and its plain-data form (`MergeConfig.to_data`), which `fmn-pl merge --config` reads back and the pipeline
hashes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from fmn_pl.merging.base import MergeMethod
from fmn_pl.options import EvalOptions, SelectionOptions

# Options that say where and how a merge runs, not what it computes: left out of a pipeline stage's key.
RUN_OPTIONS = ("output", "overwrite", "wait", "accelerator", "progress", "push_to_hub")


@dataclass
class MergeConfig:
    """Merge task checkpoints' bodies with one method, save the merged model, score every task with its own head
    on its GLUE validation rows, and report against the individual models and the plain average."""

    checkpoints: list[str]
    """fmn-pl task checkpoint folders (two or more, distinct tasks, one architecture and tokenizer)."""
    method: MergeMethod
    """The merge method by its registered name (average, fmn, fisher, task_arithmetic, ties, regmean, adamerging,
    tall, consensus, ...) with its options as --method.OPTION; `--method NAME --help` lists them."""
    output: str
    """Folder to write (refused if it exists and is not empty, unless `overwrite`)."""
    base: Optional[str] = None
    """The pretrained model (folder or hub name) for methods on task vectors; default: the checkpoints' recorded
    base_model."""
    data_dir: str = "../shared/data/glue"
    """GLUE data: a local folder (parquet or TSV layout) or a hub dataset name."""
    label: Optional[str] = None
    """The name of this merge in reports (default: the method name)."""
    own_tensors: Optional[list[str]] = None
    """Glob patterns of body tensors that are not merged: each task keeps its own, with its head (e.g.
    ["*.pooler.*"]). The plain average the report compares with keeps them too; the bare merged body lacks them."""
    evaluate: bool = True
    """Score the merged model, the individual models and the plain average on every task."""
    save_model: bool = True
    """Keep the merged model in the output folder (false: reports only)."""
    batch_size: int = 64
    """Batch size of selection and evaluation scoring."""
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    """Where and how methods choose their options."""
    eval: EvalOptions = field(default_factory=EvalOptions)
    """The final scoring."""
    accelerator: str = "auto"
    """Lightning accelerator for scoring (auto, cpu, gpu, ...)."""
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""
    wait: bool = False
    """Wait for another run writing `output` (it holds `.NAME.lock` beside it) to finish, instead of refusing at
    once; its finished output is then refused unless `overwrite`."""
    progress: bool = True
    """Show progress bars."""
    push_to_hub: Optional[str] = None
    """A Hub repo id ("user/name") to upload the output folder to once it is complete (created if absent; needs a
    token: `hf auth login` or HF_TOKEN)."""

    def __post_init__(self) -> None:
        """Folders given as `Path`s (from Python) kept as the strings the YAML and the CLI hold."""
        self.checkpoints = [str(c) for c in self.checkpoints]
        self.output = str(self.output)
        self.base = None if self.base is None else str(self.base)

    def to_data(self) -> dict[str, Any]:
        """The config as plain data, in field order: what `config.yaml` holds and `fmn-pl merge --config` reads."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return data | {
            "method": method_data(self.method),
            "selection": asdict(self.selection),
            "eval": asdict(self.eval),
        }


def method_data(method: MergeMethod) -> dict[str, Any]:
    """A method as config data: its registered name and its options (`{class_path: fmn, init_args: {...}}`)."""
    from fmn_pl.merge_inputs import method_name

    return {"class_path": method_name(method), "init_args": dict(method.options())}
