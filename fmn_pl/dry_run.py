"""`fmn-pl pipeline --dry_run true`: check the model, the data and every stage's arguments against that
stage's own parser, and say which stages would run and why, computing and writing nothing."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Callable, Optional

from fmn_pl.pipeline_config import PipelineConfig
from fmn_pl.stages import Identities, Stage, freshness, plan

# ---------------------------------------------------------------------------------------------- dry run


def check_source(what: str, source: str, paths: Callable[[Path], list[Path]]) -> tuple[list[str], list[str]]:
    """(problems, notes) about a model or data source: a local folder must hold `paths`; a hub name is noted."""
    from fmn_pl.options import is_local_path

    if not is_local_path(source):
        return [], [f"{what} {source!r} is a hub name: downloaded on first use (not checked here)"]
    root = Path(source).expanduser()
    if not root.is_dir():
        return [f"{what}: folder {root} does not exist"], []
    try:
        missing = [str(p) for p in paths(root) if not p.is_file()]
    except FileNotFoundError as e:
        return [f"{what}: {e}"], []
    return [f"{what}: {m} does not exist" for m in missing], []


def check_args(stage: Stage) -> Optional[str]:
    """Check the stage's options with the stage's own parser (nothing instantiated): the error, or None."""
    import io

    if stage.kind == "report":
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(stage.kind, stage.config.to_data())
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {e.code}"
    except Exception as e:  # noqa: BLE001 - any failure to parse is one line of the dry run
        from fmn_pl.errors import one_line

        return f"{type(e).__name__}: {one_line(e)}"
    return None


def parse(kind: str, data: dict[str, Any]) -> None:
    """Parse a stage's config data as `fmn-pl <kind> --config` would; raises on a bad option."""
    if kind == "fit":
        from fmn_pl.data import GLUEDataModule
        from fmn_pl.fit import FmnCLI
        from fmn_pl.module import GLUETransformer

        class Parse(FmnCLI):  # parse only: no seed set, no model loaded
            def _set_seed(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

        Parse(GLUETransformer, GLUEDataModule, args=data, run=False, seed_everything_default=False)
    elif kind == "merge":
        from fmn_pl.merge_cli import build_parser

        build_parser().parse_object(data)
    else:
        from fmn_pl.fisher_cli import build_parser as fisher_parser

        fisher_parser().parse_object(data)


def options_line(stage: Stage) -> str:
    """The options of a stage that say what it does, on one line (the config file is not written in a dry run):
    a merge's method, a Fisher pass's kind and caps, a fine-tuning's recipe."""
    import json

    from fmn_pl.merge_config import method_data

    if stage.kind == "fit":
        m = stage.config.model
        recipe = {"learning_rate": m.learning_rate, "weight_decay": m.weight_decay, "warmup_ratio": m.warmup_ratio}
        shown = {**recipe, **{k: stage.config.trainer.get(k) for k in ("max_epochs", "devices")}}
    elif stage.kind == "merge":
        method = method_data(stage.config.method)
        defaults = {o.name: o.default for o in type(stage.config.method).schema}  # shown: what differs from them
        given = {k: v for k, v in method["init_args"].items() if k not in defaults or defaults[k] != v}
        shown = {"method": method["class_path"], **given}
    else:
        where = ("checkpoint", "task", "data_dir", "seed", "batch_size")  # the same for every kind
        shown = {k: v for k, v in stage.options.items() if k not in where and v is not None}
    return json.dumps(shown, separators=(",", ":"))


def task_files(root: Path, spec: Any) -> list[Path]:
    """A task's split files in a local GLUE folder: train and its validation split(s)."""
    from fmn_pl.sources import split_file

    return [split_file(root, spec, s) for s in ("train", *spec.eval_splits)]


def dry_run(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> list[str]:
    """Check every stage's inputs and arguments without computing; print the plan; return the problems."""
    from fmn_pl.tasks import get_task

    stages = plan(cfg)
    problems, notes = check_source("model", cfg.model, lambda root: [root / "config.json"])
    for t in cfg.tasks:
        spec = get_task(t)
        found, noted = check_source(f"data of {t}", cfg.data_dir, functools.partial(task_files, spec=spec))
        problems += found
        notes += noted if t == cfg.tasks[0] else []
    ids, done = Identities(), dict[str, str]()
    width = len(str(len(stages)))
    counts: dict[str, int] = {}
    for n, stage in enumerate(stages, 1):
        error = check_args(stage)
        if error:
            problems.append(f"{stage.id}: its arguments do not parse: {error}")
        try:
            _, current, why = freshness(stage, cfg, ids, done)
        except (FileNotFoundError, ValueError) as e:  # an absent input, reported above
            current, why = None, f"inputs not readable: {e}"
        if why is None and current is not None:
            done[stage.id] = current
        state = "up to date" if why is None else "would run"
        counts[state] = counts.get(state, 0) + 1
        echo(f"[{n:>{width}}/{len(stages)}] {stage.id}: {state}{'' if why is None else f' ({why})'}")
        if why is not None and stage.kind != "report":
            echo(f"    $ {' '.join(stage.command())}  # {options_line(stage)}")
    for note in notes:
        echo(f"note: {note}")
    for problem in problems:
        echo(f"problem: {problem}")
    echo(
        f"dry run: {len(stages)} stages ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
        f"{len(problems)} problem(s); nothing was computed or written"
    )
    return problems
