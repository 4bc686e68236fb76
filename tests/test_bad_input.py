"""Bad input and failure paths found by trying to break attnprobe: clear errors, nothing silently wrong or lost."""

import importlib

import pytest
import torch

import attnprobe
from attnprobe import NoSitesError, ProbeError, StoreError, UnknownSiteError, list_sites, probe
from attnprobe.study import parse_variants, study
from attnprobe.testing import clip_tokenizer, tiny_sd_pipeline
from attnprobe.text.tokens import token_layout

KW = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def gen(pipe, prompt="a dog", seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kw})


def test_probing_the_bare_denoiser_still_labels_the_guidance_passes(pipe):
    with probe(pipe.unet, sites=MID, passes="all") as store:
        gen(pipe)
    assert [(s.pass_label, s.row) for s in store.samples] == [("uncond", 0), ("cond", 1)]
    assert store.samples[1].text == "a dog"


def test_an_error_inside_the_block_leaves_whole_calls_that_save_and_load(pipe, tmp_path):
    calls = []

    def boom(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2 * 16 + 5:  # in the middle of the third denoiser call
            raise RuntimeError("boom")

    handles = [m.register_forward_pre_hook(boom, with_kwargs=True) for m in pipe.unet.modules()
               if type(m).__name__ == "Attention" and m.is_cross_attention]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with probe(pipe) as store:
                gen(pipe, num_inference_steps=4)
    finally:
        for h in handles:
            h.remove()
    assert len(store.calls) == 2 and {store[n].shape[0] for n in store} == {2}
    assert store.meta["complete"] is False
    back = attnprobe.AttentionStore.load(store.save(tmp_path / "partial.safetensors"))
    assert len(back.calls) == 2 and attnprobe.trajectory(back, "dog").shape == (2,)
    with pytest.raises(KeyboardInterrupt):  # stopped before the first denoiser call: the store says why it is empty
        with probe(pipe) as empty:
            raise KeyboardInterrupt
    with pytest.raises(attnprobe.SelectionError, match="holds no samples, because no denoiser call was recorded"):
        attnprobe.trajectory(empty, "dog")


def test_text_encoder_calls_outside_the_pipeline_call_are_ignored(pipe):
    from attnprobe.text import encode_text

    with probe(pipe, sites=MID) as store:
        encode_text(pipe, "dog in a picture")
        pipe.encode_prompt("a cat", "cpu", 1, True)
        gen(pipe, "a picture of dog")
    assert store.samples[0].text == "a picture of dog" and store.token_indices(0, "dog") == [[4]]


def test_ids_decode_to_text():
    from attnprobe.text.tokens import decode_ids

    tok = clip_tokenizer()
    assert decode_ids(tok, tok("a picture of Dog, café!").input_ids) == "a picture of dog , café !"


def test_literal_exclamation_marks_are_words_where_they_also_pad():
    layout = token_layout(clip_tokenizer("!"), "Stop! a picture of dog", 77)
    assert layout.kinds[:8] == ["start", "word", "word", "word", "word", "word", "word", "end"]
    assert layout.kinds[8:] == ["pad"] * 69
    assert attnprobe.text.tokens.find_concept(layout, "dog") == [[6]]


def test_prompts_that_do_not_fit_are_refused(pipe):
    cond, uncond = pipe.encode_prompt(["a dog", "a cat"], "cpu", 1, True)
    with pytest.raises(ProbeError, match="gave 3 texts"):
        with probe(pipe, prompts=["a", "b", "c"]):
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **KW)
    with pytest.raises(ProbeError, match="the text encoder saw 'a dog'"):
        with probe(pipe, prompts=["a cat"]):
            gen(pipe, "a dog")


def test_site_selectors(pipe):
    sites = list_sites(pipe)
    with pytest.raises(NoSitesError, match="empty"):
        with probe(pipe, sites=[]):
            pass
    with pytest.raises(UnknownSiteError, match="is not a name, glob"):
        with probe(pipe, sites=123):
            pass
    with probe(pipe, sites=sites[:2]) as store:
        gen(pipe)
    assert store.site_names == [s.name for s in sites[:2]]
    with pytest.raises(UnknownSiteError) as info:
        store["nope"]
    assert "\\n" not in str(info.value) and "nope" in str(info.value)


def test_another_image_size_in_the_same_probe_is_refused_at_once(pipe):
    with pytest.raises(ProbeError, match="image sizes"):
        with probe(pipe, sites=MID) as store:
            gen(pipe)
            gen(pipe, height=128)
    assert [c.generation for c in store.calls] == [0, 0] and store[MID].shape[0] == 2


