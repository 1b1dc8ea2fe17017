"""How a pipeline stage runs: a call of its stage function in this process, or its own `fmn-pl <stage> --config`
process when a launcher must start its ranks (Lightning's DDP launcher re-runs the process's command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from fmn_pl.ranks import LAUNCHER_VARS


class StageFailed(RuntimeError):
    """A stage failed or cannot run; the message names it (and its log)."""


def call_stage(kind: str, config: Any) -> object:
    """Run a stage in this process: its function on its config (the result: an export, artifact or report)."""
    if kind == "fit":
        from fmn_pl.fit import run_fit

        return run_fit(config)
    if kind == "fisher":
        from fmn_pl.fisher_cli import run_fisher

        return run_fisher(config)
    from fmn_pl.merge import run_merge

    return run_merge(config)


def run_in_process(kind: str, config: Any) -> None:
    """A stage as a function call in this process, its errors in the log as the shell would show them."""
    from fmn_pl.errors import EXIT_SIGNAL, is_user_error, one_line, run_interruptible

    try:
        run_interruptible(lambda: call_stage(kind, config))
    except SystemExit as e:
        if e.code in EXIT_SIGNAL:
            raise  # interrupted: the pipeline stops too, with the same status
        if e.code not in (0, None):
            raise StageFailed(f"exit status {e.code}") from e
    except BaseException as e:
        if isinstance(e, Exception) and is_user_error(e):
            print(f"fmn-pl {kind}: error: {one_line(e)}", file=sys.stderr)
        else:
            traceback.print_exc()
        raise


def run_in_child(command: list[str], log: Path, alone: bool, port_offset: int) -> None:
    """A stage that needs a launcher, as its own process (`command`: `fmn-pl <kind> --config <file>`): Lightning's
    launcher starts the other ranks from that command line, or, under srun/torchrun, this process is one rank (it
    inherits the launcher's environment)."""
    env = dict(os.environ)
    if alone:
        for var in LAUNCHER_VARS:
            env.pop(var, None)
    elif env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's workers share its agent's store, where one stage's process group would find the previous
        # stage's (dead) addresses: each stage gets its own store, hosted by its rank 0 on a port of its own.
        env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        env["MASTER_PORT"] = str(int(env.get("MASTER_PORT", "29500")) + 1 + port_offset)
    cmd = [sys.executable, "-m", "fmn_pl.cli", *command[1:]]
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc in (143, 130, -15, -2):  # the stage's process was stopped by a signal: so is the pipeline
        raise SystemExit(143 if rc in (143, -15) else 130)
    if rc != 0:
        raise StageFailed(f"exit status {rc}")
