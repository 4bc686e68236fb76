"""The wrapper around installed processors: fused projections, extra processor kwargs, token merging."""

import inspect

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import attnprobe
from attnprobe.testing import tiny_sd_pipeline

GEN = dict(num_inference_steps=2, height=64, width=64, output_type="latent")


def test_fused_qkv_before_the_probe_is_read_through_to_kv():
    pipe = tiny_sd_pipeline()
    pipe.fuse_qkv_projections()
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert pipe.unet.get_submodule(site).fused_projections
    plain = pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN).images
    with attnprobe.probe(pipe, sites=site, passes="all", dtype=torch.float32) as store:
        probed = pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN).images
    assert torch.equal(plain, probed)
    attn = pipe.unet.get_submodule(site)
    # reference from the fused weights: the key is the first half of to_kv
    captured = []
    h = attn.register_forward_pre_hook(lambda m, a, k: captured.append((a[0], k["encoder_hidden_states"])), with_kwargs=True)
    pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN)
    h.remove()
    want = []
    for hs, enc in captured:
        q = attn.to_q(hs).double()
        k = attn.to_kv(enc).chunk(2, dim=-1)[0].double()
        q = q.view(q.shape[0], q.shape[1], attn.heads, -1).transpose(1, 2)
        k = k.view(k.shape[0], k.shape[1], attn.heads, -1).transpose(1, 2)
        want.append((q @ k.transpose(-1, -2) * attn.scale).softmax(-1))
    got = store[site].flatten(3, 4).double()
    assert torch.allclose(got, torch.stack(want), atol=1e-6)


class KwargProcessor(AttnProcessor):
    """A custom processor with an extra keyword that cross_attention_kwargs must still reach."""

    def __init__(self):
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, boost=1.0):
        self.seen.append(boost)
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out * boost


def test_processor_keywords_still_reach_the_wrapped_processor():
    pipe = tiny_sd_pipeline()
    site = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    custom = KwargProcessor()
    pipe.unet.get_submodule(site).set_processor(custom)
    kw = dict(cross_attention_kwargs={"boost": 1.5}, generator=torch.Generator().manual_seed(0))
    plain = pipe("a dog", **GEN, **kw).images
    assert custom.seen and set(custom.seen) == {1.5}
    custom.seen.clear()
    kw["generator"] = torch.Generator().manual_seed(0)
    with attnprobe.probe(pipe, sites=site) as store:
        wrapper = pipe.unet.get_submodule(site).processor
        assert "boost" in inspect.signature(wrapper.__call__).parameters
        probed = pipe("a dog", **GEN, **kw).images
    assert set(custom.seen) == {1.5}
    assert torch.equal(plain, probed)
    assert pipe.unet.get_submodule(site).processor is custom
    assert store[site].shape[0] == 2


