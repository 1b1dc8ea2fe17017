"""`fmn-pl merge` on the command line: the parser of `MergeConfig`, a method and its options written as
`--method NAME --method.OPTION V` or in a YAML config, and `--method NAME --help`."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from fmn_pl.merge import run_merge
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merge_report import MergeReport
from fmn_pl.merging import METHODS
from fmn_pl.merging.names import name_methods, own_class

# ---------------------------------------------------------------------------------------------- CLI


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
    name_methods()  # `--method fmn`: the parser finds the method class by its registry name
    parser.add_class_arguments(MergeConfig, None, skip={"checkpoints"})
    parser.add_argument(  # a list as shells write one: --checkpoints a b c (a YAML list in a config)
        "--checkpoints", type=str, nargs="+", required=True, help="fmn-pl task checkpoint folders, two or more"
    )
    parser.add_argument("--no_eval", dest="evaluate", action="store_false", help="the same as --evaluate false")
    return parser


def to_config(parser: Any, cfg: Any) -> MergeConfig:
    """The `MergeConfig` of a parsed namespace (its method and option groups instantiated)."""
    from dataclasses import fields

    init = parser.instantiate_classes(cfg)
    return MergeConfig(**{f.name: init[f.name] for f in fields(MergeConfig)} | {"method": own_class(init.method)})


def parse(parser: Any, args: Sequence[str]) -> MergeConfig:
    """The `MergeConfig` of a command line. Errors name a method as the user did, and an unknown one fails with the
    registered names (jsonargparse alone says only that it wants an import path)."""
    import re
    from argparse import ArgumentError

    try:
        cfg = parser.parse_args(list(args))
    except ArgumentError as e:
        said = str(e).replace(f"{name_methods.__module__}.", "")  # the method as the user named it
        unknown = re.search(r'key "method":\s+Expected a dot import path string: (\S+)', said)
        if unknown is not None:
            said = f"unknown merge method {unknown[1]!r}; registered methods: {', '.join(METHODS)}"
        raise ArgumentError(None, said) from None
    return to_config(parser, cfg)


def main(argv: Sequence[str] | None = None) -> MergeReport | None:
    """`fmn-pl merge ...`: the report of `run_merge`; bad input raises (one line at `fmn_pl.cli.shell`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        named = [v for a, v in zip(args, [*args[1:], ""]) if a == "--method"]
        named += [a.partition("=")[2] for a in args if a.startswith("--method=")]
        if named:  # that method's options only, one line each
            from fmn_pl.merging import option_lines

            print("\n".join(option_lines(named[-1])))
        else:
            build_parser().print_help()
        return None
    return run_merge(parse(build_parser(), args))
