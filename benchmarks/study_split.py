"""Where a study's time goes: generating (the pipeline calls, probe included) against the study's own work beyond
them (the text-encoder analysis, the scorer, each cell's measures and files, the merge: tables, figures and the
page), on the shapes model (CPU, no downloads).

    .venv/bin/python benchmarks/study_split.py              # make study's grid: 3 concepts × 8 seeds
    .venv/bin/python benchmarks/study_split.py --seeds 3

It runs ``attnprobe study`` in this process with timers around the study's own functions (nothing in the library
is changed) and prints one line per part, in seconds and as a share of the generation time. The issue's target:
the study's own work ≤ 10% of its generation time. Loading the model is listed apart (it is neither).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

spent: dict[str, float] = defaultdict(float)


def timed(owner, name: str, part: str, wrap_result=None):
    """Replace ``owner.name`` by a timed version adding its wall time to ``spent[part]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            out = inner(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - t0
        return wrap_result(out) if wrap_result else out

    setattr(owner, name, run)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--json", help="also write the split to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from attnprobe.study import cells, measure, run
    from attnprobe.study.cli import main as cli

    def time_generation(pipe):  # the pipeline calls of every cell, probe included
        cls = type(pipe)
        if not getattr(cls.__call__, "_timed", False):
            timed(cls, "__call__", "generation")
            cls.__call__._timed = True
        return pipe

    timed(run, "_ready_pipeline", "load", wrap_result=time_generation)
    timed(measure, "presence_scores", "scorer")
    timed(run, "_run_cell", "cells")
    timed(run, "write_cell", "cell files")
    timed(cells.Manifest, "record", "cell files")
    for name, part in (("collect", "merge: read the cells"), ("summarize", "merge: summary and tests"),
                       ("contrast_rows", "merge: summary and tests"), ("where_when_rows", "merge: summary and tests"),
                       ("write_tables", "merge: tables"), ("write_figures", "merge: figures"),
                       ("write_page", "merge: report.html")):
        timed(run, name, part)
    timed(run, "similarity_rows", "text-encoder analysis")

    out = tempfile.mkdtemp(prefix="study-split-")
    t0 = time.perf_counter()
    cli(["study", "--out", out, "--seeds", ",".join(map(str, range(args.seeds)))])
    total = time.perf_counter() - t0
    generation = spent["generation"]
    measures = spent["cells"] - generation - spent["scorer"] - spent["text-encoder analysis"]
    parts = {
        "text-encoder analysis": spent["text-encoder analysis"],
        "scorer": spent["scorer"],
        "cell measures (trajectories, heat maps, browser maps)": measures,
        "cell files": spent["cell files"],
        **{k: v for k, v in spent.items() if k.startswith("merge:")},
    }
    own = sum(parts.values())
    other = total - generation - spent["load"] - own
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); shapes model, 3 concepts × {args.seeds} "
          f"seeds; wall {total:.2f} s")
    print(f"  {'generation (pipeline calls, probe included)':55s} {generation:7.2f} s")
    print(f"  {'loading the model (apart)':55s} {spent['load']:7.2f} s")
    for k, v in parts.items():
        print(f"  {k:55s} {v:7.2f} s  {v / generation:6.1%}")
    print(f"  {'the rest (start-up, checks, console)':55s} {other:7.2f} s  {other / generation:6.1%}")
    print(f"  {'the study own work beyond generating':55s} {own:7.2f} s  {own / generation:6.1%}  (target ≤ 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"generation": generation, "load": spent["load"], "parts": parts, "other": other,
                       "own": own, "share": own / generation, "wall": total}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