class MergingProcessor(AttnProcessor):
    """Imitates token merging: attends from one query fewer and copies a row back (changes the query count)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        kept = hidden_states[:, :-1]
        out = super().__call__(attn, kept, encoder_hidden_states, attention_mask, temb)
        return torch.cat([out, out[:, -1:]], dim=1)


def test_a_site_whose_queries_do_not_fit_the_grid_is_kept_flat_with_a_warning():
    pipe = tiny_sd_pipeline()
    site = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    pipe.unet.get_submodule(site).set_processor(MergingProcessor())
    with pytest.warns(UserWarning, match="kept flat"):
        with attnprobe.probe(pipe, sites=[site, "mid_block.*"]) as store:
            pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN)
    assert store.flat_sites == {site}
    assert tuple(store[site].shape[3:5]) == (1, 63)
    assert tuple(store["mid_block.attentions.0.transformer_blocks.0.attn2"].shape[3:5]) == (1, 1)
    heat = attnprobe.heatmap(store, "dog")  # flat sites are skipped, the others still count
    assert heat.shape == (64, 64)


def test_a_processor_that_never_calls_to_k_gives_a_clear_error():
    class NoKey:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            attn.to_q(hidden_states)
            return hidden_states

    pipe = tiny_sd_pipeline()
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    pipe.unet.get_submodule(site).set_processor(NoKey())
    with pytest.raises(attnprobe.ProbeError, match="did not call attn.to_k"):
        with attnprobe.probe(pipe, sites=site):
            pipe("a dog", **GEN)
    assert isinstance(pipe.unet.get_submodule(site).processor, NoKey)


def test_ip_adapter_processors_are_wrapped_and_record_the_text_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    unet = tiny_sd_pipeline().unet
    torch.manual_seed(0)
    procs = {}
    for name in unet.attn_processors:
        mod = unet.get_submodule(name.removesuffix(".processor"))
        procs[name] = (
            IPAdapterAttnProcessor2_0(hidden_size=mod.inner_dim, cross_attention_dim=32, num_tokens=(4,), scale=0.7)
            if mod.is_cross_attention
            else AttnProcessor2_0()
        )
    unet.set_attn_processor(dict(procs))  # diffusers pops from the dict it is given
    x, text, ip = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), [torch.randn(2, 1, 4, 32)]
    n_params = sum(p.numel() for p in unet.parameters())
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=(text, ip)).sample
        # the adapter adds image attention to the output: the verify-once check says so, in one warning
        with pytest.warns(UserWarning, match=r"^\d+ site\(s\) .* processor IPAdapterAttnProcessor2_0 is not") as seen:
            with attnprobe.probe(unet, dtype=torch.float32) as store:
                probed = unet(x, 10, encoder_hidden_states=(text, ip)).sample
    assert torch.equal(plain, probed)
    assert sum("IPAdapterAttnProcessor2_0 is not" in str(w.message) for w in seen) == 1
    site = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert store.meta["processor_check"][site]["verdict"] == "differs"
    attn = unet.get_submodule(site)
    assert attn.processor is procs[site + ".processor"]
    assert sum(p.numel() for p in unet.parameters()) == n_params  # the adapter weights are back in the tree
    # the recorded map is the text attention: softmax over the 77 text keys only
    maps = store[site]
    assert maps.shape[-1] == 77
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)


def test_prompts_need_the_pipeline_tokenizer():
    pipe = tiny_sd_pipeline()
    with pytest.raises(attnprobe.ProbeError, match="pass the pipeline"):
        with attnprobe.probe(pipe.unet, prompts=["a dog"]):
            pass


def test_nested_probes_both_record_and_restore_in_any_order():
    pipe = tiny_sd_pipeline()
    before = dict(pipe.unet.attn_processors)
    plain = pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN).images
    with attnprobe.probe(pipe, dtype=torch.float32) as outer:
        with attnprobe.probe(pipe, sites="mid_block.*", passes="all", dtype=torch.float32) as inner:
            probed = pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN).images
    assert torch.equal(plain, probed)
    site = "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert torch.allclose(outer[site][:, 0], inner[site][:, 1], atol=1e-6)  # the same cond maps, seen by both
    for store in (outer, inner):  # both name the processor that runs, not the other probe's wrapper
        assert store.meta["processor_check"][site] | {"relative_error": 0} == {
            "processor": type(before[site + ".processor"]).__name__, "verdict": "equal", "relative_error": 0,
            "tolerance": 1e-4, "conditioning": "equal"}
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    # closed out of order: the outer probe first
    a, b = attnprobe.probe(pipe), attnprobe.probe(pipe)
    a.__enter__(); b.__enter__()
    pipe("a dog", **GEN)
    a.__exit__(None, None, None); b.__exit__(None, None, None)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    # one probe object entered a second time, after its block and inside it: a ProbeError, and the pipeline clean
    once = attnprobe.probe(pipe, sites="mid_block.*")
    with once as first:
        pipe("a dog", **GEN)
        with pytest.raises(attnprobe.ProbeError, match=r"already entered: a probe records one `with` block"):
            with once:
                pass
    with pytest.raises(attnprobe.ProbeError, match="already entered"):
        with once:
            pass
    assert len(first.calls) == 2 and all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN).images, plain)


def _site(heads, scale):
    from types import SimpleNamespace

    return SimpleNamespace(heads=heads, scale=scale, norm_q=None, norm_k=None)


@pytest.mark.parametrize("heads,tokens", [("mean", [0, 3]), ("keep", None)])
def test_deferred_sites_get_the_per_site_values_bit_for_bit(heads, tokens):
    """Small sites of several shapes deferred to the call's end (one buffer per text length, a batched product per
    shape, one softmax) get what the per-site path (attention_probs, reduce_probs) gives each alone up to fp32
    rounding (exp2 rounds a buffer's last values by another code path, so not bit for bit: every call of a site takes
    the same path, tests/test_capture.py), and the float64 softmax of q·kᵀ·scale; a site's verify-once check gets
    its probabilities before any reduction; the buffers keep their size between calls."""
    from attnprobe.capture.cross import attention_probs
    from attnprobe.capture.processor import PendingLogits, reduce_probs

    torch.manual_seed(0)
    pending, workspace = PendingLogits(), {}
    keep = None if tokens is None else torch.tensor(tokens)
    rows = slice(1, 2)  # the conditional half of a CFG batch
    for call in range(2):
        given, seen = {}, []
        for i, (n_query, width, n_heads) in enumerate([(16, 8, 4)] * 5 + [(4, 8, 4)] * 2 + [(4, 12, 3)]):
            attn = _site(n_heads, (width // n_heads) ** -0.5)
            query, key = torch.randn(2, n_query, width) * 3, torch.randn(2, 7, width) * 3
            assert pending.defer(f"s{i}", attn, query, key, rows, seen.append if i == 5 else None)
            given[f"s{i}"] = (attn, query, key)
        done = dict(pending.finish(heads, keep, torch.float32, workspace))
        assert list(done) == [f"s{i}" for i in range(8)]
        for site, (attn, query, key) in given.items():
            full = attention_probs(attn, query, key, None, rows, {})
            torch.testing.assert_close(done[site], reduce_probs(full, heads, keep), rtol=1e-6, atol=1e-8)
            if site == "s5":
                torch.testing.assert_close(seen[0], full, rtol=1e-6, atol=1e-8)
            q = query[1:].double().unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = key[1:].double().unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            want = reduce_probs(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1), heads, keep)
            torch.testing.assert_close(done[site].double(), want, rtol=1e-3, atol=1e-4)
        sizes = {k: v.data_ptr() for k, v in pending.buffers.items()}
    assert {k: v.data_ptr() for k, v in pending.buffers.items()} == sizes  # no new buffer after the first call
    pending.drop()
    assert pending.finish("keep", None, torch.float32, workspace) == []


def test_deferred_sites_refuse_large_sites_index_rows_and_edited_queries():
    from attnprobe.capture.processor import PendingLogits

    pending = PendingLogits()
    big = torch.randn(1, 4096, 8)
    assert not pending.defer("big", _site(4, 0.5), big, torch.randn(1, 77, 8), None)  # 4·4096·77 values: at once
    assert not pending.defer("rows", _site(4, 0.5), torch.randn(2, 4, 8), torch.randn(2, 7, 8), torch.tensor([1]))
    query = torch.randn(1, 4, 8)
    assert pending.defer("edited", _site(4, 0.5), query, torch.randn(1, 7, 8), None)
    query.mul_(2)  # changed in place after its processor ran: its map would not be the one the model used
    with pytest.raises(attnprobe.ProbeError, match="edited: its query or key was changed in place"):
        pending.finish("keep", None, torch.float32, {})


@pytest.mark.parametrize("shift", [-300.0, 0.0, 200.0])
def test_base2_softmax_matches_the_float64_softmax_also_where_it_must_subtract_the_maximum(shift):
    """softmax2 skips the row maximum unless a row's sum of 2^l overflows or underflows: logits far above 128 or far
    below -100 (base 2) take the recomputation, and every result is the float64 softmax within fp32 rounding."""
    from attnprobe.capture.processor import LOG2E, softmax2

    torch.manual_seed(1)
    natural = torch.randn(3, 2, 5, 9, dtype=torch.float64) * 4 + shift
    natural[0, 0, 0] = float("-inf")
    natural[0, 0, 0, 2] = shift  # one attended key in a masked row
    for redo in (None, "in place"):
        logits2 = (natural * LOG2E).float()
        again = logits2.clone()
        probs = softmax2(logits2, {}, None if redo is None else (lambda: logits2.copy_(again)))
        # fp32 logits of magnitude m carry m·2^-24 of rounding into every exponential: torch.softmax's error too
        rtol = 2 * (abs(shift) + 20) * 2.0 ** -24 * LOG2E
        torch.testing.assert_close(probs.double(), torch.softmax(natural, -1), rtol=rtol, atol=1e-7)
        assert (probs.double() - torch.softmax(natural, -1)).abs().max() <= 2 * (
            torch.softmax(natural.float(), -1).double() - torch.softmax(natural, -1)).abs().max() + 1e-7
    masked = torch.full((1, 4), float("-inf"))
    assert torch.isnan(softmax2(masked, {})).all()  # as torch.softmax: a row with no attended key is NaN


@pytest.mark.parametrize("redo", [False, True])
def test_base2_softmax_under_flush_to_zero_and_far_from_zero(redo):
    """From a breaker: with the CPU's flush-to-zero on, rows whose sum of 2^l neared 2^128 gave a subnormal 1/sum,
    flushed to 0: all-zero maps. Rows far above or below 0 are now taken row by row by torch.softmax, every
    probability at least 2^-99 is torch.softmax's within fp32 rounding, and the other rows' values do not change
    (their bits do not depend on which other sites share the buffer)."""
    from attnprobe.capture.processor import LOG2E, softmax2

    torch.manual_seed(2)
    natural = torch.randn(6, 77, dtype=torch.float64) * 3
    natural[1] = 84.0  # every logit equal and large: 1/77 each
    natural[2] = torch.tensor([-69.0, -80.0, -90.0, -100.0, -110.0] * 15 + [-69.0, -70.0])  # every logit far below 0
    natural[3, 5] = 150.0  # one large logit: overflow without the maximum
    plain = [0, 4, 5]

    def run():
        logits2 = (natural * LOG2E).float()
        again = logits2.clone()
        return softmax2(logits2, {}, (lambda: logits2.copy_(again)) if redo else None).clone()

    before = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
    try:
        for ftz in (False, True):
            torch.set_flush_denormal(ftz)
            probs, want = run().double(), torch.softmax(natural, -1)
            assert torch.isfinite(probs).all()
            torch.testing.assert_close(probs[1], torch.full((77,), 1 / 77, dtype=torch.float64))
            big = want >= 2.0 ** -99
            torch.testing.assert_close(probs[big], want[big], rtol=2e-5, atol=0)
            alone = softmax2((natural[plain] * LOG2E).float(), {})  # without the rows that need torch.softmax
            assert torch.equal(probs[plain].float(), alone)
    finally:
        torch.set_flush_denormal(before)


def test_deferred_sites_copy_inference_tensors_that_count_no_edits():
    """From a breaker: an inference tensor keeps no version count, so an edit in place after its processor ran (a
    projection writing into one shared buffer) went unseen under torch.inference_mode; its q and k are now copied
    when deferred, and the map is the one of the values the processor used."""
    from attnprobe.capture.cross import attention_probs
    from attnprobe.capture.processor import PendingLogits

    pending, attn = PendingLogits(), _site(4, 0.5)
    with torch.inference_mode():
        query, key = torch.randn(1, 4, 8), torch.randn(1, 7, 8)
        want = attention_probs(attn, query.clone(), key.clone(), None, None, {}).clone()
        assert pending.defer("s", attn, query, key, None)
        query.mul_(3)  # the shared buffer written by the next site
        done = dict(pending.finish("keep", None, torch.float32, {}))
    torch.testing.assert_close(done["s"], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("options", [dict(heads="mean"), dict(heads="keep", tokens="dog"), dict(aggregate="mean")])
def test_pipeline_calls_in_and_out_of_inference_mode_in_one_probe(options):
    """Scratch buffers, PendingLogits slots and aggregate sums made during an inference-mode call stay writable in a
    no_grad call of the same probe (an inference tensor cannot be written into outside inference mode)."""
    pipe = tiny_sd_pipeline()
    for first, second in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
        with attnprobe.probe(pipe, **options) as store:
            with first():
                pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN)
            with second():
                pipe("a dog", generator=torch.Generator().manual_seed(0), **GEN)
        assert len(store.calls) == 2 * GEN["num_inference_steps"]
