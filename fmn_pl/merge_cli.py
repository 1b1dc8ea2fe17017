"""`fmn-pl merge` on the command line: the parser of `MergeConfig`, a method and its options written as
`--method NAME --method.OPTION V` or in a YAML config, and `--method NAME --help`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from fmn_pl.merge import run_merge
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merge_report import MergeReport
from fmn_pl.merging import METHODS, target

# ---------------------------------------------------------------------------------------------- CLI


def class_path(name: str) -> str:
    """A registry name (or a registered class's name) -> its importable class path; dotted paths unchanged."""
    if "." in name:
        return name
    for key, entry in METHODS.items():
        if name in (key, entry.split(":")[1]):
            return ".".join(target(key))
    from fmn_pl.merging import method_class

    method_class(name)  # raises: unknown merge method, with the known names
    return name


def with_class_paths(data: Any) -> Any:
    """Merge options (a config's data) with `method: fmn` or `method: {class_path: fmn, ...}` given class paths,
    which the parser needs; a copy."""
    if not isinstance(data, dict):
        return data
    m = data.get("method")
    if isinstance(m, str):
        return {**data, "method": {"class_path": class_path(m)}}
    if isinstance(m, dict) and isinstance(m.get("class_path"), str):
        return {**data, "method": {**m, "class_path": class_path(m["class_path"])}}
    return data


def _rewrite_config(text: str) -> str:
    """A YAML config of merge options with its method's registry name rewritten to a class path."""
    import yaml

    return yaml.safe_dump(with_class_paths(yaml.safe_load(text)), sort_keys=False)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Accept `--checkpoints a b c`, registry names for `--method` (also in --config files) and `--no_eval`."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if a == "--no_eval":
            out.append("--evaluate=false")
        elif flag == "--checkpoints" and not eq and i + 1 < len(args) and not args[i + 1].startswith("["):
            items = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                items.append(args[i + 1])
                i += 1
            out.append("--checkpoints=" + json.dumps(items))
        elif flag in ("--method", "--method.help"):
            if not eq and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            out.append(f"{flag}={class_path(value)}")
        elif flag == "--config":
            if not eq and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            path = Path(value)
            if not path.is_file():
                raise FileNotFoundError(f"config file {value} does not exist")
            out += ["--config", _rewrite_config(path.read_text())]
        else:
            out.append(a)
        i += 1
    return out


def _method_lines() -> str:
    from fmn_pl.merging import method_summary

    lines = []
    for name in METHODS:
        try:
            doc = method_summary(name)
        except Exception as e:  # noqa: BLE001 - a broken method module must not break the others' CLI
            doc = f"(cannot read: {e})"
        lines.append(f"  {name:<17} {doc}")
    return "\n".join(lines)


def build_parser() -> Any:
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the config's field docs are its help

    class Formatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
        """Keeps the description's line breaks (the method list)."""

    parser = ArgumentParser(
        formatter_class=Formatter,
        prog="fmn-pl merge",
        description="Merge task checkpoints' bodies, evaluate every task with its own head, report.\n\n"
        "Methods (--method NAME; options as --method.OPTION VALUE; `--method NAME --help` lists them):\n"
        + _method_lines(),
        exit_on_error=False,  # one line at the CLI's error boundary, not the usage
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (configs/merge/*.yaml)")
    parser.add_class_arguments(MergeConfig, None)
    return parser


def to_config(parser: Any, cfg: Any) -> MergeConfig:
    """The `MergeConfig` of a parsed namespace (its method and option groups instantiated)."""
    from dataclasses import fields

    init = parser.instantiate_classes(cfg)
    return MergeConfig(**{f.name: init[f.name] for f in fields(MergeConfig)})


def main(argv: Sequence[str] | None = None) -> MergeReport | None:
    """`fmn-pl merge ...`: the report of `run_merge`; bad input raises (one line at `fmn_pl.cli.shell`)."""
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("-h", "--help") for a in args):
        method = next((a.partition("=")[2] for a in args if a.startswith("--method=")), None)
        if method:  # that method's options only, one line each
            from fmn_pl.merging import option_lines

            method = next((n for n in METHODS if ".".join(target(n)) == method), method)  # normalize_argv's class path
            print("\n".join(option_lines(method)))
        else:
            build_parser().print_help()
        return None
    parser = build_parser()
    return run_merge(to_config(parser, parser.parse_args(args)))