def test_compare_refuses_other_timesteps():
    ddim, heun = tiny_sd_pipeline(), tiny_sd_pipeline(scheduler="heun")
    with probe(ddim, sites=MID) as a:
        gen(ddim, num_inference_steps=5)
    with probe(heun, sites=MID) as b:
        gen(heun, num_inference_steps=3)
    assert len(a.calls) == len(b.calls) == 5
    with pytest.raises(StoreError, match="timesteps differ"):
        attnprobe.compare(a, b, "dog")


def test_analysis_argument_errors(pipe):
    with probe(pipe, sites=MID) as store:
        gen(pipe)
    with pytest.raises(IndexError, match="calls 0..1"):
        attnprobe.heatmap(store, "dog", calls=[])
    with pytest.raises(IndexError):
        attnprobe.heatmap(store, "dog", calls=10)
    with pytest.raises(ValueError, match="size"):
        attnprobe.heatmap(store, "dog", size=(0, 0))
    with pytest.raises(ValueError, match=r"size=64.0 is not a positive int"):
        attnprobe.heatmap(store, "dog", size=64.0)
    with pytest.raises(TypeError, match=r"call positions must be an int, a slice or a list of ints; got 1.0"):
        attnprobe.heatmap(store, "dog", calls=1.0)
    with pytest.raises(TypeError, match=r"call positions must be ints; got \[True\]"):
        attnprobe.heatmap(store, "dog", calls=[True])
    with pytest.raises(ValueError, match="at most 16384"):
        attnprobe.heatmap(store, "dog", size=(1, 10**9))
    import numpy as np  # numpy integers are indices like ints
    assert attnprobe.heatmap(store, "dog", size=np.int64(8), calls=[np.int64(0)], sample=np.int64(0),
                             occurrence=np.int64(0)).shape == (8, 8)
    assert torch.equal(attnprobe.heatmap(store, "dog", sample=-1), attnprobe.heatmap(store, "dog", sample=0))
    with pytest.raises(ValueError, match="normalize='yes'"):
        attnprobe.heatmap(store, "dog", normalize="yes")
    assert attnprobe.heatmap(store, "dog", size=16).shape == (16, 16)
    with pytest.raises(ValueError, match="trajectory"):
        attnprobe.auc(0.5)
    with pytest.raises(TypeError, match="not a store"):
        attnprobe.auc(store)
    with pytest.raises(attnprobe.ConceptError, match="str"):
        store.token_indices(0, None)
    with pytest.raises(StoreError, match="is a folder"):
        store.save(pipe and __import__("tempfile").mkdtemp())


def test_token_strings_are_readable_text():
    layout = token_layout(clip_tokenizer(), "a café 🐶")
    assert layout.strings[:4] == ["<|startoftext|>", "a", "café", "🐶"]


