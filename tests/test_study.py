"""The main job, end to end on the tiny pipeline, and the CLI."""

import csv
import importlib
import math
import re

import pytest
import torch

from attnprobe import AttentionEdit, ConceptError, InterventionError
from attnprobe.study import cli
from attnprobe.study import DEFAULT_CONCEPTS, DEFAULT_VARIANTS, parse_variants, study


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return study(out=out, concepts=["dog", "Van Gogh"], seeds=[0, 1], steps=4, progress=False, echo=False)


def test_study_writes_every_output(result):
    names = {p.name for p in result.files}
    assert names == {"trajectories.csv", "auc.csv", "summary.csv", "failures.csv", "trajectories.png",
                     "delta_auc.png", "heatmaps.png", "text_similarity.csv", "text_similarity.png", "presence.png",
                     "contrasts.csv", "contrasts.png", "where_when.csv", "where_when.png", "report.html"}
    for p in result.files:
        assert p.stat().st_size > 0
        assert p.parent == result.out
    assert not list(result.out.glob(".*tmp"))  # atomic writes leave no temporary files


def test_tidy_tables_cover_the_grid(result):
    traj = read(result.out / "trajectories.csv")
    # 2 concepts × 4 variants × 2 seeds × 4 calls (DDIM: one call per step)
    assert len(traj) == 2 * 4 * 2 * 4
    assert {r["variant"] for r in traj} == set(DEFAULT_VARIANTS)
    for r in traj:
        assert 0.0 <= float(r["mass_last"]) <= float(r["mass"]) <= 1.0
    aucs = read(result.out / "auc.csv")
    assert len(aucs) == 2 * 4 * 2
    for r in aucs:
        assert int(r["mentions"]) == (1 if r["variant"] == "baseline" else 2)
        if r["variant"] == "baseline":
            assert float(r["delta_auc"]) == 0.0
    summary = read(result.out / "summary.csv")
    assert len(summary) == 2 * 4
    row = next(r for r in summary if r["concept"] == "dog" and r["variant"] == "instruction")
    assert float(row["ci_low"]) <= float(row["delta_auc"]) <= float(row["ci_high"])
    assert read(result.out / "failures.csv") == []
    text = read(result.out / "text_similarity.csv")
    cond = {(r["concept"], r["variant"]): r for r in text if r["encoder"] == "conditioning"}
    assert len(cond) == 2 * 4 and float(cond[("dog", "baseline")]["concept_cos"]) == pytest.approx(1.0)
    assert float(cond[("dog", "repetition")]["delta_vs_repetition"]) == 0.0
    assert {"text_concept_cos_last", "text_delta_last_vs_repetition", "text_concept_cos"} <= set(summary[0])


def test_delta_auc_is_variant_minus_baseline_of_the_same_seed(result):
    aucs = {(r["concept"], r["variant"], r["seed"]): r for r in result.aucs}
    for (concept, variant, seed), r in aucs.items():
        base = aucs[(concept, "baseline", seed)]
        assert math.isclose(r["delta_auc"], r["auc"] - base["auc"], abs_tol=1e-12)


def test_a_failing_cell_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    st = importlib.import_module("attnprobe.study.measure")

    real = st.measure_cell

    def nan_latents_for_dog(pipe, concept, *args, **kwargs):
        if concept == "dog":
            raise RuntimeError("nan latents")
        return real(pipe, concept, *args, **kwargs)

    monkeypatch.setattr(st, "measure_cell", nan_latents_for_dog)
    res = study(out=tmp_path, concepts=["dog", "cat"], seeds=[0], steps=2, progress=False, echo=False)
    assert [(f["concept"], f["seed"]) for f in res.failures] == [("dog", 0)]
    assert "RuntimeError: nan latents" in res.failures[0]["error"]
    assert {r["concept"] for r in res.aucs} == {"cat"}
    assert "dog" in (tmp_path / "failures.csv").read_text() and (tmp_path / "summary.csv").exists()


def test_a_truncated_concept_is_refused_before_generating(tmp_path):
    long_concept = " ".join(["word"] * 80) + " dog"
    with pytest.raises(ValueError, match="past the tokenizer's maximum length"):
        study(out=tmp_path, concepts=[long_concept, "cat"], seeds=[0], steps=2, progress=False, echo=False)


