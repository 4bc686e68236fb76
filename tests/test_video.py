"""Video denoisers with a frame axis: Wan 2.1 (``attn2`` cross-attention to UMT5) and CogVideoX (one softmax over
``[text; video]``), tiny pipelines (``attnprobe.testing.tiny_pipeline``), CPU; the frame axis of the store, its files
and exports; analysis over frames; video denoisers refused up front (the study on video models: test_video_study.py).

The float64 reference never touches attnprobe: our own pre-forward hooks keep each attention module's inputs; q and
k are recomputed from a float64 copy of the module's projections and norms (Wan: RMS norm across heads before the
head split; CogVideoX: layer norms per head, then our own rotary embedding on the video positions, interleaved
pairs), and the softmax over all keys is taken in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import animate_heatmap, decoded_frame_index, frame_heatmaps
from attnprobe.capture.families import REFUSED_FAMILIES, checked_family, family_of
from attnprobe.capture.families.refused import VIDEO_FAMILIES
from attnprobe.capture.frames import check_budget, frame_maps, kept_calls, video_grid
from attnprobe.errors import ArgumentError, ProbeError, StoreError
from attnprobe.store.integrity import check_shapes
from attnprobe.testing import synthetic_store, synthetic_video_store, tiny_pipeline
from test_families import Inputs  # our own pre-forward hooks: each attention module's call arguments, per call

PROMPT = "a dog running on grass"
#: 9 frames → 3 latent frames (temporal compression 4); 32 × 48 px → 4 × 6 latents → 2 × 3 patches of 2 × 2
VIDEO = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16, output_type="pt")
GRID = (3, 2, 3)
FAMILIES = ("wan", "skyreels-v2", "cogvideox")


@pytest.fixture(scope="module")
def pipes():
    return {name: tiny_pipeline(name) for name in FAMILIES}


def generate(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames



@torch.no_grad()
def first_changed_frames(vae, z) -> list[int]:
    """Per latent frame j of ``z`` ``[batch, channel, frame, h, w]``: the first decoded frame that changes when latent
    frame j moves, read from the VAE itself (what ``decoded_frame_index`` must map back to j)."""
    base, first = vae.decode(z).sample, []
    for j in range(z.shape[2]):
        moved = z.clone()
        moved[:, :, j] += 1.0
        changed = (vae.decode(moved).sample - base).abs().amax(dim=(0, 1, 3, 4)) > 0
        first.append(int(changed.nonzero()[0]))
    return first

def _rope_pairs(x, cos, sin):
    """CogVideoX's rotary embedding on interleaved pairs, float64; ``x``: ``[batch, head, position, d]``."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos.double()[None, None] + rotated * sin.double()[None, None]


