"""`fmn-pl pipeline`: fine-tune, compute artifacts, merge, evaluate and report from one config, resumably.

The pipeline calls the stage functions in order, with options it derives from its own config:

    fit/<task>               run_fit     -> <output>/checkpoints/<task>/           (task checkpoint)
    fisher/<task>/<kind>     run_fisher  -> <output>/checkpoints/<task>/<kind>.safetensors
    merge/<combo>/<label>    run_merge   -> <output>/merges/<combo>/<label>/report.json, merged body
    report                   combined JSON, Markdown table and plots -> <output>/report.*, <output>/plots/

Each stage's options are also written to <output>/configs/<stage>.yaml, so `fmn-pl <stage> --config` reruns
it alone, exactly as the pipeline ran it.

Resume: after a stage succeeds its stamp `<output>/stamps/<stage>.json` is written last, atomically. It
holds a key (a hash of the stage's options and of the identities of everything it read: checkpoint
weight fingerprints, artifact and report hashes, base model and data files) and the identity of what it
wrote. A rerun skips a stage whose stamp has the same key and whose outputs still match; a stage being
recomputed loses its stamp first, so an interrupted stage is never mistaken for a finished one.
Where a stage ran (devices, nodes, strategy) and the code version are not part of the key.

Stages with one process are function calls in the pipeline's process, their output in the stage's log; a
stage with more devices or nodes, or a DDP-like strategy, runs as its own `fmn-pl <stage> --config` process,
so Lightning's launcher starts its ranks exactly as it does for a standalone stage (its DDP launcher starts
the other ranks by running the process's own command line again: the pipeline's would rerun the pipeline).
Under srun or torchrun (one pipeline per rank), every rank runs the multi-process stages; single-process
stages (merges, the report, and any stage with one device) run on global rank 0 only, and a rank that reads
one's output waits for its stamp. Merging and evaluation are always one process.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fmn_pl.dry_run import dry_run
from fmn_pl.files import atomic_write, output_lock, write_json
from fmn_pl.launch import StageFailed, run_in_child, run_in_process
from fmn_pl.pipeline_config import PipelineConfig, config_yaml, parse_config, seed_runs
from fmn_pl.pipeline_report import write_pipeline_report
from fmn_pl.progress import stage_line
from fmn_pl.ranks import (
    cpu_seconds,
    external_world,
    global_rank,
    is_global_zero,
    on_every_rank,
    output_to,
    tail,
)
from fmn_pl.resources import peak_rss_mb, reset_peak
from fmn_pl.stages import Identities, Stage, freshness, plan, read_stamp, stamp_path


def check_fresh_output(stage: Stage, started: float, log: Path, weights: Optional[str] = None) -> None:
    """Before a stage is stamped: its output was written by this run (not left from an earlier one) and, for an
    artifact, its own header names the kind, task and weights asked for and no more examples than asked.
    `weights`: the checkpoint's fingerprint when the run knows it (its fit stage's output identity)."""
    from fmn_pl.artifacts import Artifact
    from fmn_pl.checkpoint import METADATA_FILE

    written = stage.output / METADATA_FILE if stage.output.is_dir() else stage.output
    if written.stat().st_mtime < int(started):  # whole seconds: file systems with coarse times
        raise StageFailed(f"stage {stage.id} ended without writing {written} (it is older than the stage); see {log}")
    if stage.kind != "fisher":
        return
    kind = stage.output.name.removesuffix(".safetensors")
    meta = Artifact(stage.output, kind, stage.options["checkpoint"], weights).metadata  # checks kind and weights
    asked = stage.options.get("num_examples")
    if meta.get("task") != stage.options["task"] or (asked is not None and int(meta.get("num_examples", 0)) > asked):
        raise StageFailed(
            f"stage {stage.id}: {stage.output} records task {meta.get('task')!r} and "
            f"{meta.get('num_examples')} examples, not what the stage asked for; see {log}"
        )


def resume_folder(stage: Stage, cfg: PipelineConfig, key: str) -> Path:
    """Where a fine-tuning stage stopped by SIGTERM leaves its resumable `last.ckpt`: one folder per stage key,
    so a rerun with the same options goes on from it and one with other options starts afresh."""
    return Path(cfg.output) / "resume" / f"{stage.id.split('/')[1]}-{key[:16]}"


def stage_config(stage: Stage, cfg: PipelineConfig, key: str) -> Any:
    """The stage's config as this run calls it: a fine-tuning stage also gets its `export.resume_dir`, and its
    `ckpt_path` when a SIGTERM left a checkpoint there (it resumes)."""
    if stage.kind != "fit" or not key:
        return stage.config
    folder = resume_folder(stage, cfg, key)
    last = folder / "last.ckpt"
    config = replace(stage.config, export=replace(stage.config.export, resume_dir=str(folder)))
    if last.is_file():
        print(f"resuming from {last} (left by SIGTERM)", file=sys.stderr)
        config = replace(config, ckpt_path=str(last))
    return config


def run_stage(
    stage: Stage, cfg: PipelineConfig, log: Path, alone: bool = False, port_offset: int = 0, key: str = ""
) -> None:
    """Run one stage: in this process when it needs no launcher, else as `fmn-pl <stage> --config <its config>`.

    `alone`: a single-process stage under an external launcher; it runs in a child process that does not see
    the launcher's rank variables (so Lightning does not wait for ranks that will never join). `port_offset`:
    the stage's number, which every rank knows, for a port of its own under torchrun."""
    import yaml

    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(stage.command())}\n")
    if stage.kind == "report":
        with output_to(log):
            from fmn_pl.evidence_report import write_results  # numpy: only when a report is written

            write_pipeline_report(cfg)
            write_results(Path(cfg.output), cfg.fit.seed)
        return
    config = stage_config(stage, cfg, key)
    if stage.config_file is not None:  # its own command runs it alone as here (every rank writes the same file)
        atomic_write(stage.config_file, yaml.safe_dump(config.to_data(), sort_keys=False))
    if not alone and not on_every_rank(stage):
        with output_to(log):
            run_in_process(stage.kind, config)
        return
    run_in_child(stage.command(), log, alone, port_offset)