def test_variants_parse_names_and_templates():
    assert list(parse_variants("instruction")) == ["baseline", "instruction"]
    v = parse_variants("baseline,mine=Draw {c} twice: {c}")
    assert v["mine"] == "Draw {c} twice: {c}"
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        parse_variants("nope")
    with pytest.raises(ValueError, match="has no"):
        parse_variants("x=no concept here")
    assert len(DEFAULT_CONCEPTS) == 10


def test_cli_runs_the_main_job(tmp_path, capsys):
    code = cli.main(["study", "--model", "tiny", "--out", str(tmp_path), "--concepts", "cat", "--variants", "instruction",
                     "--seeds", "3", "--steps", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "instruction" in printed and "1 generation done (0 of them skipped: finished by an earlier run), 0 failed" in printed
    assert (tmp_path / "delta_auc.png").exists()


def test_cli_offline_model_fails_in_one_line(tmp_path, capsys):
    code = cli.main(["study", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnprobe: error: could not load model") and "\n" not in err
    assert "Traceback" not in err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["study", "--seeds", "a,b"])
    assert "seeds must be integers" in capsys.readouterr().err
    assert cli.main(["study", "--model", "tiny", "--variants", "bogus", "--out", "/tmp/attnprobe-never"]) == 2


def test_cli_lists_sites(capsys):
    assert cli.main(["sites", "--model", "tiny"]) == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if not line.startswith("#")]
    assert len(lines) == 16 and lines[0].startswith("down_blocks.0.attentions.0.transformer_blocks.0.attn2")


def test_attnprobe_study_stays_the_function_after_its_module_is_imported(tmp_path):
    import attnprobe
    from attnprobe.study import load_pipeline  # noqa: F401  (imports the submodule of the same name)

    assert callable(attnprobe.study)
    for i in range(2):
        attnprobe.study(out=tmp_path / str(i), concepts=["cat"], variants="baseline", seeds=[0], steps=1,
                        progress=False, echo=False)


# ------------------------------------------------------------------ interventions and presence
@pytest.fixture(scope="module")
def with_interventions(tmp_path_factory):
    out = tmp_path_factory.mktemp("interventions")
    return study(out=out, concepts=["dog"], variants="instruction", seeds=[0, 1], steps=2, progress=False, echo=False,
                 interventions="zero-attention,negative-prompt,sld,early=zero-attention-raw:calls=0-0")


def test_intervention_rows_sit_beside_the_variants(with_interventions):
    out = with_interventions.out
    aucs = {(r["variant"], r["seed"]): r for r in read(out / "auc.csv")}
    rows = ["baseline", "instruction", "zero-attention", "negative-prompt", "sld", "early"]
    assert {v for v, _ in aucs} == set(rows)
    for seed in ("0", "1"):
        zero, base = aucs[("zero-attention", seed)], aucs[("baseline", seed)]
        assert float(zero["auc_last"]) == 0.0 and zero["intervention"] == "AttentionEdit(scale=0.0)"
        assert float(zero["delta_auc_last"]) == pytest.approx(-float(base["auc_last"]), abs=1e-6)
        assert base["intervention"] == "" and float(base["delta_presence"]) == 0.0
        assert aucs[("early", seed)]["intervention"] == "AttentionEdit(scale=0.0, renormalize=False, calls=(0, 0))"
        assert aucs[("negative-prompt", seed)]["prompt"] == base["prompt"] == "a picture of dog"
        for r in (aucs[(v, seed)] for v in rows):
            assert 0.0 <= float(r["presence"]) <= 2.5 and float(r["clip_accuracy"]) in (0.0, 1.0)
    traj = [r for r in read(out / "trajectories.csv") if r["variant"] == "early"]
    assert [float(r["mass_last"]) == 0.0 for r in traj] == [True, False, True, False]  # call 0 of each seed
    summary = {r["variant"]: r for r in read(out / "summary.csv")}
    assert set(summary) == set(rows) and summary["sld"]["intervention"] == "SafeLatentDiffusion()"
    assert {"presence", "delta_presence", "ci_low_presence", "clip_accuracy"} <= set(summary["sld"])
    assert (out / "presence.png").stat().st_size > 0


def test_cli_interventions_without_a_scorer(tmp_path, capsys):
    code = cli.main(["study", "--model", "tiny", "--out", str(tmp_path), "--concepts", "cat", "--variants", "baseline", "--seeds", "0",
                     "--steps", "2", "--no-progress", "--interventions", "both=pad-conditioning+negative-prompt",
                     "--scorer", "none"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "both " in printed and "Δ presence" in printed
    assert not (tmp_path / "presence.png").exists()
    assert {r["presence"] for r in read(tmp_path / "auc.csv")} == {"nan"}


@pytest.mark.parametrize("interventions, error, match", [
    ("zero", InterventionError, "unknown intervention 'zero'"),
    ("zero-attention:calls=5-6", InterventionError, "make 2 denoiser calls, 0-1"),
    ({"cat": AttentionEdit(0.0, concept="cat")}, ConceptError, "concept 'cat' is not in the prompt"),
    ("instruction=zero-attention", ValueError, "have the names of variants"),
])
def test_bad_interventions_fail_before_generating(tmp_path, interventions, error, match):
    with pytest.raises(error, match=match):
        study(out=tmp_path, concepts=["dog"], variants="instruction", seeds=[0], steps=2, progress=False,
              echo=False, interventions=interventions)
    assert not (tmp_path / "auc.csv").exists()


def test_a_failing_intervention_row_is_recorded_and_the_cell_kept(tmp_path, monkeypatch):
    from attnprobe.interventions import Intervened

    real = Intervened.__call__

    def nan_for_halves(self, **kwargs):
        if self.interventions[0].scale == 0.5:
            raise RuntimeError("nan latents")
        return real(self, **kwargs)

    monkeypatch.setattr(Intervened, "__call__", nan_for_halves)
    res = study(out=tmp_path, concepts=["dog"], variants="baseline", seeds=[0], steps=2, progress=False, echo=False,
                scorer="none", interventions={"half": AttentionEdit(0.5), "zero": AttentionEdit(0.0)})
    assert [r["variant"] for r in res.aucs] == ["baseline", "zero"]
    assert [(f["seed"], f["error"]) for f in res.failures] == [(0, "row half: RuntimeError: nan latents")]


def test_cli_unloadable_scorer_fails_in_one_line_before_generating(tmp_path, capsys):
    code = cli.main(["study", "--model", "tiny", "--scorer", str(tmp_path / "no-clip"), "--out", str(tmp_path / "o"), "--concepts", "cat"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("attnprobe: error: could not load scorer") and "\n" not in err
    assert not (tmp_path / "o" / "auc.csv").exists()


def test_presence_interval_stays_in_the_scores_range():
    """A t-interval of three 0/1 differences runs past ±1; clipped to the scorer's range, it stays inside it."""
    from attnprobe.study.report import summarize

    rows = [dict(model="m", concept="c", variant="v", intervention="", auc_last=0.5, auc=0.5, delta_auc=0.0,
                 delta_auc_last=0.0, presence=p, delta_presence=d, clip_accuracy=0.0, delta_clip_accuracy=0.0)
            for p, d in ((0.0, -1.0), (1.0, 0.0), (1.0, 0.0))]
    free = summarize(rows, [], ["m"], ["c"], ["v"])[0]
    assert free["ci_low_presence"] < -1 and free["ci_high_presence"] > 1  # unclipped: −1/3 ± 1.43 (t(2) = 4.30)
    clipped = summarize(rows, [], ["m"], ["c"], ["v"], presence_range=(0.0, 1.0))[0]
    assert clipped["delta_presence"] == pytest.approx(-1 / 3)
    assert (clipped["ci_low_presence"], clipped["ci_high_presence"]) == (-1.0, 1.0)


def test_a_cell_warning_is_printed_once_per_study(tmp_path, capsys):
    """A template whose own words contain the concept is warned about once, not once per seed."""
    study("tiny", out=tmp_path / "s", concepts=["dog"], variants=["baseline=a dog and a {c}"], seeds=[0, 1],
          steps=2, progress=False, echo=False, scorer="none")
    assert capsys.readouterr().err.count("'dog' occurs 2 times") == 1


class _Scorer:
    name = "mine"

    def __init__(self, values=None, score_range=None, fail=False, accuracy=None):
        self.values, self.score_range, self.fail, self.accuracy = values, score_range, fail, accuracy

    def score(self, images, concept):
        if self.fail:
            raise RuntimeError("the scorer broke")
        return torch.tensor(self.values if self.values is not None else [0.5] * len(images))


@pytest.mark.parametrize("score_range", [(1.0, 0.0), 1.0, "0,1", "01", (0.0, float("nan")), (True, 2)])
def test_a_bad_score_range_stops_the_study_before_generating(tmp_path, score_range):
    with pytest.raises(ValueError, match=r"scorer 'mine' has score_range=.*low < high"):
        study("tiny", out=tmp_path / "s", concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False,
              scorer=_Scorer(score_range=score_range))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("scorer, message", [
    (_Scorer(values=[0.5]), r"presence: ScorerError: scorer 'mine': score\(\) returned shape \[1\] for 4 images"),
    (_Scorer(values=[0.5, 5.0, 0.1, 0.2], score_range=(0.0, 1.0)), r"returned 5, outside its range \[0, 1\]"),
    (_Scorer(fail=True), r"presence: RuntimeError: the scorer broke"),
    (_Scorer(values=[0.5, float("inf"), 0.1, 0.2]), r"returned an infinite value"),
])
def test_a_failing_scorer_keeps_the_attention_measured(tmp_path, scorer, message):
    """What the scorer returns is checked; when it fails, the cell's attention rows stay, with NaN presence."""
    result = study("tiny", out=tmp_path / "s", concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False,
                   scorer=scorer)
    assert {r["variant"] for r in result.aucs} == set(DEFAULT_VARIANTS)
    assert all(math.isnan(r["presence"]) for r in result.aucs)
    assert len(result.failures) == 1 and re.search(message, result.failures[0]["error"])
    assert (result.done, result.partial, result.failed) == (1, 1, 0)  # done, with a failed part


@pytest.mark.parametrize("spec, message", [
    ("=a {c}", "variant name ''"),
    ("x=a {c},x=b {c}", "'x' is given 2 times"),
    ("instruction,my variant=a {c}", "variant name 'instruction,my variant'"),
])
def test_variant_names_are_checked(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_variants(spec)
    assert list(parse_variants("instruction,über=ein {c}")) == ["baseline", "instruction", "über"]
    assert list(parse_variants("instruction,implicit,")) == ["baseline", "instruction", "implicit"]


def test_a_failing_accuracy_loses_only_itself_and_a_tensor_range_is_read_as_floats(tmp_path):
    bad = _Scorer(score_range=torch.tensor([0.0, 1.0]), accuracy=lambda images, concept: [2.0] * len(images))
    result = study("tiny", out=tmp_path / "s", concepts=["dog"], seeds=[0, 1], steps=2, progress=False, echo=False,
                   scorer=bad)
    assert all(r["presence"] == 0.5 for r in result.aucs) and all(math.isnan(r["clip_accuracy"]) for r in result.aucs)
    assert {f["error"].split(":")[0] for f in result.failures} == {"row accuracy"}
    assert all(type(r["ci_low_presence"]) is float for r in result.summary)
    none = study("tiny", out=tmp_path / "n", concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False,
                 scorer=_Scorer())  # accuracy = None: no accuracy, no failure
    assert not none.failures and all(r["presence"] == 0.5 for r in none.aucs)


def test_a_study_of_the_baseline_alone_is_warned_about(tmp_path, capsys):
    study("tiny", out=tmp_path / "s", concepts=["dog"], variants="baseline", seeds=[0], steps=2, progress=False,
          echo=False, scorer="none")
    assert "only the baseline variant: every Δ is against itself" in capsys.readouterr().err


def test_contrasts_are_paired_by_seed_with_exact_sign_flip_and_holm(result):
    """contrasts.csv: per concept, row − reference of the same seed on Δ AUC of the requested mention and Δ
    presence; the exact sign-flip p equals scipy's exact permutation test of the paired samples; Holm across
    concepts."""
    from scipy.stats import permutation_test

    aucs = {(r["concept"], r["variant"], r["seed"]): r for r in read(result.out / "auc.csv")}
    rows = read(result.out / "contrasts.csv")
    pairs = {(r["variant"], r["reference"]) for r in rows}
    assert pairs == {("instruction", "repetition"), ("implicit", "repetition"), ("instruction", "implicit")}
    for r in rows:
        d = [float(aucs[r["concept"], r["variant"], s][r["measure"]]) - float(aucs[r["concept"], r["reference"], s][
            r["measure"]]) for s in ("0", "1")]
        assert int(r["n"]) == 2 and float(r["mean"]) == pytest.approx(sum(d) / 2, abs=1e-6)
        assert r["test"] == "sign-flip exact"
        exact = permutation_test((d,), lambda x: abs(x.mean()), permutation_type="samples", n_resamples=10_000,
                                 alternative="greater").pvalue
        assert float(r["p_value"]) == pytest.approx(exact)
    for key in {(r["measure"], r["variant"], r["reference"]) for r in rows}:
        group = sorted(float(r["p_value"]) for r in rows if (r["measure"], r["variant"], r["reference"]) == key)
        adjusted = sorted(float(r["p_holm"]) for r in rows if (r["measure"], r["variant"], r["reference"]) == key)
        assert adjusted == pytest.approx([min(1.0, max((len(group) - k) * p for k, p in enumerate(group[:i + 1])))
                                          for i in range(len(group))])


def test_where_when_averages_over_sites_to_the_trajectory_delta(result):
    """where_when.csv: Δ attention on the requested mention per site and call; its mean over sites is the Δ of the
    site-mean trajectory (trajectories.csv, row − baseline of the same seed, mean over seeds)."""
    where = read(result.out / "where_when.csv")
    traj = {(r["concept"], r["variant"], r["seed"], r["call"]): float(r["mass_last"])
            for r in read(result.out / "trajectories.csv")}
    sites = sorted({(int(r["site_order"]), r["site"]) for r in where})
    assert [s[0] for s in sites] == list(range(len(sites))) == list(range(16))
    for concept, variant, call in {(r["concept"], r["variant"], r["call"]) for r in where}:
        cells = [float(r["mean"]) for r in where if (r["concept"], r["variant"], r["call"]) == (concept, variant, call)]
        expected = sum(traj[concept, variant, s, call] - traj[concept, "baseline", s, call] for s in ("0", "1")) / 2
        assert sum(cells) / len(cells) == pytest.approx(expected, abs=1e-6)


def test_the_printed_summary_leads_with_the_paired_answer(tmp_path, capsys):
    assert cli.main(["study", "--model", "tiny", "--out", str(tmp_path), "--concepts", "dog", "--seeds", "0,1", "--steps", "2",
                     "--scorer", "none", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "tiny: random weights" in out[1] and out[2].startswith("The answer, paired by seed")
    assert out[3].startswith("  Verdict: no evidence that the instruction lowers attention") or "Verdict: the" in out[3]
    assert "instruction − repetition" in out[4] and any("cannot go below" in line for line in out[:10])


def test_the_cli_default_is_the_shapes_model_with_seeds_its_exact_test_needs():
    """Without --model the CLI runs the shapes model, with 8 seeds: the exact test's smallest p, 2/2^8, times Holm's
    3 concepts is under 0.05 (with 3 seeds it is 0.75); tiny keeps the API's 3 seeds."""
    args = cli.build_parser().parse_args(["study"])
    kwargs = cli._study_arguments(args)
    assert kwargs["model"] == "shapes" and kwargs["seeds"] == list(range(8)) and 3 * 2 / 2 ** 8 < 0.05
    tiny = cli._study_arguments(cli.build_parser().parse_args(["study", "--model", "tiny"]))
    assert "seeds" not in tiny and cli._study_arguments(
        cli.build_parser().parse_args(["study", "--seeds", "0,1"]))["seeds"] == [0, 1]
