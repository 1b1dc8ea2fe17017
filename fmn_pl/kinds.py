"""Artifact kinds: what `fmn-pl fisher --kind K` computes beside a task checkpoint, one registry line each.

A kind is a pass (an `fmn_pl.passes.ArtifactPass` callback in its own module: it sees every batch of a
validation-style loop and returns the tensors to save) plus the facts below. Its name is what artifact
headers record, what a merge method lists in `needs`, and the pipeline's `fisher.<name>` options. A new kind is
its module plus one line in `KINDS`; nothing else changes. This module imports nothing heavy: the pipeline plans
from it before torch or Lightning are imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArtifactKind:
    """One artifact kind: its names, its pass, and the defaults of a run of it."""

    name: str
    """Recorded in the artifact's header and named in merge methods' `needs`, e.g. "mask_fisher"."""
    cli: str
    """`fmn-pl fisher --kind <cli>`, e.g. "mask"."""
    callback: str
    """"module:Class" of its pass (an `ArtifactPass`), imported when the pass runs. Its `__init__` takes the
    checkpoint folder, `metadata=` and the kind's own options (`fmn-pl fisher` passes those the user set)."""
    batch_size: int = 32
    """Default examples per batch."""
    options: tuple[str, ...] = ()
    """Its own options among the pipeline's `fisher.<name>` ones (`aggregation`, `labels`): passed to its pass.
    Any other option goes in `fisher.<name>.args`."""
    forward: bool = False
    """True: the loop runs the model's plain forward on every batch (passes that only read hooks); False: the
    pass runs its own forward and backward."""

    @property
    def file(self) -> str:
        """Its file name in the checkpoint folder (`fmn_pl.artifacts.artifact_path`)."""
        return f"{self.name}.safetensors"

    def pass_class(self) -> Any:
        module, _, name = self.callback.partition(":")
        return getattr(importlib.import_module(module), name)


FISHER = ("aggregation", "labels")
KINDS: dict[str, ArtifactKind] = {
    k.name: k
    for k in (
        ArtifactKind("mask_fisher", "mask", "fmn_pl.fisher:MaskFisherCallback", options=FISHER),  # FMN's input
        ArtifactKind("full_fisher", "full", "fmn_pl.fisher:FullFisherCallback", 16, FISHER),  # Fisher merging's
        ArtifactKind("grams", "grams", "fmn_pl.grams:GramCallback", forward=True),  # RegMean's
    )
}


def get_kind(name: str) -> ArtifactKind:
    """A kind by its name ("mask_fisher") or its `--kind` ("mask"); an error lists the known ones."""
    for kind in KINDS.values():
        if name in (kind.name, kind.cli):
            return kind
    known = ", ".join(f"{k.cli} ({k.name})" for k in KINDS.values())
    raise ValueError(f"unknown artifact kind {name!r}; expected one of {known}")


def fisher_command(checkpoint: Any, kind: str) -> str:
    """The command that computes `kind` for `checkpoint` (for error messages that say how to get it)."""
    return f"fmn-pl fisher --checkpoint {checkpoint} --kind {get_kind(kind).cli}"