@torch.no_grad()
def reference(family, attn, inputs):
    """The video-query × text-key block of the softmax over all keys, float64 ``[batch, head, video, text]``."""
    a = copy.deepcopy(attn).double()
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    if family != "cogvideox":  # cross-attention: norms over all heads' channels, then the head split
        q = a.norm_q(a.to_q(h)).unflatten(-1, (a.heads, -1)).transpose(1, 2)
        k = a.norm_k(a.to_k(e)).unflatten(-1, (a.heads, -1)).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    x = torch.cat([e, h], dim=1)  # CogVideoX: [text; video], norms per head, rotary on the video positions
    q = a.norm_q(a.to_q(x).unflatten(-1, (a.heads, -1)).transpose(1, 2))
    k = a.norm_k(a.to_k(x).unflatten(-1, (a.heads, -1)).transpose(1, 2))
    n_text = e.shape[1]
    cos, sin = inputs["image_rotary_emb"]
    q = torch.cat([q[:, :, :n_text], _rope_pairs(q[:, :, n_text:], cos, sin)], dim=2)
    k = torch.cat([k[:, :, :n_text], _rope_pairs(k[:, :, n_text:], cos, sin)], dim=2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs[:, :, n_text:, :n_text]


@pytest.fixture(scope="module")
def probed(pipes):
    """Per family: the frames without and with the probe (fp32 maps), the store, and our own inputs of every site."""
    out = {}
    for name, pipe in pipes.items():
        plain = generate(pipe)
        sites = [s.name for s in attnprobe.list_sites(pipe)]
        with Inputs(pipe.transformer, sites) as seen, attnprobe.probe(pipe, dtype=torch.float32) as store:
            frames = generate(pipe)
        out[name] = (plain, frames, store, seen.seen)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_unchanged_and_maps_match_reference(probed, pipes, family):
    plain, frames, store, seen = probed[family]
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == family and len(store.calls) == 2 and len(store.samples) == 1
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    row = store.samples[0].row  # Wan: the separate conditional call's row 0; CogVideoX: row 1 of [uncond, cond]
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 1, 2, *GRID, 16)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            attn = pipes[family].transformer.get_submodule(site.name)
            ref = reference(family, attn, seen[site.name][call.index])[row]
            got = maps[c, 0].flatten(1, 3).double()  # [head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            if family != "cogvideox":  # cross-attention: each query's values over the tokens sum to 1
                torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)
    if family == "cogvideox":  # joint: the values sum to the text share, the store's own record of it too
        for site in store.sites:
            share = store[site.name].sum(-1).mean(dim=(-3, -2, -1))  # [call, sample, head]
            torch.testing.assert_close(share, store.text_share(site), atol=1e-6, rtol=0)
            assert float(share.max()) < 1


