"""Studies at scale: config files, resume after a kill, damaged shards, two processes, failing cells."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnprobe import load_config
from attnprobe.study import cli
from attnprobe.study.cells import Manifest, grid

st = importlib.import_module("attnprobe.study.run")
measure = importlib.import_module("attnprobe.study.measure")

TABLES = ("trajectories.csv", "auc.csv", "summary.csv", "text_similarity.csv", "failures.csv")
GRID = """
model = "tiny"
concepts = ["dog", "Van Gogh"]
variants = ["baseline", "instruction"]
seeds = [0, 1]
steps = 2
scorer = "none"
"""
# the same number of threads in every process: CPU matmuls may sum in another order with another thread count
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
BIN = Path(sys.executable).parent


def write_config(folder: Path, text: str = GRID, **extra) -> Path:
    path = folder / "study.toml"
    path.write_text(text + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items()))
    return path


def run(*args, check=True, **kwargs):
    done = subprocess.run([*args], env=ENV, capture_output=True, text=True, timeout=300, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        assert (a / name).read_text() == (b / name).read_text(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted one-process run of the grid (a subprocess with one thread, like each launched process)."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, out=str(folder / "out"))
    run(sys.executable, "-m", "attnprobe", "study", "--config", str(config), "--no-progress")
    return folder / "out"


def test_two_processes_merge_to_the_one_process_outputs(reference, tmp_path):
    config = write_config(tmp_path, out=str(tmp_path / "out"))
    done = run(str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnprobe", "study", "--config", str(config),
               "--no-progress")
    out = tmp_path / "out"
    same_tables(reference, out)
    manifests = sorted(p.name for p in (out / "manifest").iterdir())
    assert manifests == ["process-0.json", "process-1.json"]  # each process wrote its own
    ids = [set(json.loads((out / "manifest" / m).read_text())["cells"]) for m in manifests]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # whole cells, each done once
    assert "[process 1/2]" in done.stderr and "[process 2/2]" in done.stderr
    assert "4 generations done (0 of them skipped" in done.stdout and done.stdout.count("attnprobe study:") == 1


def test_a_killed_run_resumes_to_the_same_outputs(reference, tmp_path):
    config = write_config(tmp_path, out=str(tmp_path / "out"))
    manifest = tmp_path / "out" / "manifest" / "process-0.json"
    proc = subprocess.Popen([sys.executable, "-m", "attnprobe", "study", "--config", str(config), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads(manifest.read_text())["cells"]) >= 2:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = len(json.loads(manifest.read_text())["cells"])
    assert 2 <= finished < 6 and not (tmp_path / "out" / "auc.csv").exists()
    done = run(sys.executable, "-m", "attnprobe", "study", "--config", str(config), "--no-progress")
    assert f"4 generations done ({min(finished, 4)} of them skipped: finished by an earlier run), 0 failed" in done.stdout
    same_tables(reference, tmp_path / "out")


def test_a_truncated_shard_is_redone(reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shard = sorted((out / "cells").rglob("seed1.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for name in TABLES:
        (out / name).unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference's processes
    try:
        result = st.study(**load_config(write_config(tmp_path, out=str(out))), progress=False, echo=False)
    finally:
        torch.set_num_threads(threads)
    assert "redoing model 'tiny', concept" in capsys.readouterr().err
    assert (result.done, result.skipped, result.failed) == (4, 3, 0)
    same_tables(reference, out)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # diffusers, nan images
def test_a_failing_generation_is_logged_with_its_cell_and_the_run_goes_on(tmp_path, monkeypatch):
    real = measure.initial_latents

    def nan_for_seed_1(pipe, seed, *args):
        latents = real(pipe, seed, *args)
        return latents * float("nan") if seed == 1 else latents

    monkeypatch.setattr(measure, "initial_latents", nan_for_seed_1)
    result = st.study(out=tmp_path, concepts=["dog"], variants="baseline", seeds=[0, 1], steps=2, scorer="none",
                      progress=False, echo=False)
    assert (result.done, result.failed) == (1, 1)
    (failure,) = result.failures
    assert (failure["model"], failure["concept"], failure["seed"]) == ("tiny", "dog", 1)
    assert "NumericalError: non-finite attention" in failure["error"]  # a FloatingPointError
    # a failed cell is not finished: the next run tries it again (and succeeds once the cause is gone)
    monkeypatch.setattr(measure, "initial_latents", real)
    again = st.study(out=tmp_path, concepts=["dog"], variants="baseline", seeds=[0, 1], steps=2, scorer="none",
                     progress=False, echo=False)
    assert (again.done, again.skipped, again.failed, again.failures) == (2, 1, 0, [])


@pytest.mark.parametrize("text, match", [
    ("stepz = 3\n", r"unknown key \['stepz'\]; the keys are \[.*'steps'"),
    ("steps = 'ten'\n", "steps = 'ten' is a str; steps takes: integer"),
    ("seeds = [0, 'one']\n", "must hold only integers"),
    ("model = 'tiny'\nmodels = ['tiny']\n", "model or models, not both"),
    ("steps = [\n", "not valid TOML"),
    ("[capture]\nsave = 'yes'\n", "capture save must be true or false"),
    ("[capture]\nkeep = true\n", r"unknown capture settings \['keep'\]"),
    ("size = 30\n", "not a positive multiple of 8"),
    ("seeds = [1, 1]\n", "seeds repeat"),
    ("concepts = ['unicorn horn']\nvariants = ['x=draw it']\n", "has no {c}"),
])
def test_a_bad_config_is_refused_before_any_generation(tmp_path, capsys, text, match):
    config = tmp_path / "bad.toml"
    config.write_text(f"out = {json.dumps(str(tmp_path / 'out'))}\n{text}")
    assert cli.main(["study", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnprobe: error:") and err.count("\n") == 1
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_a_folder_with_other_settings_is_not_resumed_unless_restarted(tmp_path, capsys):
    args = ["study", "--model", "tiny", "--out", str(tmp_path), "--concepts", "dog", "--variants", "baseline", "--seeds", "0",
            "--scorer", "none", "--no-progress"]
    assert cli.main([*args, "--steps", "2"]) == 0
    assert cli.main([*args, "--steps", "3"]) == 2
    assert "holds a study with other settings (steps: 2 there, 3 now)" in capsys.readouterr().err
    assert cli.main([*args, "--steps", "3", "--restart"]) == 0
    assert "1 generation done (0 of them skipped" in capsys.readouterr().out
    assert {r.split(",")[5] for r in (tmp_path / "trajectories.csv").read_text().splitlines()[1:]} == {"0", "1", "2"}


def test_config_values_and_command_line_options_combine(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(st, "study", lambda **kwargs: seen.update(kwargs) or st.StudyResult(out=tmp_path))
    config = write_config(tmp_path, GRID + 'out = "o"\n[interventions]\nearly = "zero-attention:calls=0-1"\n'
                          '[capture]\nsave = false\nheads = "keep"\n')
    cli.main(["study", "--config", str(config), "--steps", "5", "--save-maps", "--model", "tiny,tiny-xl"])
    assert seen["steps"] == 5 and seen["seeds"] == [0, 1] and seen["model"] == ["tiny", "tiny-xl"]
    assert seen["capture"] == {"save": True, "heads": "keep"} and seen["interventions"] == "early=zero-attention:calls=0-1"


def test_saved_maps_and_two_models(tmp_path):
    result = st.study(model=["tiny", "tiny-xl"], out=tmp_path, concepts=["cat"], variants="baseline", seeds=[0],
                      steps=2, scorer="none", capture={"save": True}, progress=False, echo=False)
    assert {r["model"] for r in result.aucs} == {"tiny", "tiny-xl"}
    assert {r["model"] for r in result.summary} == {"tiny", "tiny-xl"}
    assert len(list((tmp_path / "figures").glob("*/trajectories.png"))) == 2
    from attnprobe import AttentionStore, trajectory

    cells = [c for c in grid(["tiny"], ["cat"], [0]) if c.seed is not None]
    store = AttentionStore.load(tmp_path / "maps" / cells[0].id / "variants")
    mass = trajectory(store, "cat", 0).tolist()
    rows = [r["mass"] for r in result.trajectories if r["model"] == "tiny"]
    assert mass == pytest.approx(rows, abs=1e-12)
    assert len(Manifest(tmp_path).finished(grid(["tiny", "tiny-xl"], ["cat"], [0]))) == 4


def small(out, **kwargs):
    args = dict(out=out, concepts=["dog"], variants="baseline", seeds=[0, 1], steps=2, scorer="none", progress=False,
                echo=False)
    return st.study(**{**args, **kwargs})


def test_manifests_that_disagree_damaged_ones_and_foreign_entries(tmp_path, capsys):
    first = small(tmp_path)
    own = tmp_path / "manifest" / "process-0.json"
    cells = json.loads(own.read_text())["cells"]
    seed0, seed1 = (k for k in cells if k.endswith("seed0")), (k for k in cells if k.endswith("seed1"))
    seed0, seed1 = next(seed0), next(seed1)
    # another process's stale entry for a cell that was redone since: the intact entry counts, whichever file it is in
    stale = {**cells[seed1], "sha256": "0" * 64}
    (tmp_path / "manifest" / "process-1.json").write_text(json.dumps({"cells": {seed1: stale}}))
    again = small(tmp_path)
    assert (again.done, again.skipped) == (2, 2) and again.aucs == first.aucs
    # an entry that points at another cell's shard is not trusted: the cell is redone
    cells[seed1] = cells[seed0]
    own.write_text(json.dumps({"cells": cells}))
    (tmp_path / "manifest" / "process-1.json").unlink()
    capsys.readouterr()
    again = small(tmp_path)
    assert "redoing model 'tiny', concept 'dog', seed 1: its manifest entry names another file" in capsys.readouterr().err
    assert [r["seed"] for r in again.aucs] == [0, 1] and again.skipped == 1
    # an unreadable manifest is said, and its cells redone
    own.write_text('{"cells": {')
    again = small(tmp_path)
    assert "ignoring the unreadable manifest" in capsys.readouterr().err and again.skipped == 0
    # a folder with cells but no readable settings is not resumed
    (tmp_path / "study.json").unlink()
    with pytest.raises(ValueError, match="study.json cannot be read"):
        small(tmp_path)


def test_one_run_at_a_time_and_a_lock_left_by_a_killed_run(tmp_path):
    import socket

    from attnprobe.study.lock import FolderLock

    with FolderLock(tmp_path):
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()} on "):
            small(tmp_path, seeds=[0])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp_path.joinpath(".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert small(tmp_path, seeds=[0]).done == 1  # a pid file left by an older attnprobe is taken


def test_a_failed_row_makes_its_cell_redone_and_labels_do_not_collide(tmp_path, monkeypatch):
    from attnprobe.interventions import Intervened

    real, calls = Intervened.__call__, []

    def fail_first(self, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(self, **kwargs)

    monkeypatch.setattr(Intervened, "__call__", fail_first)
    rows = {"x y": "zero-attention", "x-y": "zero-attention-raw"}
    spec = ",".join(f"{k}={v}" for k, v in rows.items())
    first = small(tmp_path, seeds=[0], interventions=spec, capture={"save": True})
    assert (first.partial, first.failed) == (1, 0) and [r["variant"] for r in first.aucs] == ["baseline", "x-y"]
    again = small(tmp_path, seeds=[0], interventions=spec, capture={"save": True})
    assert (again.skipped, again.partial, again.failed, again.failures) == (0, 0, 0, [])
    assert [r["variant"] for r in again.aucs] == ["baseline", "x y", "x-y"]
    assert len(list((tmp_path / "maps").rglob("row-*"))) == 2


def test_restart_and_out_guards(tmp_path):
    notes = tmp_path / "notes"
    (notes / "maps").mkdir(parents=True)
    (notes / "maps" / "mine.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds files but no study"):
        small(notes, seeds=[0], restart=True)
    assert (notes / "maps" / "mine.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="out must name a folder"):
        small("", seeds=[0])
    with pytest.raises(ValueError, match=r"outside 0 … 2\*\*63"):
        small(tmp_path / "o", seeds=[-1])
    with pytest.raises(ValueError, match="variants must be names"):
        small(tmp_path / "o", variants=[1])
    small(tmp_path / "o", seeds=[0])
    with pytest.raises(ValueError, match=r"variants.instruction: '\(none\)' there, 'Please forget"):
        small(tmp_path / "o", seeds=[0], variants="baseline,instruction")
