"""Safe on a shared cluster file system: one writer per output (two real merges, two real pipelines on one output:
the second refused in one line or waiting, nothing replaced), temporaries removed only when their maker is
provably gone (a live one from another host, boot or pid namespace is left), files the umask lets a team read,
writability by a real write, a full disk in one line naming the path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from fmn_pl import files
from fmn_pl.files import (
    DiskFull,
    OutputBusy,
    atomic_dir,
    check_writable,
    output_lock,
    remove_leftovers,
    write_json,
)
from fmn_pl.owners import owner
from tests.conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FMN_PL_TRACEBACK": ""}

# `fmn-pl ARGV` in a process that stops at MODULE:FUNCTION (inside its output lock) until the file GATE exists,
# and says so by making GATE.reached: a writer caught in the middle of its work.
PAUSED = """
import importlib, pathlib, sys, time
gate, (module, name) = pathlib.Path(sys.argv[1]), sys.argv[2].split(":")
mod = importlib.import_module(module)
original = getattr(mod, name)
def paused(*args, **kwargs):
    pathlib.Path(f"{gate}.reached").touch()
    while not gate.exists():
        time.sleep(0.1)
    return original(*args, **kwargs)
setattr(mod, name, paused)
sys.argv = ["fmn-pl", *sys.argv[3:]]
from fmn_pl.cli import main
main()
"""


def fmn_pl(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", *argv], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300
    )


def start(argv: list[str], cwd: Path, gate: Path | None = None, stop_at: str = "") -> subprocess.Popen:
    """`fmn-pl ARGV` in the background (stopped at `stop_at` until `gate` exists), stderr to cwd/<n>.err."""
    err = open(cwd / f"{len(list(cwd.glob('*.err')))}.err", "w")
    cmd = [sys.executable, "-c", PAUSED, str(gate), stop_at] if gate else [sys.executable, "-m", "fmn_pl.cli"]
    return subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, cwd=cwd)


def until(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def checkpoints(tmp_path: Path, tiny_base: Callable[[str], Path]) -> list[str]:
    return [str(tiny_checkpoint(tiny_base("bert"), t, tmp_path / t, s)) for s, t in enumerate(["rte", "mrpc"])]


# ---------------------------------------------------------------------------------------------- one writer


def test_two_merges_on_one_output(tmp_path: Path, checkpoints: list[str], tiny_glue: Path) -> None:
    out, gate = tmp_path / "merged", tmp_path / "go"
    argv = ["merge", "--method=average", "--checkpoints", *checkpoints, f"--output={out}", f"--data_dir={tiny_glue}"]
    argv += ["--eval.max_samples=8", "--progress=false"]
    first = start(argv, tmp_path, gate, "fmn_pl.merge:write_merge")  # stopped inside its output folder's lock
    until(lambda: Path(f"{gate}.reached").exists() or first.poll() is not None, "the first merge to start writing")
    assert first.poll() is None, (tmp_path / "0.err").read_text()

    second = fmn_pl(*argv, cwd=tmp_path)  # refused at once, in one line naming the holder
    assert second.returncode == 2, second.stderr
    host = socket.gethostname()
    assert len(lines(second.stderr)) == 1, second.stderr
    assert lines(second.stderr)[0].startswith(f"fmn-pl merge: error: {out} is being written by process {first.pid}")
    assert f"process {first.pid} on {host} since " in second.stderr and "--wait true" in second.stderr

    waiting = start([*argv, "--wait=true"], tmp_path)  # waits for the first, then finds its finished output
    until(lambda: "waiting for process" in (tmp_path / "1.err").read_text(), "the third merge to wait")
    gate.touch()
    assert first.wait(timeout=300) == 0, (tmp_path / "0.err").read_text()
    report, inode = (out / "report.json").read_bytes(), out.stat().st_ino
    assert waiting.wait(timeout=300) == 2
    err = lines((tmp_path / "1.err").read_text())
    assert err[0].startswith(f"waiting for process {first.pid} on {host}")
    assert (
        len(err) == 2
        and err[1] == f"fmn-pl merge: error: {out} already exists and is not empty; pass overwrite to replace it"
    )
    assert (out / "report.json").read_bytes() == report and out.stat().st_ino == inode  # nothing replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock or temp left


def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    """A writer outside the lock (another tool, a file system without locks): its output wins without overwrite."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while this run wrote it"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(out, overwrite=True) as tmp:  # asked for: replaced
        (tmp / "mine").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine"]