def test_cogvideox_15_temporal_patch(pipes):
    """CogVideoX 1.5's patch_size_t=2: the pipeline pads 3 latent frames to 4, two latent frames per query frame."""
    from diffusers import CogVideoXTransformer3DModel

    pipe = copy.copy(pipes["cogvideox"])  # the same components, its own transformer
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = CogVideoXTransformer3DModel(**{**config, "patch_size_t": 2}).eval()
    plain = generate(pipe)
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with Inputs(pipe.transformer, sites) as seen, attnprobe.probe(pipe, dtype=torch.float32) as store:
        frames = generate(pipe)
    assert torch.equal(plain, frames)
    assert store.video == {"qt": 2, "latent_frames": 4, "patch": [2, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": False, "frames": None}
    site = sites[0]
    ref = reference("cogvideox", pipe.transformer.get_submodule(site), seen.seen[site][0])[store.samples[0].row]
    torch.testing.assert_close(store[site][0, 0].flatten(1, 3).double(), ref, atol=2e-6, rtol=1e-5)
    assert tuple(store[site].shape) == (2, 1, 2, 2, 2, 3, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_and_frame_record(probed, pipes, family):
    _, frames, store, _ = probed[family]
    pipe = pipes[family]
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": 9}
    assert frames.shape[1] == store.video["frames"]
    assert store.meta["image_size"] == [32, 48] and store.meta["latent_size"] == [4, 6]
    patch = pipe.transformer.config.patch_size
    assert video_grid(3, (4, 6), patch if family != "cogvideox" else (1, patch, patch)) == GRID
    assert store.tokens(0)[:6] == ["a", "dog", "running", "on", "grass", "</s>"]


@pytest.mark.parametrize("family", FAMILIES)
def test_files_and_exports_keep_the_frame_axis(probed, family, tmp_path):
    _, _, store, _ = probed[family]
    site = store.sites[0].name
    saved = attnprobe.AttentionStore.load(store.save(tmp_path / "v.safetensors"))
    assert saved.video == store.video and torch.equal(saved[site], store[site])
    da = saved.to_xarray(site)
    assert da.dims == ("call", "sample", "head", "qt", "qh", "qw", "token") and da.sizes["qt"] == 3
    df = saved.to_pandas()
    mass = store[site].float().mean(dim=(2, 3, 4, 5))[0, 0]  # [token] of call 0, every video position
    got = df[(df.site == site) & (df.call == store.calls[0].index)].sort_values("token").mass.to_numpy()
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), mass.double(), atol=1e-6, rtol=0)


def test_streamed_video_store_round_trips(pipes, tmp_path):
    pipe = pipes["cogvideox"]
    with attnprobe.probe(pipe, heads="mean", tokens="dog", stream_to=tmp_path / "s") as store:
        generate(pipe)
    loaded = attnprobe.AttentionStore.load(tmp_path / "s")
    site = store.sites[0].name
    assert tuple(loaded[site].shape) == (2, 1, 1, *GRID, 1) and loaded.video == store.video
    assert torch.equal(loaded[site], store[site])
    assert torch.equal(loaded.maps(site, calls=[1], tokens=[0]), loaded[site][1:])


def test_reductions_and_passes_keep_the_frame_axis(probed, pipes):
    wan, cog = pipes["wan"], pipes["cogvideox"]
    full = probed["cogvideox"][2]
    with attnprobe.probe(cog, aggregate="mean", dtype=torch.float32) as agg:
        generate(cog)
    site = full.sites[0].name
    torch.testing.assert_close(agg[site][0], full[site].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(attnprobe.heatmap(agg, "dog", frame="all"), attnprobe.heatmap(full, "dog", frame="all"),
                               atol=1e-6, rtol=0)
    with attnprobe.probe(wan, passes="uncond", calls=[1], heads="mean") as uncond:  # Wan: call 1 is step 0's uncond
        generate(wan)
    assert [c.index for c in uncond.calls] == [1] and uncond.samples[0].pass_label == "uncond"
    assert tuple(uncond[uncond.sites[0].name].shape) == (1, 1, 1, *GRID, 16)
    with attnprobe.probe(cog, passes="all", tokens="dog") as both:
        generate(cog, prompt=["a dog", "a red dog"])
    assert [x.pass_label for x in both.samples] == ["uncond", "uncond", "cond", "cond"]
    assert tuple(both[site].shape) == (2, 4, 2, *GRID, 2)  # both prompts' "dog" positions


def test_kept_calls_count_the_passes_a_probe_keeps():
    class Scheduler:
        timesteps = torch.tensor([999.0, 500.0, 1.0])

    assert kept_calls(Scheduler, None) == 3 and kept_calls(None, None) == 1
    assert kept_calls(Scheduler, lambda i, t: t > 100) == 2
    assert kept_calls(Scheduler, lambda i, t: i in (1, 3), separate=1) == 2  # Wan's uncond calls: 1, 3, 5
    assert kept_calls(Scheduler, lambda i, t: i in (1, 3), separate=0) == 1  # none of its prompt's calls: at least 1


def test_header_qt_must_match_the_maps(probed):
    store = probed["wan"][2]
    shapes = {s.name: tuple(store[s.name].shape) for s in store.sites}
    check_shapes("x", store, shapes, len(store.calls))
    store.meta["video"]["qt"] = 4
    try:
        with pytest.raises(StoreError, match="4 qt"):
            check_shapes("x", store, shapes, len(store.calls))
    finally:
        store.meta["video"]["qt"] = 3
    with pytest.raises(StoreError, match="qh, qw"):  # an image store's header with video maps
        check_shapes("x", synthetic_store(), {synthetic_store().sites[0].name: (2, 1, 2, 3, 2, 2, 77)}, 2)


def test_analysis_per_frame_and_pooled(probed, tmp_path):
    _, frames, store, _ = probed["wan"]
    per_frame = attnprobe.trajectory(store, "dog", by_frame=True)
    pooled = attnprobe.trajectory(store, "dog")
    assert per_frame.shape == (2, 3) and pooled.shape == (2,)
    torch.testing.assert_close(per_frame.mean(-1), pooled, atol=1e-6, rtol=0)
    assert attnprobe.trajectory(store, "dog", by_frame=True, by_site=True).shape == (2, 2, 3)
    every = attnprobe.heatmap(store, "dog", frame="all")
    assert every.shape == (3, 32, 48)
    torch.testing.assert_close(attnprobe.heatmap(store, "dog", frame=-1), every[2])
    torch.testing.assert_close(attnprobe.heatmap(store, "dog"), every.mean(0), atol=1e-7, rtol=0)
    assert decoded_frame_index(store, 9) == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    per_decoded = frame_heatmaps(store, "dog", 9, (32, 48))
    assert torch.equal(per_decoded[5], every[2])
    path = animate_heatmap(store, "dog", frames[0], tmp_path / "dog.gif")
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.n_frames == 9 and gif.size == (48, 32)
    with pytest.raises(ArgumentError, match="decode to 9 frames"):
        animate_heatmap(store, "dog", frames[0][:8], tmp_path / "short.gif")
    with pytest.raises(ArgumentError, match=".gif"):
        animate_heatmap(store, "dog", frames[0], tmp_path / "dog.mp4")
    from attnprobe.analysis.figures import plot_site_call_grid

    figure = plot_site_call_grid(store, "dog")  # each panel the mean over latent frames, on the site's qh × qw grid
    assert figure.axes[0].images[0].get_array().shape == (2, 3)


def test_decoded_frames_need_a_known_count():
    video = synthetic_video_store(frames=4, temporal_compression=4)
    video.meta["video"].update(patch=[2, 1, 1], qt=2, frames=None)  # CogVideoX 1.5: padded latent frames
    with pytest.raises(StoreError, match="drops the padding"):
        decoded_frame_index(video, 13)
    video.meta["video"].update(temporal_compression=None)  # no compression: decoded frames are the latent ones
    assert decoded_frame_index(video, 4) == [0, 0, 1, 1]


def test_frames_refused_where_there_are_none():
    image = synthetic_store()
    assert image.video is None and image.grid_dims == ("qh", "qw")
    with pytest.raises(StoreError, match="needs a video store"):
        attnprobe.trajectory(image, "dog", by_frame=True)
    with pytest.raises(StoreError, match="needs a video store"):
        attnprobe.heatmap(image, "dog", frame=0)
    video = synthetic_video_store(frames=3, prompt="a dog", frame_mass={"dog": [0.1, 0.2, 0.6]})
    with pytest.raises(attnprobe.errors.SelectionError, match="3 entries"):
        attnprobe.heatmap(video, "dog", frame=3)
    with pytest.raises(ArgumentError, match="frame="):
        attnprobe.heatmap(video, "dog", frame="last")


def test_a_site_off_the_grid_is_refused():
    probs = torch.rand(1, 2, 17, 5)
    with pytest.raises(ProbeError, match="3×2×3"):
        frame_maps("blocks.0.attn2", probs, (3, (1, 2, 2), GRID))
    assert frame_maps("s", torch.rand(1, 2, 18, 5), (3, (1, 2, 2), GRID)).shape == (1, 2, *GRID, 5)


def test_memory_estimate_refuses_before_the_first_call(pipes, monkeypatch):
    with pytest.raises(ProbeError, match=r"GiB .* 3 calls kept"):
        check_budget(2**30, 3, "cpu", free=lambda device: 2**30)
    check_budget(2**30, 3, "cpu", aggregate="mean", free=lambda device: 2**30)  # one call's worth fits
    pipe = pipes["wan"]
    monkeypatch.setattr("attnprobe.capture.frames._free", lambda device: 1000)
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ProbeError, match=r"about .* GiB .* heads='mean'"):
            with attnprobe.probe(pipe) as store:
                generate(pipe)
    finally:
        handle.remove()
    assert calls == [] and store.calls == []  # refused at the first call's pre-hook: the denoiser never ran


def test_wan_one_module_as_both_experts_and_image_to_video_are_refused(pipes):
    from diffusers import WanTransformer3DModel

    pipe = pipes["wan"]
    pipe.register_modules(transformer_2=pipe.transformer)
    try:
        with pytest.raises(ProbeError, match="transformer_2 is its transformer"):
            with attnprobe.probe(pipe):
                pass
    finally:
        pipe.register_modules(transformer_2=None)
    i2v = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
                                freq_dim=8, ffn_dim=8, num_layers=1, image_dim=8)
    with pytest.raises(ProbeError, match="CLIP image tokens"):
        attnprobe.probe(i2v).__enter__()