def test_study_refuses_a_bad_grid_before_generating(tmp_path):
    with pytest.raises(ValueError, match="seeds repeat"):
        study(out=tmp_path, concepts=["dog"], seeds=[0, 0], progress=False, echo=False)
    with pytest.raises(ValueError, match=r"concepts repeat \['dog'\]: each must be given once \(a repeated concept"):
        study(out=tmp_path, concepts=["dog", "cat", "dog"], seeds=[0], progress=False, echo=False)
    with pytest.raises(ValueError, match=r"concepts repeat \['garbage truck'\] \(spaces aside\)"):  # as a study file gives them
        study(out=tmp_path, concepts=["garbage truck", "garbage  truck "], seeds=[0], progress=False, echo=False)
    for hidden in ("hot\ndog", "dog\u200b"):  # it would run, with a line break in its prompts or an invisible twin
        with pytest.raises(ValueError, match="holds a line break, tab or invisible character"):
            study(out=tmp_path, concepts=[hidden], seeds=[0], progress=False, echo=False)
    with pytest.raises(ValueError, match="concepts 'red circle' and 'Red Circle' are the same tokens for this model's "
                                         r"tokenizer \(CLIP's lowercases\)"):
        study(out=tmp_path, concepts=["red circle", "Red Circle"], seeds=[0], progress=False, echo=False)
    with pytest.raises(ValueError, match="braces"):
        parse_variants("mine=a {c} {x}")
    with pytest.raises(ValueError, match="multiple of 8"):
        study(out=tmp_path, concepts=["dog"], seeds=[0], size=30, progress=False, echo=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        study(out=tmp_path, concepts=["dog"], seeds=[0], size=0, progress=False, echo=False)
    with pytest.raises(ValueError, match="guidance"):
        study(out=tmp_path, concepts=["dog"], seeds=[0], guidance=float("nan"), progress=False, echo=False)
    with pytest.raises(ValueError, match="not a torch device"):
        study(out=tmp_path, concepts=["dog"], seeds=[0], device="nope", progress=False, echo=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        study(out=afile, concepts=["dog"], seeds=[0], progress=False, echo=False)
    with pytest.raises(ValueError, match="cannot be made a folder"):
        study(out=afile / "sub", concepts=["dog"], seeds=[0], progress=False, echo=False)
    with pytest.raises(ValueError, match="is not in it as whole words"):
        study(out=tmp_path, concepts=["dog"], seeds=[0], variants="plural=many {c}s", progress=False, echo=False)


def test_an_interrupted_study_keeps_what_it_measured_and_old_outputs_go(tmp_path, monkeypatch, capsys):
    st = importlib.import_module("attnprobe.study.measure")

    (tmp_path / "heatmaps.png").write_bytes(b"stale")
    real, seen = st.measure_cell, []

    def stop_on_second(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "measure_cell", stop_on_second)
    with pytest.raises(KeyboardInterrupt):
        study(out=tmp_path, concepts=["dog", "cat"], seeds=[0], steps=2, progress=False, echo=False)
    assert (tmp_path / "auc.csv").read_text().count("\ntiny,dog,") == 4  # the first generation's 4 variants
    assert (tmp_path / "heatmaps.png").read_bytes() != b"stale"
    assert "attnprobe study: interrupted; what finished is kept" in capsys.readouterr().err  # Ctrl-C: no reason given


def test_a_store_that_saw_no_call_saves_and_loads(pipe, tmp_path):
    with pytest.raises(RuntimeError):
        with probe(pipe, sites=MID) as store:
            raise RuntimeError("before any call")
    back = attnprobe.AttentionStore.load(store.save(tmp_path / "empty.safetensors"))
    assert back.calls == [] and back.meta["complete"] is False


def test_a_study_that_cannot_start_leaves_its_folder_alone(tmp_path):
    """A model that cannot load must not delete an earlier run's outputs, nor create an empty folder."""
    from attnprobe.errors import ModelLoadError

    study_fn = importlib.import_module("attnprobe.study").study
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.csv").write_text("earlier results")
    for out in (tmp_path / "old", tmp_path / "new"):
        with pytest.raises(ModelLoadError):
            study_fn(model=str(tmp_path / "no_such_model"), out=out, concepts=["dog"], seeds=[0], steps=2,
                     progress=False, echo=False)
    assert (tmp_path / "old" / "summary.csv").read_text() == "earlier results"
    assert not (tmp_path / "new").exists()


def test_sigterm_stops_the_study_cli_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """SIGTERM (SLURM's, docker's) during a cell: the finished generation is merged into the tables, the command
    says so and exits with 143, and SIGTERM's handler is given back."""
    import os
    import signal

    from attnprobe.study.cli import main

    st = importlib.import_module("attnprobe.study.measure")
    real, seen = st.measure_cell, []

    def terminated_on_second(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    run = importlib.import_module("attnprobe.study.run")
    merge = run._merge

    def terminated_again(*args, **kwargs):  # a second SIGTERM, while what finished is merged, is not obeyed
        os.kill(os.getpid(), signal.SIGTERM)
        return merge(*args, **kwargs)

    monkeypatch.setattr(st, "measure_cell", terminated_on_second)
    monkeypatch.setattr(run, "_merge", terminated_again)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["study", "--model", "tiny", "--concepts", "dog,cat", "--seeds", "0", "--steps", "2",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 143 and signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "attnprobe study: terminated (SIGTERM); what finished is kept" in err
    assert "attnprobe: terminated (SIGTERM); every finished generation is kept" in err
    assert (tmp_path / "auc.csv").read_text().count("\ntiny,dog,") == 4  # the first generation's 4 variants


def test_an_interrupt_during_the_merge_says_the_merge_was_not_made(tmp_path, monkeypatch, capsys):
    run = importlib.import_module("attnprobe.study.run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_merge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.study(out=tmp_path, model="tiny", concepts=["dog"], seeds=[0], steps=2, variants="baseline,instruction",
                  progress=False, echo=False)
    assert "stopped while merging: the tables, figures and report are the previous merge's" in capsys.readouterr().err
    assert not (tmp_path / "auc.csv").exists() and list((tmp_path / "cells").rglob("*.safetensors"))


def test_sigterm_while_merging_lets_the_merge_end(tmp_path, monkeypatch, capsys):
    """A batch scheduler's time limit that lands in the merge: the tables are still written, then exit 143."""
    import os
    import signal

    from attnprobe.study.cli import main

    run = importlib.import_module("attnprobe.study.run")
    merge = run._merge

    def terminated_while_merging(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return merge(*args, **kwargs)

    monkeypatch.setattr(run, "_merge", terminated_while_merging)
    code = main(["study", "--model", "tiny", "--concepts", "dog", "--seeds", "0", "--steps", "2",
                 "--variants", "baseline,instruction", "--out", str(tmp_path), "--no-progress"])
    assert code == 143 and not run.MERGING.is_set()
    assert "attnprobe: terminated (SIGTERM) while merging, once the merge had ended" in capsys.readouterr().err
    assert (tmp_path / "auc.csv").read_text().count("\ntiny,dog,") == 2
