"""``probe(relations=...)``: image->image at the self-attention beside UNet and PixArt cross sites and at SD3's and
Flux's joint and single-stream sites; text->image and text->text at the joint ones. Outputs stay bit-identical.

The float64 references never touch attnprobe: our own hooks keep each attention module's inputs and the softmax is
recomputed from the module's projections (``test_joint.full_softmax`` for joint attention: every key, image and
text, in one softmax).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnprobe
from attnprobe.errors import ProbeError, StoreError, UnknownSiteError
from attnprobe.testing import tiny_pipeline, tiny_pixart_pipeline, tiny_sd_pipeline
from test_families import GRID as KERNEL_GRID, Inputs as KernelInputs, full_softmax as kernel_softmax
from test_families import generate as kernel_generate
from test_joint import OPTIONS as JOINT_OPTIONS, Inputs, full_softmax

POINTS = [(0.5, 0.5), (0.0, 1.0), (0.99, 0.2)]
ALL = ["image->image", "text->image", "text->text"]


def cells(points, grid):
    """Our own placement of each point on a ``(h, w)`` grid: the cell that holds it (the last row or column for 1)."""
    h, w = grid
    return [min(int(y * h), h - 1) * w + min(int(x * w), w - 1) for y, x in points]


class SelfInputs:
    """Each self-attention module's ``hidden_states`` per call (our own forward pre-hooks)."""

    def __init__(self, denoiser, names):
        self.modules = {n: denoiser.get_submodule(n) for n in names}
        self.seen = {n: [] for n in names}
        self.handles = [m.register_forward_pre_hook(partial(self._keep, n), with_kwargs=True)
                        for n, m in self.modules.items()]

    def _keep(self, name, module, args, kwargs):
        self.seen[name].append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    @torch.no_grad()
    def probs(self, name, call):
        """``softmax(q·kᵀ·scale)`` in float64, ``[batch, head, query, key]``."""
        attn, hidden = self.modules[name], self.seen[name][call]
        split = lambda x: x.double().reshape(*x.shape[:2], attn.heads, -1).transpose(1, 2)  # noqa: E731
        q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
        return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)

    def close(self):
        for h in self.handles:
            h.remove()


CROSS = {
    "sd": (tiny_sd_pipeline, dict(height=64, width=64)),
    "pixart": (tiny_pixart_pipeline, dict(JOINT_OPTIONS["pixart"])),
}


@pytest.fixture(scope="module")
def cross_pipes():
    return {name: build() for name, (build, _) in CROSS.items()}


def _generate(pipe, options, prompt=("a dog", "a cat"), **kwargs):
    return pipe(list(prompt), num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                **options, **kwargs).images