def test_diffusion_forcing_pipelines_are_refused_by_name():
    from attnprobe.models.coverage import pipeline_verdicts

    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["SkyReelsV2Pipeline"].verdict == "tested (tests/test_video.py)"
    for name in ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"):
        assert verdicts[name].verdict.startswith("refused: gives each latent frame its own timestep")
    assert verdicts["SkyReelsV2ImageToVideoPipeline"].family == "wan-image"


@pytest.mark.parametrize("family", VIDEO_FAMILIES, ids=lambda f: f.name)
def test_other_video_denoisers_refused_with_their_reason(family):
    assert family in REFUSED_FAMILIES and family.refused
    for cls in family.classes():
        if family.matches is not None:
            continue  # Wan 2.1 image-to-video: above
        denoiser = torch.nn.Module.__new__(cls)  # no weights: the family is told by the class
        assert family_of(denoiser) is family
        with pytest.raises(ProbeError, match="does not record it") as info:
            checked_family(denoiser, denoiser)
        assert family.refused in str(info.value)


def test_cogvideox_even_latent_frames_decode_in_pairs(pipes):
    """CogVideoX's VAE decodes latent frames in pairs: with an even number (13 frames asked → 4 latent frames) every
    latent frame makes 4 frames and the first is not alone, so the video has 16 frames, mapped f // 4."""
    pipe = pipes["cogvideox"]
    with attnprobe.probe(pipe, heads="mean") as store:
        frames = generate(pipe, num_frames=13)
    assert store.video["latent_frames"] == 4 and store.video["first_frame_alone"] is False
    assert frames.shape[1] == store.video["frames"] == 16
    assert decoded_frame_index(store, 16) == [f // 4 for f in range(16)]


def test_animate_heatmap_refuses_a_bad_path_or_colormap(tmp_path):
    store = synthetic_video_store(frames=3, prompt="a dog", frame_mass={"dog": [0.1, 0.2, 0.6]})
    video = torch.rand(9, 3, 16, 16)
    with pytest.raises(ArgumentError, match="does not exist"):
        animate_heatmap(store, "dog", video, tmp_path / "missing" / "dog.gif")
    (tmp_path / "dir.gif").mkdir()
    with pytest.raises(ArgumentError, match="it is a folder"):
        animate_heatmap(store, "dog", video, tmp_path / "dir.gif")
    with pytest.raises(ArgumentError, match="not a matplotlib colormap"):
        animate_heatmap(store, "dog", video, tmp_path / "dog.gif", cmap="nope")


@pytest.mark.parametrize("edit", [dict(patch=[0, 1, 1]), dict(temporal_compression="4"), dict(patch=None),
                                  dict(temporal_compression=-4), dict(latent_frames=100), dict(frames=10),
                                  dict(qt=True)])
def test_an_inconsistent_video_record_is_refused(edit):
    """A header's video record is checked against itself (a file edited with its integrity record recomputed gave
    ZeroDivisionError, TypeError or negative frame indices)."""
    from attnprobe.store.integrity import _video_record

    good = {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 4, "first_frame_alone": True,
            "frames": 9}
    assert _video_record(good) and _video_record({**good, "first_frame_alone": False, "frames": 12})
    assert not _video_record({**good, **edit})
