"""A study folder's files cannot lie: merges that never lose a table, file-system errors in one line, a lock that
cannot race, temporary files removed, image size and steps bounded before the first generation."""

import errno
import importlib
import json
import multiprocessing
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnprobe.errors import ConfigError, StoreIOError, StoreError
from attnprobe.study import cli
from attnprobe.study.lock import FolderLock

st = importlib.import_module("attnprobe.study.run")
files = importlib.import_module("attnprobe.study.files")
measure = importlib.import_module("attnprobe.study.measure")

TABLES = ("trajectories.csv", "auc.csv", "summary.csv", "text_similarity.csv", "failures.csv")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(Path(st.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
SMALL = dict(concepts=["dog"], variants="baseline,instruction", steps=2, scorer="none", progress=False, echo=False)


def small(out, seeds=(0,), **kwargs):
    return st.study(out=out, seeds=list(seeds), **{**SMALL, **kwargs})


def outputs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.suffix in (".csv", ".png")}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A folder after one run of one seed: its outputs, to copy."""
    out = tmp_path_factory.mktemp("first") / "out"
    small(out)
    return out


def copy(first, tmp_path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first, out)
    return out


def test_a_full_disk_during_the_merge_keeps_the_previous_tables(first, tmp_path, monkeypatch):
    out = copy(first, tmp_path)
    before = outputs(out)
    real = pathlib.Path.write_bytes

    def full(self, data):
        if self.name.startswith(".summary.csv."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    with pytest.raises(StoreIOError, match=r"summary\.csv' cannot be written: No space left on device; every table") as e:
        small(out, seeds=(0, 1))
    assert isinstance(e.value, StoreError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert outputs(out) == before  # every table and figure of the previous merge, unchanged
    assert not [p for p in out.rglob(".*.tmp")]
    with FolderLock(out):  # released
        pass
    monkeypatch.undo()
    again = small(out, seeds=(0, 1))  # the generation finished before the failed merge is kept
    assert (again.done, again.skipped) == (2, 2) and (out / "auc.csv").read_text().count("\ntiny,dog,") == 4


def test_a_failed_rename_leaves_every_table_whole(first, tmp_path, monkeypatch):
    out = copy(first, tmp_path)
    before = outputs(out)
    real, seen = os.replace, []

    def fails_third(src, dst):
        if Path(dst).name in before:
            seen.append(dst)
            if len(seen) == 3:
                raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fails_third)
    with pytest.raises(StoreIOError, match=r"summary\.csv' cannot be replaced: Read-only file system; every table"):
        small(out, seeds=(0, 1))
    now = outputs(out)
    assert set(now) == set(before) and not [p for p in out.rglob(".*.tmp")]
    assert now["auc.csv"] != before["auc.csv"] and now["summary.csv"] == before["summary.csv"]  # new, old: both whole


# a study that SIGKILLs itself at the merge's N-th rename (N = 0: after writing its first temporary file)
KILLED = """
import os, pathlib, signal, sys
from attnprobe.study import run
n, count, real, merging = int(sys.argv[2]), [0], os.replace, [False]
def replace(src, dst):
    if merging[0]:
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    return real(src, dst)
write = pathlib.Path.write_bytes
def write_bytes(self, data):
    done = write(self, data)
    if merging[0] and n == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return done
merge = run._merge
def _merge(*args, **kwargs):
    merging[0] = True
    return merge(*args, **kwargs)
os.replace, pathlib.Path.write_bytes, run._merge = replace, write_bytes, _merge
run.study(out=sys.argv[1], concepts=["dog"], variants="baseline,instruction", seeds=[0, 1], steps=2, scorer="none",
          progress=False, echo=False)
"""


def test_a_run_killed_during_the_merge_loses_no_table_and_no_generation(first, tmp_path):
    out = copy(first, tmp_path)
    before = outputs(out)
    for n in (0, 4):  # while writing the new files; after 4 of them replaced the old ones
        done = subprocess.run([sys.executable, "-c", KILLED, str(out), str(n)], env=ENV, capture_output=True,
                              timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        now = outputs(out)
        assert set(now) >= set(before)  # no table or figure that existed is lost
        for name in TABLES:
            assert now[name].endswith(b"\n") and now[name].startswith(b"model,")  # each one whole
        entries = json.loads((out / "manifest" / "process-0.json").read_text())["cells"]
        assert sum("seed" in k for k in entries) == 2  # both generations kept
    assert [p.name for p in out.glob(".*.tmp")]  # what the killed merges left…
    again = small(out, seeds=(0, 1))  # …is removed by the next run, which skips both generations
    assert (again.done, again.skipped) == (2, 2) and not list(out.rglob(".*.tmp"))


def test_a_read_only_folder_ends_the_command_in_one_line(first, tmp_path, monkeypatch, capsys):
    out = copy(first, tmp_path)
    before = outputs(out)
    real = pathlib.Path.write_bytes

    def read_only(self, data):
        if out in self.parents:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    code = cli.main(["study", "--model", "tiny", "--out", str(out), "--concepts", "dog", "--variants", "baseline,instruction",
                     "--seeds", "0,1", "--steps", "2", "--scorer", "none", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("attnprobe: error: ") and str(out) in err[0] and "Read-only file system" in err[0]
    assert outputs(out) == before
    with FolderLock(out):  # released
        pass


def test_stale_temporary_files_are_removed_by_the_next_run(first, tmp_path):
    out = copy(first, tmp_path)
    stale = [out / ".auc.csv.999999.tmp", next((out / "cells").rglob("*.safetensors")).with_name(".seed1.x.12.tmp"),
             out / "manifest" / ".process-0.json.7.tmp"]
    mine = [out / "notes" / ".draft.txt.5.tmp", out / ".keep.tmp"]  # not the study's: the folder is shared
    for path in stale + mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("left by a killed run")
    assert small(out).skipped == 1
    assert [p.exists() for p in stale] == [False] * 3 and [p.exists() for p in mine] == [True, True]


def test_files_a_merge_no_longer_writes_go_only_after_the_new_ones_are_in(first, tmp_path):
    out = copy(first, tmp_path)
    (out / "figures" / "old-model").mkdir(parents=True)
    (out / "figures" / "old-model" / "heatmaps.png").write_bytes(b"old")
    (out / "presence.png").write_bytes(b"old")  # no scorer: not written again
    small(out)
    assert not (out / "figures").exists() and not (out / "presence.png").exists()
    assert (out / "heatmaps.png").read_bytes() != b"old"


def _racer(folder, start, clash, trials, index, dead, lock=FolderLock):
    holder = Path(folder) / "holder"
    held = 0
    for _ in range(trials):
        if index == 0:  # each trial starts from a lock file left by a killed run: every racer may take it over
            (Path(folder) / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": "x"}))
        start.wait()
        try:
            with lock(Path(folder)):
                try:  # a second holder would find the file there
                    fd = os.open(holder, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    clash.value += 1
                    continue
                held += 1
                time.sleep(0.002)
                os.close(fd)
                os.unlink(holder)
        except ConfigError:
            pass
    sys.exit(0 if held else 3)


def test_four_processes_racing_for_the_lock_never_hold_it_together(tmp_path):
    context = multiprocessing.get_context("fork")
    trials = 40
    start, clash = context.Barrier(4), context.Value("i", 0)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    racers = [context.Process(target=_racer, args=(str(tmp_path), start, clash, trials, i, dead)) for i in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert clash.value == 0
    assert [r.exitcode for r in racers].count(0) >= 1  # the lock was taken (not refused forever)
    assert not (tmp_path / "holder").exists()


def _hold(folder, ready):
    with FolderLock(Path(folder)):
        ready.set()
        time.sleep(60)


def test_a_holder_killed_with_sigkill_releases_the_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on .*, since "):
            FolderLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.join()
    with FolderLock(tmp_path) as lock:  # free
        assert json.loads((tmp_path / ".lock.holder").read_text())["pid"] == os.getpid() and lock.held


def test_a_lock_file_left_empty_or_by_an_old_version_is_taken(tmp_path):
    for text in ("", json.dumps({"pid": os.getpid(), "host": socket.gethostname()})):
        (tmp_path / ".lock").write_text(text)
        with FolderLock(tmp_path) as lock:
            assert lock.held


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=99999999999999999999), r"steps must be 1 … 1000; got 99999999999999999999: schedulers are trained"),
    (dict(steps=0), r"steps must be 1 … 1000"),
    (dict(steps=2.5), r"steps must be a whole number"),
    (dict(size=100000), r"size 100000 is over 4096 pixels, the largest a study takes: decoding"),
    (dict(size=4104), r"over 4096"),
    (dict(size=30), r"multiple of 8"),
    (dict(steps=float("inf")), r"steps must be a whole number; got inf"),
    (dict(size=float("nan")), r"size must be a whole number of pixels; got nan"),
    (dict(seeds=[float("nan")]), r"seeds must be whole numbers; got \[nan\]"),
    (dict(seeds=["x"]), r"seeds must be whole numbers"),
])
def test_steps_and_size_are_bounded_before_anything_loads(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        small(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_size_is_checked_against_the_loaded_model_before_the_first_generation(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"size 72 is not a multiple of 16, this model's factor .* use 64 or 80"):
        small(tmp_path / "sd3", model="tiny-sd3", size=72)
    monkeypatch.setattr(measure, "_memory", lambda device: 2**30)
    with pytest.raises(ConfigError, match=r"size 4096: decoding a cell's 2 image\(s\) needs about \d+ GiB .* more than "
                                          r"the 1 GiB of cpu"):
        small(tmp_path / "big", size=4096)
    assert not (tmp_path / "sd3").exists() and not (tmp_path / "big").exists()