def test_two_pipelines_on_one_output(tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path) -> None:
    out, gate = tmp_path / "run", tmp_path / "go"
    argv = ["pipeline", f"--config={ROOT / 'configs/pipeline/tiny.yaml'}", f"--model={tiny_base('bert')}"]
    argv += [f"--data_dir={tiny_glue}", f"--output={out}", "--only=fit/rte"]
    first = start(argv, tmp_path, gate, "fmn_pl.pipeline:execute")  # stopped inside the output's lock
    until(lambda: Path(f"{gate}.reached").exists() or first.poll() is not None, "the first pipeline to start")
    assert first.poll() is None, (tmp_path / "0.err").read_text()

    second = fmn_pl(*argv, cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    assert len(lines(second.stderr)) == 1, second.stderr
    assert lines(second.stderr)[0].startswith(f"fmn-pl pipeline: error: {out} is being written by process {first.pid}")
    assert not (out / "stamps").exists()  # it ran nothing

    waiting = start([*argv, "--wait=true"], tmp_path)
    until(lambda: "waiting for process" in (tmp_path / "1.err").read_text(), "the third pipeline to wait")
    gate.touch()
    assert first.wait(timeout=300) == 0, (tmp_path / "0.err").read_text()
    weights = out / "checkpoints" / "rte" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    stdout, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, (tmp_path / "1.err").read_text()
    assert "0 stage(s) ran, 1 up to date" in stdout  # it waited, then redid nothing
    assert weights.stat().st_mtime_ns == written and not (out / ".fmn-pl.lock").exists()


def test_lock_is_reentrant_and_waits(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fmn_pl.files import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(2)", str(tmp_path / "o")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with pytest.raises(OutputBusy, match=f"process {holder.pid} on {socket.gethostname()} since "):
        with output_lock(tmp_path / "o"):
            pass
    with output_lock(tmp_path / "o", wait=True), output_lock(tmp_path / "o"):  # waited; then re-entered
        assert holder.wait() == 0 and json.loads((tmp_path / ".o.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".o.lock").exists()


# ---------------------------------------------------------------------------------------------- temporaries


def record(tmp: Path, **fields: object) -> None:
    Path(f"{tmp}.owner").write_text(json.dumps({**owner(), **fields}))


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_only_provably_dead_temporaries_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def temp(name: str, **fields: object) -> Path:
        p = tmp_path / f".out.tmp-{name}"
        p.mkdir()
        record(p, **fields)
        return p

    gone = temp("1-1", pid=dead_pid())
    reused = temp("2-2", start="1")  # this process's pid, another start time: its maker is gone
    other_host = temp("3-3", host="node-17", pid=dead_pid())  # that pid means nothing here
    other_boot = temp("4-4", boot_id="another-boot", pid=dead_pid())
    other_ns = temp("5-5", pid_ns="pid:[1]", pid=1)
    old = temp("6-6", host="node-17", since=time.time() - 8 * 86400)  # older than the stated age
    unrecorded = tmp_path / ".out.tmp-7-7"  # no record (an older version, or one being made): kept for a week
    unrecorded.mkdir()
    assert set(remove_leftovers(tmp_path / "out")) == {gone, reused, old}
    err = capsys.readouterr().err
    for kept in (other_host, other_boot, other_ns, unrecorded):
        assert kept.is_dir() and f"left {kept}: made by " in err
    assert "made by process" in err and "on node-17 since" in err and "not provably gone" in err
    assert f"removed {old}: left by an interrupted run (made 8.0 days ago)" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".owner")) == sorted(
        f"{p.name}.owner" for p in (other_host, other_boot, other_ns)
    )


LIVE = """
import json, pathlib, sys
from fmn_pl.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("live")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def live_writer(tmp_path: Path, *prefix: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", LIVE, str(tmp_path / "out.json")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_live_temporary_from_another_node_is_never_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc, tmp = live_writer(tmp_path)
    record(tmp, host="node-17", pid=dead_pid())  # what a job on another node would record: its pid is not ours
    write_json(tmp_path / "out.json", {"second": True})  # another writer of the same file
    assert tmp.read_text() == "live" and "not provably gone" in capsys.readouterr().err
    proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and (tmp_path / "out.json").read_text() == "live"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="needs unshare and root")
def test_a_live_temporary_from_another_pid_namespace_is_never_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    proc, tmp = live_writer(tmp_path, "unshare", "--pid", "--fork")
    recorded = json.loads(Path(f"{tmp}.owner").read_text())
    assert recorded["pid_ns"] != owner()["pid_ns"]  # its pid (1 there) names init here: alive, another process
    write_json(tmp_path / "out.json", {"second": True})
    assert tmp.read_text() == "live" and f"left {tmp}" in capsys.readouterr().err
    proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and (tmp_path / "out.json").read_text() == "live"


def test_a_killed_writer_leaves_nothing_the_next_one_keeps(tmp_path: Path) -> None:
    proc, tmp = live_writer(tmp_path)
    proc.kill()
    proc.wait()
    write_json(tmp_path / "out.json", {"second": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ---------------------------------------------------------------------------------------------- modes


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_every_file_gets_the_mode_the_umask_allows(
    umask: int, tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    from fmn_pl.fisher_cli import run_fisher
    from fmn_pl.kinds import FisherConfig
    from fmn_pl.merge import run_merge
    from fmn_pl.merge_config import MergeConfig
    from fmn_pl.merging.average import Average
    from fmn_pl.options import EvalOptions

    cks = [tiny_checkpoint(tiny_base("bert"), t, tmp_path / t, s) for s, t in enumerate(["rte", "mrpc"])]
    run_fisher(FisherConfig(str(cks[0]), data_dir=str(tiny_glue), num_examples=8, trainer={"accelerator": "cpu"}))
    output, glue = str(tmp_path / "merged"), str(tiny_glue)
    run_merge(MergeConfig([str(c) for c in cks], Average(), output, data_dir=glue, eval=EvalOptions(max_samples=8)))
    written = [p for p in tmp_path.rglob("*") if not p.is_symlink()]
    assert {"model.safetensors", "mask_fisher.safetensors", "model-body.safetensors", "report.json"} <= {
        p.name for p in written
    }
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    assert wrong == {}


# ---------------------------------------------------------------------------------------------- writable, space


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`mount(options)`: a tmpfs with those options (root only; skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)])


def test_writability_is_a_real_write(mount: Callable[[str], Path]) -> None:
    ro = mount("ro,size=1m")
    with pytest.raises(ValueError, match=f"cannot write {ro}/out: {ro} is not writable \\(Read-only file system\\)"):
        check_writable(ro / "out")


def test_a_full_disk_names_the_path_and_the_bytes(mount: Callable[[str], Path]) -> None:
    from fmn_pl.tensorfile import save_tensors

    small = mount("size=256k")
    with pytest.raises(DiskFull, match=f"no space left on the device of {small}/big.safetensors: .* bytes free, "):
        save_tensors(small / "big.safetensors", {"w": torch.zeros(1 << 18)})  # 1 MiB: refused before writing
    with pytest.raises(DiskFull, match=f"no space left on the device of {small}/big.json: "):
        write_json(small / "big.json", ["x" * 1000] * 1000)  # a real ENOSPC mid-write
    assert sorted(os.listdir(small)) == []


def test_a_full_disk_mid_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.Path, "write_bytes", full)
    with pytest.raises(DiskFull) as e:
        files.atomic_write(tmp_path / "x.txt", b"data")
    assert str(e.value).startswith(f"no space left on the device of {tmp_path}/x.txt: ") and "\n" not in str(e.value)
