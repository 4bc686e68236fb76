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


def test_pending_logits_take_the_softmax_once_per_shape_with_the_per_site_values():
    """Sites of one shape share a buffer; the batched softmax, head mean and token selection give each site what
    softmax(logits) followed by the same reductions gives it alone, bit for bit; the buffer keeps its size."""
    from attnprobe.capture.processor import PendingLogits, reduce_probs

    torch.manual_seed(0)
    pending, workspace = PendingLogits(), {}
    cpu = torch.device("cpu")
    for call in range(2):
        given = {}
        for i, shape in enumerate([(1, 4, 16, 7)] * 5 + [(1, 4, 4, 7)] * 2):
            logits = torch.randn(shape) * 5
            pending.slot(f"s{i}", shape, cpu).copy_(logits)
            given[f"s{i}"] = logits
        tokens = torch.tensor([0, 3])
        done = dict(pending.finish("mean", tokens, torch.float16, workspace))
        assert list(done) == [f"s{i}" for i in range(7)]
        for site, logits in given.items():
            want = reduce_probs(logits.softmax(-1), "mean", tokens).to(torch.float16)
            assert torch.equal(done[site], want), (call, site)
        assert pending.buffers[(1, 4, 16, 7)].shape[0] >= 5
    sizes = {k: v.data_ptr() for k, v in pending.buffers.items()}
    pending.slot("again", (1, 4, 16, 7), cpu)
    assert pending.buffers[(1, 4, 16, 7)].data_ptr() == sizes[(1, 4, 16, 7)]  # no new buffer after the first call
    pending.drop()
    assert pending.finish("keep", None, torch.float32, workspace) == []


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