@pytest.mark.parametrize("family", list(CROSS))
def test_image_to_image_equals_float64_self_attention(cross_pipes, family, tmp_path):
    pipe, options = cross_pipes[family], CROSS[family][1]
    sites = attnprobe.list_sites(pipe)
    names = [s.name.removesuffix("attn2") + "attn1" for s in sites]
    plain = _generate(pipe, options)
    seen = SelfInputs(attnprobe.capture.denoiser_of(pipe), names)
    try:
        with attnprobe.probe(pipe, passes="all", dtype=torch.float32, relations="image->image", points=POINTS) as store:
            probed = _generate(pipe, options)
    finally:
        seen.close()
    assert torch.equal(plain, probed)
    assert sorted(store.relations) == ["image->image"] and sorted(store.relations["image->image"]) == sorted(names)
    meta = store.meta["relations"]
    assert meta["points"] == [list(p) for p in POINTS] and meta["relations"] == ["image->image"]
    for site, name in zip(sites, names):
        got = store.relation("image->image", name)
        assert got is store.relation("image->image", site.name) is store.relation("image->image", site)
        n_calls, n_samples, heads, n_points, h, w = got.shape
        assert (n_calls, n_samples, heads, n_points) == (len(store.calls), len(store.samples), site.heads, len(POINTS))
        assert meta["modules"][name]["grid"] == [h, w] and meta["modules"][name]["site"] == site.name
        assert meta["modules"][name]["cells"] == [[c // w, c % w] for c in cells(POINTS, (h, w))]
        for call in range(n_calls):
            want = seen.probs(name, call)[:, :, cells(POINTS, (h, w))]  # [batch, head, point, key]
            for sample in store.samples:
                diff = (got[call, sample.index].flatten(-2).double() - want[sample.row]).abs().max()
                assert diff <= 1e-6, (name, call, sample)
        assert torch.allclose(got.sum((-2, -1)), torch.ones(()), atol=1e-5)
        assert store.meta["processor_check"][name]["verdict"] == "equal"
    path = store.save(tmp_path / "relations.safetensors")
    back = attnprobe.AttentionStore.load(path)
    assert all(torch.equal(back.relation("image->image", n), store.relation("image->image", n)) for n in names)


def test_head_mean_and_half_precision_are_the_kept_heads_reduced(cross_pipes):
    pipe, options = cross_pipes["sd"], CROSS["sd"][1]
    kept = {}
    for heads, dtype in (("keep", torch.float32), ("mean", torch.float16)):
        with attnprobe.probe(pipe, heads=heads, dtype=dtype, relations="image->image", points=(0.25, 0.75)) as store:
            _generate(pipe, options, prompt=("a dog",))
        kept[heads] = store.relations["image->image"]
    for name, m in kept["keep"].items():
        assert kept["mean"][name].dtype == torch.float16 and kept["mean"][name].shape[2] == 1
        assert torch.allclose(kept["mean"][name].float(), m.mean(2, keepdim=True), atol=2e-3)


# ---------------------------------------------------------------------------------------------- joint attention
JOINT = {"sd3": partial(tiny_pipeline, "sd3"), "flux": partial(tiny_pipeline, "flux"),
         "chroma": partial(tiny_pipeline, "chroma")}
#: Chroma masks its T5 padding: its text queries are refused (test_text_queries_at_a_masked_site_are_refused)
JOINT_RELATIONS = {"sd3": ALL, "flux": ALL, "chroma": ["image->image"]}


@pytest.fixture(scope="module")
def joint_pipes():
    return {name: build() for name, build in JOINT.items()}


@pytest.mark.parametrize("family", list(JOINT))
def test_joint_relations_are_blocks_of_the_float64_softmax(joint_pipes, family):
    pipe, options = joint_pipes[family], JOINT_OPTIONS[family]
    sites = attnprobe.list_sites(pipe)
    passes, relations = "all" if family == "sd3" else "cond", JOINT_RELATIONS[family]
    plain = _generate(pipe, options, prompt=("a dog",))
    seen = Inputs(pipe.transformer, [s.name for s in sites])
    try:
        with attnprobe.probe(pipe, passes=passes, dtype=torch.float32, relations=relations, points=POINTS) as exact:
            probed = _generate(pipe, options, prompt=("a dog",))
    finally:
        seen.close()
    assert torch.equal(plain, probed)
    with attnprobe.probe(pipe, passes=passes, dtype=torch.float32, relations=relations, points=POINTS,
                         joint="renorm") as renorm:
        _generate(pipe, options, prompt=("a dog",))
    for site in sites:
        attn = pipe.transformer.get_submodule(site.name)
        grid = exact.relation("image->image", site).shape[-2:]
        for call in range(len(exact.calls)):
            index = exact.calls[call].index  # Chroma keeps the conditional calls 0, 2
            hidden, states, emb, mask = seen.seen[site.name][index]
            probs, image, text = full_softmax(attn, site.kind, hidden, states, emb, seen.text_len[index], mask)
            rows = [s.row for s in exact.samples]
            blocks = {"image->image": probs[rows][:, :, image][:, :, cells(POINTS, grid)][..., image],
                      "text->image": probs[rows][:, :, text][..., image],
                      "text->text": probs[rows][:, :, text][..., text]}
            for relation, want in ((r, blocks[r]) for r in relations):
                got = exact.relation(relation, site)[call].double()
                got = got.flatten(-2) if relation != "text->text" else got
                assert (got - want).abs().max() <= 1e-6, (site.name, relation, call)
                renormed = renorm.relation(relation, site)[call].double()
                renormed = renormed.flatten(-2) if relation != "text->text" else renormed
                assert (renormed - want / want.sum(-1, keepdim=True)).abs().max() <= 1e-6, (site.name, relation)
            if family == "chroma":
                continue
            # a text query's attention is split between the image and the text keys: together 1
            whole = exact.relation("text->image", site)[call].sum((-2, -1)) + exact.relation("text->text", site)[call].sum(-1)
            assert torch.allclose(whole, torch.ones(()), atol=1e-5)


def test_text_queries_at_a_masked_site_are_refused(joint_pipes):
    pipe = joint_pipes["chroma"]
    with pytest.raises(ProbeError, match="text queries at a site with an attention mask"):
        with attnprobe.probe(pipe, relations="text->image"):
            _generate(pipe, JOINT_OPTIONS["chroma"], prompt=("a dog",))


def test_text_queries_follow_the_kept_tokens(joint_pipes):
    pipe, options = joint_pipes["sd3"], JOINT_OPTIONS["sd3"]
    with attnprobe.probe(pipe, dtype=torch.float32, relations=["text->image", "text->text"]) as every:
        _generate(pipe, options, prompt=("a dog",))
    with attnprobe.probe(pipe, dtype=torch.float32, relations=["text->image", "text->text"], tokens="dog") as kept:
        _generate(pipe, options, prompt=("a dog",))
    positions = kept.token_positions
    assert len(positions) == 2  # CLIP's "dog" and T5's
    for relation in ("text->image", "text->text"):
        for site in kept.sites:
            # the same rows (matmul blocks over fewer queries round differently: not bit for bit)
            assert torch.allclose(kept.relation(relation, site), every.relation(relation, site)[:, :, :, positions],
                                  atol=1e-6, rtol=0)
    assert kept.relation("text->text", kept.sites[0]).shape[-1] == every.relation("text->text", every.sites[0]).shape[-1]


# ---------------------------------------------------------------------------------------------- read at the kernel
KERNEL = ["qwen", "flux2", "cogview4"]


@pytest.fixture(scope="module")
def kernel_pipes():
    return {name: tiny_pipeline(name) for name in KERNEL}


@pytest.mark.parametrize("family", KERNEL)
def test_relations_read_at_the_kernel_are_blocks_of_the_float64_softmax(kernel_pipes, family):
    """Qwen-Image, Flux.2 and CogView4 (q and k read at scaled_dot_product_attention): every relation against
    test_families' float64 softmax from our own hooks (Qwen's masked text padding included)."""
    pipe = kernel_pipes[family]
    sites = attnprobe.list_sites(pipe)
    plain = kernel_generate(pipe, family)
    denoiser = attnprobe.capture.denoiser_of(pipe)
    with KernelInputs(denoiser, [s.name for s in sites]) as seen:
        with attnprobe.probe(pipe, dtype=torch.float32, relations=ALL, points=POINTS) as store:
            probed = kernel_generate(pipe, family)
    assert torch.equal(plain, probed)
    for site in sites:
        attn = denoiser.get_submodule(site.name)
        for call in range(len(store.calls)):
            index = store.calls[call].index
            probs, image, text = kernel_softmax(family, site.kind, attn, seen.seen[site.name][index],
                                                seen.text_len[index])
            rows = [s.row for s in store.samples]
            blocks = {"image->image": probs[rows][:, :, image][:, :, cells(POINTS, KERNEL_GRID[family])][..., image],
                      "text->image": probs[rows][:, :, text][..., image],
                      "text->text": probs[rows][:, :, text][..., text]}
            for relation, want in blocks.items():
                got = store.relation(relation, site)[call].double()
                got = got.flatten(-2) if relation != "text->text" else got
                assert got.shape == want.shape and (got - want).abs().max() <= 1e-6, (site.name, relation, call)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, match", [
    (dict(relations="image->text"), "the probe's own map"),
    (dict(relations="pixel->pixel"), "not one of"),
    (dict(relations=[]), "not a relation or a list"),
    (dict(relations="image->image"), "needs points"),
    (dict(points=[(0.5, 0.5)]), "pass that too"),
    (dict(relations="text->text", points=[(0.5, 0.5)]), "does not ask for"),
    (dict(relations="image->image", points=[(1.5, 0.5)]), "numbers in \\[0, 1\\]"),
    (dict(relations="image->image", points=[(0.5,)]), "pairs"),
    (dict(relations="image->image", points=[(True, 0.5)]), "pairs"),
    (dict(relations="image->image", points=(0.5, 0.5), aggregate="mean"), "not with aggregate"),
    (dict(relations="image->image", points=(0.5, 0.5), stream_to="folder"), "not with stream_to"),
    (dict(relations="text->image"), "text queries exist only at joint-attention sites"),
])
def test_bad_relations_are_refused_before_generating(cross_pipes, options, match):
    pipe = cross_pipes["sd"]
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ProbeError, match=match):
        with attnprobe.probe(pipe, **options):
            pass
    assert before == {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


def test_a_family_without_relations_is_refused_naming_those_with():
    pipe = tiny_pipeline("auraflow")
    with pytest.raises(ProbeError, match="relations= are read at SD 1.x/2.x.*CogView4; AuraFlowTransformer2DModel"):
        with attnprobe.probe(pipe, relations="image->image", points=(0.5, 0.5)):
            pass


def test_store_relation_errors_and_a_replaced_self_attention(cross_pipes):
    pipe, options = cross_pipes["sd"], CROSS["sd"][1]
    with attnprobe.probe(pipe, sites="mid_block.*", relations="image->image", points=(0.5, 0.5)) as store:
        _generate(pipe, options, prompt=("a dog",))
    with pytest.raises(StoreError, match="holds no 'text->text' relation; it holds \\['image->image'\\]"):
        store.relation("text->text", store.sites[0])
    with pytest.raises(UnknownSiteError, match="holds no site 'up_blocks"):
        store.relation("image->image", "up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    with attnprobe.probe(pipe, sites="mid_block.*") as plain:
        _generate(pipe, options, prompt=("a dog",))
    with pytest.raises(StoreError, match="without relations="):
        plain.relation("image->image", plain.sites[0])
    attn1 = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    original = attn1.processor
    with pytest.raises(ProbeError, match="attn1 \\(read for relations=\\) were changed during the probe"):
        with attnprobe.probe(pipe, sites="mid_block.*", relations="image->image", points=(0.5, 0.5)):
            _generate(pipe, options, prompt=("a dog",), callback_on_step_end=lambda p, i, t, kw: (
                attn1.set_processor(type(original)()) or kw))
    attn1.set_processor(original)


def test_relation_map_is_the_mean_over_calls_and_heads(cross_pipes):
    pipe, options = cross_pipes["sd"], CROSS["sd"][1]
    with attnprobe.probe(pipe, dtype=torch.float32, relations="image->image", points=POINTS) as store:
        _generate(pipe, options, prompt=("a dog",))
    site = store.sites[-1]
    maps = store.relation("image->image", site)
    assert torch.allclose(attnprobe.relation_map(store, "image->image", site, query=2),
                          maps[:, 0, :, 2].mean((0, 1)), atol=1e-7)
    assert torch.allclose(attnprobe.relation_map(store, "image->image", site, calls=[1]), maps[1, 0, :, 0].mean(0))
    for bad in (dict(query=3), dict(sample=1), dict(calls=[2]), dict(calls=[]), dict(query=True), dict(calls=[True]),
                dict(calls={0}), dict(calls="0")):
        with pytest.raises(attnprobe.SelectionError, match="axis|call axis"):
            attnprobe.relation_map(store, "image->image", site, **bad)
    import numpy as np

    same = attnprobe.relation_map(store, "image->image", site, query=np.int64(2), sample=store.samples[0], calls=slice(0, 2))
    assert torch.equal(same, attnprobe.relation_map(store, "image->image", site, query=2))
    assert torch.equal(attnprobe.relation_map(store, "image->image", site, calls=1),
                       attnprobe.relation_map(store, "image->image", site, calls=[1]))
    with pytest.raises(attnprobe.ArgumentTypeError, match="AttentionStore.load"):
        attnprobe.relation_map("store.safetensors", "image->image", site)


def test_nested_probes_with_relations_agree_and_restore_the_processors(cross_pipes):
    pipe, options = cross_pipes["sd"], CROSS["sd"][1]
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    with attnprobe.probe(pipe, sites="mid_block.*", relations="image->image", points=POINTS) as outer:
        with attnprobe.probe(pipe, sites="mid_block.*", relations="image->image", points=POINTS[:1]) as inner:
            _generate(pipe, options, prompt=("a dog",))
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert torch.equal(inner.relation("image->image", name), outer.relation("image->image", name)[:, :, :, :1])
    assert before == {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}


def _resigned(path, edit):
    """The saved store at ``path`` rewritten by ``edit(header, tensors)`` and signed again (a consistent checksum:
    only the header-against-maps checks can tell)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from attnprobe.store.integrity import INTEGRITY_KEY, file_record

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["attnprobe"])
    edit(header, tensors)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(header)
    save_file(tensors, str(path), metadata={"attnprobe": text, INTEGRITY_KEY: file_record(text, tensors)})
    return path


RELATION_KEY = "relation/image->image/mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize("edit, match", [
    (lambda h, t: t.update({RELATION_KEY: t[RELATION_KEY][:, :, :, :1]}), "has shape .* but the header says"),
    (lambda h, t: t.update({RELATION_KEY: torch.cat([t[RELATION_KEY]] * 2, dim=-2) / 2}), "has shape .* but the header says"),
    (lambda h, t: t.update({RELATION_KEY: t[RELATION_KEY] * 3}), "sum to more|outside|probabilit"),
    (lambda h, t: h["meta"]["relations"].update(points=[[0.5, 0.5]]), "has shape .* but the header says"),
    (lambda h, t: t.update({"relation/foo/bar": t[RELATION_KEY]}), "header lists relations"),
    (lambda h, t: t.pop(RELATION_KEY), "header lists relations"),
    (lambda h, t: h["meta"].update(relations=["image->image"]), "relations record is malformed"),
    (lambda h, t: h["meta"]["relations"].update(modules={}), "gives no grid and site"),
])
def test_an_edited_relation_file_is_refused_even_signed_again(cross_pipes, tmp_path, edit, match):
    pipe, options = cross_pipes["sd"], CROSS["sd"][1]
    with attnprobe.probe(pipe, sites="mid_block.*", relations="image->image", points=POINTS[:2]) as store:
        _generate(pipe, options, prompt=("a dog",))
    path = _resigned(store.save(tmp_path / "s.safetensors"), edit)
    with pytest.raises(StoreError, match=match):
        attnprobe.AttentionStore.load(path)
