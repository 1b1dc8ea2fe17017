"""Every shipped YAML under configs/ parses against the CLI it belongs to, so no config can rot.

configs/<folder>/*.yaml is checked with `fmn-pl <folder> --config FILE --print_config` (folder `fit`: the
LightningCLI; `fisher`, `merge`, `pipeline`: their stage parsers). A stage whose module is not written yet
is skipped with the reason; an unknown folder fails, so a new folder has to be mapped here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from fmn_pl.cli import STAGES, main
from fmn_pl.fit import lightning_cli
from fmn_pl.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SUBCOMMANDS = {"fit": "fmn_pl.cli", **{name: target.split(":")[0] for name, (target, _) in STAGES.items()}}
ALL = sorted(CONFIGS.rglob("*.yaml"))
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def folder_of(path: Path) -> str:
    return path.relative_to(CONFIGS).parts[0]


def print_config(subcommand: str, path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([subcommand, "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), f"{path}: exit {e.value.code}\n{out.err[-2000:]}"
    return out.out


def assert_subset(shipped, printed, where: str = "") -> None:
    """Every value the YAML sets comes back unchanged from the parser (nothing dropped or renamed)."""
    if isinstance(shipped, dict):
        assert isinstance(printed, dict), where
        for key, value in shipped.items():
            assert key in printed, f"{where}.{key} missing from the parsed config"
            assert_subset(value, printed[key], f"{where}.{key}")
    elif isinstance(shipped, list):
        assert isinstance(printed, list) and len(printed) == len(shipped), where
        for i, (a, b) in enumerate(zip(shipped, printed)):
            assert_subset(a, b, f"{where}[{i}]")
    else:
        assert shipped == printed, f"{where}: {shipped!r} became {printed!r}"


def test_configs_exist_in_known_folders():
    assert ALL, f"no YAML under {CONFIGS}"
    assert not [p for p in ALL if p.parent == CONFIGS], "configs live in a folder named after their subcommand"
    unknown = sorted({folder_of(p) for p in ALL} - set(SUBCOMMANDS))
    assert not unknown, f"configs/{unknown} map to no subcommand: add the folder to SUBCOMMANDS in this test"
    assert {p.stem for p in (CONFIGS / "fit").glob("*.yaml")} == set(TASKS), "one fit config per GLUE task"


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_parses(path: Path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a parser might write lands in the repository
    folder = folder_of(path)
    if folder not in SUBCOMMANDS:
        pytest.fail(f"configs/{folder}/ maps to no subcommand")
    module = SUBCOMMANDS[folder]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet: configs/{folder}/ cannot be checked")
    shipped = yaml.safe_load(path.read_text())
    assert isinstance(shipped, dict) and shipped, f"{path} is empty or not a mapping"
    printed = yaml.safe_load(print_config(folder, path, capsys))
    assert isinstance(printed, dict)
    if folder == "fit":
        assert_subset(shipped, printed)  # full class paths in the fit configs: values come back verbatim
        assert printed["data"]["task"] == path.stem  # model.task is linked from it
    else:  # stage parsers may expand short forms (a method name into class_path/init_args)
        assert set(shipped) <= set(printed), f"{path}: keys {set(shipped) - set(printed)} are not options"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_fit_config_instantiates(task, tiny_base, tiny_glue, tmp_path, monkeypatch):
    """Beyond parsing: the trainer, logger, callbacks, model and data of each fit config build (on a tiny
    model and data, since the shipped paths point at ../shared or the hub)."""
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(
        [
            "--config",
            str(CONFIGS / "fit" / f"{task}.yaml"),
            f"--model.model_name_or_path={tiny_base('bert')}",
            f"--data.data_dir={tiny_glue}",
        ],
        run=False,
    )
    assert cli.model.task.name == cli.datamodule.task.name == task
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert cli.trainer.max_epochs >= 2 and cli.model.hparams.learning_rate <= 1e-4
    export = [c for c in cli.trainer.callbacks if type(c).__name__ == "ExportCheckpoint"]
    assert len(export) == 1 and export[0].dirpath == f"runs/checkpoints/{task}"


def test_reference_configs_spell_the_papers_rule():
    """The YAML copies of the paper's rule (a merge config and the paper pipeline's row) equal REFERENCE, the one
    place the code states it, so a change there cannot leave them stale."""
    from fmn_pl.merging.fmn import REFERENCE

    merge = yaml.safe_load((CONFIGS / "merge" / "fmn_reference.yaml").read_text())["method"]
    assert merge["class_path"] == "fmn" and merge["init_args"] == REFERENCE
    rows = yaml.safe_load((CONFIGS / "pipeline" / "paper.yaml").read_text())["merge"]["methods"]
    (row,) = [r for r in rows if r.get("label") == "fmn_reference"]
    assert row["name"] == "fmn" and row["options"] == REFERENCE


@pytest.mark.parametrize(
    "section, cls, linked",
    [
        ("ModelOptions", "fmn_pl.module:GLUETransformer", {"task"}),
        ("DataOptions", "fmn_pl.data:GLUEDataModule", {"tokenizer"}),
        ("ExportOptions", "fmn_pl.fit:ExportCheckpoint", set()),
    ],
)
def test_fit_config_sections_are_their_classes_options(section: str, cls: str, linked: set[str]) -> None:
    """`FitConfig`'s typed sections have their class's options, with the same defaults, in its order (the options
    LightningCLI links from another section left out), so `run_fit(FitConfig)` can set what a fit config can."""
    import dataclasses
    import inspect

    import fmn_pl.fit_config as fit_config

    module, name = cls.split(":")
    params = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()]
    expected = [(p.name, p.default) for p in params if p.name not in linked]
    fields = dataclasses.fields(getattr(fit_config, section))
    got = [(f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default) for f in fields]
    assert got == expected


def test_run_fit_takes_the_pipelines_fit_config(tiny_base, tiny_glue, tmp_path) -> None:
    """A pipeline's `FitConfig`, as data, is a config LightningCLI accepts whole (every section and option)."""
    from fmn_pl.fit_config import DataOptions, ExportOptions, FitConfig, ModelOptions

    config = FitConfig(
        model=ModelOptions(str(tiny_base("bert")), learning_rate=1e-4),
        data=DataOptions(task="rte", data_dir=str(tiny_glue), max_train_samples=8, batch_size=4),
        trainer={"max_epochs": 1, "limit_val_batches": 0, "logger": False},
        export=ExportOptions(dirpath=str(tmp_path / "rte"), select="last"),
    )
    cli = lightning_cli(config.to_data(), run=False)
    assert cli.model.hparams.learning_rate == 1e-4 and cli.datamodule.hparams.max_train_samples == 8
