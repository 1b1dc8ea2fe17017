"""Option groups the merge stage and the pipeline share (how methods choose on held-out rows, how merges are
scored), and checks on options every stage shares: counts and sizes, finite numbers, config files, checkpoint
folders, and whether a model or data source is a local folder. Light: the pipeline parses with it before torch."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence


@dataclass
class SelectionOptions:
    """The data merge methods choose their options on (task arithmetic's lambda, FMN's p and s, TALL's masks) or
    adapt on (AdaMerging), and how a search spends it: every method gets the same rows and the same rules."""

    split: Literal["auto", "holdout", "validation", "train"] = "auto"
    """holdout (the training rows each checkpoint held out), validation (the scored rows: transductive), train;
    auto: holdout when every checkpoint held rows out, else validation."""
    samples: Optional[int] = 300
    """Cap on the selection rows per task (a seeded sample); None: all. On 300 rows a difference of a point or
    two between candidates is noise anyway, and scoring costs time in proportion."""
    screen: Optional[int] = 64
    """A search over more than `finalists` candidates first scores each on this many selection rows per task
    (spread evenly), then only the best `finalists` on all of them; None: every candidate on every row."""
    finalists: int = 4
    """How many candidates the screening keeps."""
    precision: Literal["32", "bf16", "auto"] = "auto"
    """Selection scoring under bfloat16 autocast ("bf16"; "auto": where the device supports it) or in float32
    ("32"). Reported scores are always float32."""

    def screen_rows(self) -> Optional[int]:
        """The rows per task candidates are screened on, or None where screening saves nothing (the selection
        holds no more rows than the screen)."""
        if self.screen is None or (self.samples is not None and self.samples <= self.screen):
            return None
        return self.screen

    def check(self, where: str = "selection") -> None:
        """Counts are positive integers (or null where that means all), before any work; errors name `where`."""
        for name in ("samples", "screen", "finalists"):
            check_count(f"{where}.{name}", getattr(self, name))


@dataclass
class EvalOptions:
    """The final scoring of a merge: every task on its validation rows with its own head, beside its individual
    model, the plain average and the constant."""

    max_samples: Optional[int] = None
    """Cap on the validation rows per task (a seeded sample, the same for every method); None: all."""
    compare_average: bool = True
    """Also score the plain average (cached per checkpoint set): the report's baseline."""
    cache: bool = True
    """Remember individual and plain-average scores beside each checkpoint (fmn_pl_eval.json)."""

    def check(self, where: str = "eval") -> None:
        """The cap is a positive integer (or null: all rows), before any work; an error names `where`."""
        check_count(f"{where}.max_samples", self.max_samples)


def check_count(name: str, value: int | None, minimum: int = 1) -> int | None:
    """`value` if it is None or an integer >= `minimum`, else a one-line error naming the option: a negative
    cap would silently mean "all but N" in a slice, and 0 leaves nothing to compute on."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} (or null where that means all), got {value!r}")
    return value


def is_local_path(source: str) -> bool:
    """True for a folder path, false for a hub name such as `nyu-mll/glue` (owner/name, not on disk)."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return True
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is None


def check_finite(options: Any, key: str = "") -> None:
    """A one-line error naming the option when any number in `options` (a parsed config: mappings, namespaces,
    lists) is NaN or infinite: YAML's `.nan` and `.inf` parse as floats, and would reach the computation."""
    if isinstance(options, float) and not math.isfinite(options):
        raise ValueError(f"{key or 'a value'} is {options}: give a finite number")
    items = vars(options).items() if isinstance(options, argparse.Namespace) else None
    if isinstance(options, dict):
        items = options.items()
    for name, value in items or ():
        name = "" if name == "init_args" else str(name)  # a class's options: `method.scaling`
        check_finite(value, ".".join(k for k in (key, name) if k))
    if isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            check_finite(value, f"{key}[{i}]")


def check_config_files(argv: Sequence[str]) -> None:
    """A one-line error for a `--config` that names a folder or an empty file (no options at all), before the
    parser says "does not exist" or "Unexpected config: null"."""
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag != "--config" or not (eq or i + 1 < len(argv)):
            continue
        path = Path(value if eq else argv[i + 1]).expanduser()
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder, not a YAML file")
        if path.is_file():
            import yaml

            try:
                empty = yaml.safe_load(path.read_text()) is None
            except yaml.YAMLError:
                continue  # the parser reports it, with its line and column
            if empty:
                raise ValueError(f"config file {path} is empty: it sets no options")


def check_checkpoint_folder(path: str | Path) -> Path:
    """`path` as a task checkpoint folder with safetensors weights, else one line: a file given for the folder,
    or a folder with only `pytorch_model.bin` (fmn-pl reads and fingerprints safetensors only)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"task checkpoint {path} is a file, not a folder (give the folder that holds it)")
    if path.is_dir() and not any(f.name.startswith("model") for f in path.glob("*.safetensors")):
        hint = (
            ": it has pytorch_model.bin only; re-save it with save_pretrained(safe_serialization=True)"
            if (path / "pytorch_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{path} holds no model*.safetensors weights{hint}")
    return path


def check_outside(output: str | Path, inputs: Sequence[str | Path], what: str = "input checkpoint") -> None:
    """A one-line error when the output folder `output` is one of the input folders `inputs`, holds one, or lies
    inside one: writing it would replace an input, or change the folder an input's fingerprint covers."""
    out = Path(output).expanduser().resolve()
    for source in inputs:
        folder = Path(source).expanduser().resolve()
        if out == folder or folder.is_relative_to(out):
            raise ValueError(f"output {output} would replace the {what} {source}")
        if out.is_relative_to(folder):
            raise ValueError(f"output {output} is inside the {what} {source}: write it elsewhere")
