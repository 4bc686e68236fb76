"""list_sites / select_sites on the tiny pipelines and on the real SD 1.5, SD 2.1 and SDXL UNet topologies
built on the meta device (see /work/shared/REFERENCE.md)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import attnprobe
from attnprobe import NoSitesError, UnknownSiteError, list_sites, probe
from attnprobe.capture.sites import denoiser_of, select_sites
from attnprobe.testing import SD15_UNET, SD21_UNET, SDXL_UNET, tiny_sd_pipeline, unet_on_meta


def sd_names():
    """Cross-attention site names of SD 1.x/2.x in execution order (down, mid, up), which list_sites gives
    before any probe although named_modules() lists up_blocks before mid_block."""
    down = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    up = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)]
    return down + ["mid_block.attentions.0.transformer_blocks.0.attn2"] + up


@pytest.fixture(scope="module")
def sd15():
    return list_sites(unet_on_meta(SD15_UNET))


def by_block(sites):
    return Counter(s.block for s in sites)


# ------------------------------------------------------------------ real topologies on meta
def test_sd15_meta_sites(sd15):
    assert [s.name for s in sd15] == sd_names()
    assert {s.heads for s in sd15} == {8}
    assert by_block(sd15) == {"down_blocks.0": 2, "down_blocks.1": 2, "down_blocks.2": 2, "mid_block": 1,
                              "up_blocks.1": 3, "up_blocks.2": 3, "up_blocks.3": 3}
    head_dim = {s.block: s.head_dim for s in sd15}
    assert (head_dim["down_blocks.0"], head_dim["down_blocks.1"], head_dim["down_blocks.2"]) == (40, 80, 160)
    assert head_dim["mid_block"] == 160 and head_dim["up_blocks.3"] == 40
    assert all(s.kind == "cross" and s.order is None for s in sd15)
    assert [s.group for s in sd15] == ["down"] * 6 + ["mid"] + ["up"] * 9


def test_sd21_meta_heads():
    sites = list_sites(unet_on_meta(SD21_UNET))
    assert [s.name for s in sites] == sd_names()
    heads = {s.block: s.heads for s in sites}
    assert heads == {"down_blocks.0": 5, "down_blocks.1": 10, "down_blocks.2": 20, "mid_block": 20,
                     "up_blocks.1": 20, "up_blocks.2": 10, "up_blocks.3": 5}
    assert {s.head_dim for s in sites} == {64}


def test_sdxl_meta_sites():
    sites = list_sites(unet_on_meta(SDXL_UNET))
    assert len(sites) == 70
    assert by_block(sites) == {"down_blocks.1": 4, "down_blocks.2": 20, "mid_block": 10,
                               "up_blocks.0": 30, "up_blocks.1": 6}
    heads = {s.block: {x.heads for x in sites if x.block == s.block} for s in sites}
    assert heads == {"down_blocks.1": {10}, "up_blocks.1": {10}, "down_blocks.2": {20}, "mid_block": {20},
                     "up_blocks.0": {20}}
    assert "down_blocks.2.attentions.1.transformer_blocks.9.attn2" in {s.name for s in sites}


# ------------------------------------------------------------------ tiny pipelines
def test_tiny_sd_has_the_sd15_site_names():
    sites = list_sites(tiny_sd_pipeline(seed=0))  # a fresh UNet: no execution order observed yet
    assert len(sites) == 16 and [s.name for s in sites] == sd_names()
    assert {s.heads for s in sites} == {2} and all(s.order is None for s in sites)


def test_denoiser_of(sd_pipe):
    assert denoiser_of(sd_pipe) is sd_pipe.unet
    assert denoiser_of(sd_pipe.unet) is sd_pipe.unet
    with pytest.raises(NoSitesError, match="neither"):
        denoiser_of(object())


def test_execution_order_after_probe(run):
    pipe = tiny_sd_pipeline(seed=0)
    with probe(pipe, heads="mean") as store:
        run(pipe)
    sites = list_sites(pipe)
    assert [s.group for s in sites] == ["down"] * 6 + ["mid"] + ["up"] * 9
    assert [s.order for s in sites] == list(range(16))
    assert store.site_names == [s.name for s in sites]
    assert [s.order for s in store.sites] == list(range(16))
    assert list_sites(pipe.unet) == sites  # known per denoiser, whichever way it is asked


def test_sdxl_execution_order(sdxl_pipe, run):
    with probe(sdxl_pipe, heads="mean") as store:
        run(sdxl_pipe)
    groups = [s.group for s in store.sites]
    assert groups == sorted(groups, key=["down", "mid", "up"].index)
    assert [s.name for s in list_sites(sdxl_pipe)] == store.site_names
    assert len(store.sites) == 17


def test_execution_order_after_a_partial_probe(run):
    pipe = tiny_sd_pipeline(seed=0)
    with probe(pipe, sites="up_blocks.*", heads="mean") as store:
        run(pipe, num_inference_steps=1)
    assert [s.group for s in store.sites] == ["up"] * 9  # the store itself is fine
    assert [s.group for s in list_sites(pipe)] == ["down"] * 6 + ["mid"] + ["up"] * 9


# ------------------------------------------------------------------ selection
def test_select_glob_list_predicate(sd15):
    ups = select_sites(sd15, "up_blocks.*")
    assert len(ups) == 9 and all(s.group == "up" for s in ups)
    assert [s.name for s in select_sites(sd15, "*attn2")] == [s.name for s in sd15]
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    picked = select_sites(sd15, [mid, "down_blocks.0.*"])
    assert [s.name for s in picked] == [s.name for s in sd15 if s.block == "down_blocks.0"] + [mid]  # sites' order
    assert select_sites(sd15, lambda s: s.block == "up_blocks.2") == [s for s in sd15 if s.block == "up_blocks.2"]
    assert select_sites(sd15, None) == sd15


def test_unknown_pattern_lists_sites(sd15):
    with pytest.raises(UnknownSiteError) as info:
        select_sites(sd15, ["up_blocks.*", "up_block.*"])
    message = str(info.value)
    assert "'up_block.*'" in message and "16" in message
    assert all(s.name in message for s in sd15)
    assert isinstance(info.value, KeyError)


def test_non_string_pattern_and_empty_predicate(sd15):
    with pytest.raises(UnknownSiteError, match="strings"):
        select_sites(sd15, [3])
    with pytest.raises(NoSitesError, match="picked none"):
        select_sites(sd15, lambda s: False)


def test_probe_records_only_selected_sites(sd_pipe, run):
    with probe(sd_pipe, sites=lambda s: s.group == "mid") as store:
        run(sd_pipe)
    assert store.site_names == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    with pytest.raises(UnknownSiteError, match="down_blocks.0.attentions.0"):
        with probe(sd_pipe, sites="nothing.*"):
            pass


# ------------------------------------------------------------------ no cross-attention
def test_unet2d_without_cross_attention():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )
    with pytest.raises(NoSitesError, match="self-attention") as info:
        list_sites(unet)
    assert "0 with encoder states" in str(info.value)
    assert isinstance(info.value, attnprobe.AttnprobeError)


def test_plain_module_has_no_sites():
    with pytest.raises(NoSitesError, match="no cross-attention site"):
        list_sites(torch.nn.Linear(4, 4))


def test_full_size_pipelines_have_the_real_topology():
    """The benchmark pipelines (``testing.full_size_pipeline``), built on meta: real site counts and sizes."""
    from attnprobe.testing import full_size_pipeline

    sd = full_size_pipeline("sd15", device="meta")
    xl = full_size_pipeline("sdxl", device="meta")
    assert [s.name for s in list_sites(sd)] == sd_names() and len(list_sites(xl)) == 70
    assert round(sum(p.numel() for p in sd.unet.parameters()) / 1e6, 2) == 859.52  # SD 1.5's UNet
    assert round(sum(p.numel() for p in xl.unet.parameters()) / 1e9, 2) == 2.57  # SDXL's UNet
    assert xl.text_encoder_2.config.hidden_size == 1280 and sd.text_encoder.config.num_hidden_layers == 12
    with pytest.raises(ValueError, match="'sd3' is not 'sd15' or 'sdxl'"):
        full_size_pipeline("sd3", device="meta")