def _matches(stage_id: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(
        fnmatch.fnmatchcase(stage_id, p) or stage_id.startswith(p.rstrip("/") + "/") for p in patterns
    )


def wait_for_rank_zero(stage: Stage, cfg: PipelineConfig, key: str, since: float, poll_s: float = 2.0) -> str:
    """On another rank: wait until rank 0 stamps `stage` with `key` (newer than `since`); its output identity."""
    stamp_file = stamp_path(cfg, stage)
    failed = stamp_file.with_suffix(".failed")
    while True:
        stamp = read_stamp(stamp_file)
        if stamp is not None and stamp.get("key") == key and stamp.get("finished_unix", 0) >= since:
            return stamp["output"]
        if failed.is_file() and failed.stat().st_mtime >= since:
            raise StageFailed(f"{stage.id} failed on rank 0: {failed.read_text().strip()}")
        time.sleep(poll_s)


def execute(
    cfg: PipelineConfig,
    only: Optional[Sequence[str]] = None,
    rerun: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run the stages that are not up to date; return {stage id: "ran" | "skipped" | "rank 0"}.

    Under an external launcher (srun, torchrun: one pipeline per rank) every rank runs the stages that need
    a launcher; the others run on rank 0 alone, and another rank that needs one's output waits for its stamp.
    """
    run = Run(cfg, plan(cfg), echo)
    selected, needed, awaited = run.select(only)
    for n, stage in enumerate(run.stages, 1):
        if stage.id not in needed:
            continue
        missing = [d for d in stage.deps if d not in run.done]
        if missing and run.multi and not run.zero and all(run.status.get(d) == "rank 0" for d in missing):
            run.status[stage.id] = "rank 0"  # reads rank-0 outputs this rank never waited for: rank 0's too
            continue
        forced = bool(rerun) and _matches(stage.id, rerun)
        key, current, why = freshness(stage, cfg, run.ids, run.done, forced)
        prefix = f"[{n:>{len(str(len(run.stages)))}}/{len(run.stages)}] {stage.id}"
        if why is None:
            run.skip(stage, current, prefix if stage.id in selected else None)
            continue
        if stage.id not in selected:
            why = f"its inputs {missing} are not finished" if missing else "it is not finished or is out of date"
            raise StageFailed(f"{stage.id} is needed by the selected stages but {why}: run it first")
        if missing:
            raise StageFailed(f"{stage.id} cannot run: {missing} did not finish")
        assert key is not None
        if run.multi and not run.zero and not on_every_rank(stage):
            run.status[stage.id] = "rank 0"
            if stage.id in awaited:
                run.done[stage.id] = wait_for_rank_zero(stage, cfg, key, run.started if forced else 0.0)
            continue
        run.run(stage, n, key, why, prefix)
    return run.status


class Run:
    """One `execute`: the plan, what is known finished, each stage's status, and this process's rank."""

    def __init__(self, cfg: PipelineConfig, stages: list[Stage], echo: Callable[[str], None]) -> None:
        self.cfg, self.stages, self.echo = cfg, stages, echo
        self.started = time.time()
        self.zero, self.multi = is_global_zero(), external_world() > 1
        self.ids = Identities()
        self.done: dict[str, str] = {}  # stage id -> identity of its output, for stages known finished in this run
        self.status: dict[str, str] = {}

    def select(self, only: Optional[Sequence[str]]) -> tuple[set[str], set[str], set[str]]:
        """(the stages asked for, those and every stage they read, and on another rank than 0: the rank-0 stages
        whose outputs a stage of this rank reads)."""
        selected = {s.id for s in self.stages if _matches(s.id, only)}
        if only is not None and not selected:
            names = ", ".join(s.id for s in self.stages)
            raise ValueError(f"--only {list(only)} matches no stage; stages are: {names}")
        needed = set(selected)
        for s in reversed(self.stages):  # what the selected stages read must be known finished
            if s.id in needed:
                needed.update(s.deps)
        awaited: set[str] = set()
        if self.multi and not self.zero:
            for s in reversed(self.stages):
                if s.id in needed and (on_every_rank(s) or s.id in awaited):
                    awaited.update(s.deps)
        return selected, needed, awaited

    def skip(self, stage: Stage, current: Optional[str], prefix: Optional[str]) -> None:
        """An up-to-date stage: known finished; said on rank 0 when it was asked for (`prefix`)."""
        self.done[stage.id] = current  # type: ignore[assignment]
        self.status[stage.id] = "skipped"
        if self.zero and prefix is not None:
            wall = (read_stamp(stamp_path(self.cfg, stage)) or {}).get("wall_s", 0)
            self.echo(f"{prefix}: up to date ({wall:.1f} s when run)")

    def run(self, stage: Stage, n: int, key: str, why: str, prefix: str) -> None:
        """Run one stage (its stamp removed first), then on rank 0 check and stamp what it wrote."""
        stamp_file = stamp_path(self.cfg, stage)
        if self.zero:
            stamp_file.unlink(missing_ok=True)  # from now on nothing says this stage is finished
            stamp_file.with_suffix(".failed").unlink(missing_ok=True)
        rank = "" if self.zero else f".rank{global_rank()}"
        log = Path(self.cfg.output) / "logs" / (stage.id.replace("/", "__") + rank + ".log")
        if self.zero:
            self.echo(stage_line(prefix, f"running ({why}); log: {log}"))  # its progress follows on the console
        start, cpu, started_wall = time.perf_counter(), cpu_seconds(), time.time()
        own_peak = reset_peak() and not on_every_rank(stage) and not self.multi  # in this process: the stage's
        try:
            run_stage(stage, self.cfg, log, alone=self.multi and not on_every_rank(stage), port_offset=n, key=key)
        except BaseException as e:
            if self.zero:
                self.echo(f"{prefix}: FAILED ({e}); last lines of {log}:\n{tail(log)}")
                atomic_write(stamp_file.with_suffix(".failed"), f"{type(e).__name__}: {e}; see {log}\n")
            if isinstance(e, Exception):
                raise StageFailed(f"stage {stage.id} failed; see {log}") from e
            raise
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        self.status[stage.id] = "ran"
        if not self.zero:  # rank 0 checks and stamps the output (it may write it after this rank is done)
            self.done[stage.id] = wait_for_rank_zero(stage, self.cfg, key, self.started)
            return
        self.ids.forget(stage)
        current = self.ids.output(stage)
        if current is None:
            raise StageFailed(f"stage {stage.id} finished but its output {stage.output} is missing; see {log}")
        check_fresh_output(stage, started_wall, log, self.done.get(stage.deps[0]) if stage.deps else None)
        self.done[stage.id] = current
        write_stamp(stage, self.cfg, key, current, wall, cpu, own_peak)
        self.echo(f"{prefix}: done in {wall:.1f} s")


def write_stamp(
    stage: Stage, cfg: PipelineConfig, key: str, current: str, wall: float, cpu: float, own_peak: bool
) -> None:
    """The stamp that says `stage` finished with `key` and wrote `current` (last, atomically), with its cost; a
    fine-tuning stage's checkpoints of interrupted attempts go."""
    write_json(
        stamp_path(cfg, stage),
        {
            "stage": stage.id,
            "key": key,
            "output": current,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1) if own_peak else None,
            "load": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),  # how shared the machine was
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "finished_unix": time.time(),
            "command": stage.command(),
            "launch": asdict(stage.launch) if stage.launch else None,
            "options": stage.options,
        },
    )
    if stage.kind == "fit":  # finished: no checkpoint of an interrupted attempt is needed any more
        for folder in resume_folder(stage, cfg, key).parent.glob(f"{stage.id.split('/')[1]}-*"):
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> dict[str, str] | list[str]:
    """`fmn-pl pipeline --config configs/pipeline/demo.yaml [--dry_run true] [--only ...] [--rerun ...]`.
    With `seeds`, each seed's run in turn (its stage ids prefixed with `seed-<seed>/` in the returned status)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, flags = parse_config(argv)
    runs = seed_runs(cfg)
    if flags["dry_run"]:
        problems = [p for run in runs for p in dry_run(run)]
        if problems:
            raise SystemExit(1)
        return problems
    status: dict[str, str] = {}
    for run in runs:
        one = run_one(run, flags, echo_seed=run.fit.seed if cfg.seeds else None)
        status.update({(f"seed-{run.fit.seed}/{k}" if cfg.seeds else k): v for k, v in one.items()})
    if cfg.seeds and is_global_zero() and any(k.endswith("/report") for k in status):
        from fmn_pl.evidence_report import write_results

        write_results(Path(cfg.output))  # across seeds, from their bundles
    return status


def run_one(cfg: PipelineConfig, flags: dict[str, Any], echo_seed: Optional[int] = None) -> dict[str, str]:
    """One run of the pipeline (one seed) into `cfg.output` as its one writer (a lock in it, held by rank 0;
    flags["wait"]: wait for another run holding it instead of refusing at once)."""
    with output_lock(cfg.output, flags.get("wait", False), inside=True, hold=is_global_zero()):
        return _run_one(cfg, flags, echo_seed)


def _run_one(cfg: PipelineConfig, flags: dict[str, Any], echo_seed: Optional[int] = None) -> dict[str, str]:
    """One run of the pipeline (one seed) into `cfg.output`: its resolved config written first."""
    out = Path(cfg.output)
    if is_global_zero():
        from fmn_pl.files import check_writable

        check_writable(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "pipeline.yaml", config_yaml(cfg))  # the resolved config that produced this folder
        if echo_seed is not None:
            print(f"pipeline: seed {echo_seed} in {out}")
    start = time.perf_counter()
    try:
        status = execute(cfg, flags["only"], flags["rerun"])
    except StageFailed as e:  # the stage's log tail is printed already: one line, no traceback
        print(f"fmn-pl pipeline: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if is_global_zero():
        ran = sum(v == "ran" for v in status.values())
        report = f"; report: {out / 'report.md'}" if (out / "report.md").is_file() else ""
        print(
            f"pipeline: {ran} stage(s) ran, {sum(v == 'skipped' for v in status.values())} up to date, "
            f"{time.perf_counter() - start:.1f} s{report}"
        )
    return status
