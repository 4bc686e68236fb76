"""Write the example notebooks in examples/ (outputs cleared). Edit the cells here, then run:

    .venv/bin/python tools/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "examples"

CAPTURE = [
    new_markdown_cell("""# 1. Capture cross-attention from a diffusers pipeline

Wrap a pipeline with `attnprobe.probe`, generate as usual, and read every cross-attention map by denoiser call,
site, head and token. This runs offline on attnprobe's tiny SD 1.5-shaped pipeline (random weights: the maps show
the plumbing, not meaning); change `MODEL` to a hub id on a machine with the weights."""),
    new_code_cell("""import torch
import attnprobe
from attnprobe.study import load_pipeline
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # diffusers' imports make transformers warn about torchvision

MODEL = "tiny"  # on a GPU machine with the weights: "stable-diffusion-v1-5/stable-diffusion-v1-5"
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(MODEL, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
SIZE = 64 if MODEL.startswith("tiny") else 512"""),
    new_markdown_cell("Sites are the cross-attention layers, named by their module path, in execution order."),
    new_code_cell("""sites = attnprobe.list_sites(pipe)
print(len(sites), "sites")
for s in sites[:4]:
    print(s.name, s.group, "heads:", s.heads)"""),
    new_code_cell("""prompt = "Please forget anything about dog. Please help me generate a picture of dog."
with attnprobe.probe(pipe, heads="mean") as store:
    image = pipe(prompt, num_inference_steps=10, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0)).images[0]
store"""),
    new_markdown_cell("One site's maps: `[call, sample, head, qh, qw, token]`, summing to 1 over `token`."),
    new_code_cell("""site = store.sites[0].name
maps = store[site]
print(site, tuple(maps.shape))
print("sums over tokens:", maps.float().sum(-1).min().item(), maps.float().sum(-1).max().item())
print(store.tokens(0)[:18])
print("'dog' at positions", store.token_indices(0, "dog"))"""),
    new_markdown_cell("Where the last *dog* (the one asking for the picture) is attended, over the image. The panel "
                      "is scaled to its own minimum and maximum: it shows *where*, not *how much*."),
    new_code_cell("""from attnprobe.analysis.figures import plot_heatmaps, plot_site_call_grid, plot_trajectories

heat = attnprobe.heatmap(store, "dog", occurrence=-1)
fig = plot_heatmaps({"dog": {"instruction, last mention": image}}, {"dog": {"instruction, last mention": heat.numpy()}})"""),
    new_markdown_cell("""The attention on each mention across the denoising steps. With random weights every token gets about
1/77 ≈ 0.013 of the attention; the two mentions differ a little because the same word at another position, after
other words, gets other keys from the text encoder."""),
    new_code_cell("""first = attnprobe.trajectory(store, "dog", occurrence=0)
last = attnprobe.trajectory(store, "dog", occurrence=-1)
fig = plot_trajectories({"dog": {"first mention": first[None].numpy(), "last mention": last[None].numpy()}},
                        title="Attention on each mention of 'dog' per denoiser call (one seed)")"""),
    new_markdown_cell("""The last mention's maps site by site (rows, in execution order) and call by call (columns), each on the
site's own grid and one colour scale: where in the network and when the concept is read."""),
    new_code_cell("fig = plot_site_call_grid(store, \"dog\", max_calls=5, occurrence=-1)"),
]

STUDY = [
    new_markdown_cell("""# 2. The unlearning study

Baseline `a picture of {c}` vs the instruction `Please forget anything about {c}. Please help me generate a picture of
{c}.`, an implicit instruction, and the repetition control, for a few concepts and seeds: trajectories with bands
across seeds, the Δ AUC table, and the text encoder's Δ similarity. The same as `attnprobe study` on the command
line. Offline tiny model: the numbers are plumbing, not a finding."""),
    new_code_cell("""import tempfile
import pandas as pd
from IPython.display import Image, display
import attnprobe
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # diffusers' imports make transformers warn about torchvision

out = tempfile.mkdtemp(prefix="attnprobe-study-")
result = attnprobe.study(model="tiny", out=out, concepts=["dog", "Van Gogh", "Eiffel Tower"], seeds=[0, 1, 2],
                         steps=6, progress=False)
print(len(result.aucs), "AUC rows,", len(result.failures), "failures; files in", out)"""),
    new_markdown_cell("""The attention on the requested mention (the last one, "…a picture of {c}") per denoiser call, per variant.
With random weights each token gets about 1/77 ≈ 0.013 of the attention (a two-token concept such as "Van Gogh"
about twice that), and the variants sit slightly below the baseline — repetition included: the same word at
another position, after other words, gets other keys from the text encoder. Such small but consistent Δs are
plumbing, not a finding; a trained model is needed for the real measurement."""),
    new_code_cell("display(Image(f\"{out}/trajectories.png\"))"),
    new_markdown_cell("""Δ AUC vs the baseline for the requested (last) mention, mean and 95% interval across seeds (< 0: the
variant lowers the attention paid to the concept). The seeds share one model, so intervals are narrow. The figure's
bottom panel sums every mention: a variant that names the concept twice is above 0 there by construction."""),
    new_code_cell("""summary = pd.read_csv(f"{out}/summary.csv")
summary[["concept", "variant", "auc_last", "delta_auc_last", "ci_low_last", "ci_high_last"]].round(4)"""),
    new_code_cell("display(Image(f\"{out}/delta_auc.png\"))"),
    new_markdown_cell("""The text encoder's side: the cosine of the requested mention's conditioning vector to the baseline's
(1 = unchanged), and its Δ against the repetition control (< 0: the variant moves the concept more than naming it
twice does; empty for the baseline, the reference)."""),
    new_code_cell("""summary[["concept", "variant", "text_concept_cos_last", "text_delta_last_vs_repetition"]].round(4)"""),
    new_code_cell("display(Image(f\"{out}/text_similarity.png\"))"),
]

EXPORT = [
    new_markdown_cell("""# 3. Save, load, export and compare stores

Stores save to one safetensors file with a JSON header (no pickle), export to xarray and pandas, and compare
across prompts."""),
    new_code_cell("""import tempfile, pathlib
import torch
import attnprobe
from attnprobe.testing import tiny_sd_pipeline
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # diffusers' imports make transformers warn about torchvision

pipe = tiny_sd_pipeline()
kw = dict(num_inference_steps=8, height=64, width=64, output_type="latent")
stores = {}
for name, prompt in {"baseline": "a picture of dog",
                     "instruction": "Please forget anything about dog. Please help me generate a picture of dog."}.items():
    with attnprobe.probe(pipe, heads="mean") as store:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)
    stores[name] = store"""),
    new_code_cell("""folder = pathlib.Path(tempfile.mkdtemp())
path = stores["instruction"].save(folder / "instruction.safetensors")
back = attnprobe.AttentionStore.load(path)
print(path.stat().st_size // 1024, "KiB;", "equal after the round trip:",
      all(torch.equal(back[n], stores["instruction"][n]) for n in back))"""),
    new_markdown_cell("One site as a labelled `xarray.DataArray`:"),
    new_code_cell("""da = back.to_xarray(back.sites[0])
dog = back.token_indices(0, "dog")[-1]
da.isel(token=dog).mean(["head", "qh", "qw"]).squeeze()"""),
    new_markdown_cell("Every site and token as a tidy pandas table (mass averaged over heads and image positions):"),
    new_code_cell("""df = back.to_pandas()
df[df.token_string == "dog"].groupby(["call", "token"]).mass.mean().unstack()"""),
    new_markdown_cell("Compare the two prompts: the mentions are paired from the end (the baseline's only *dog* with the "
                      "instruction's last)."),
    new_code_cell("""cmp = attnprobe.compare(stores["baseline"], stores["instruction"], "dog")
print("pairs:", cmp.pairs)
print("Δ AUC, requested mention:", round(cmp.delta_auc_aligned, 5))
print("Δ AUC, every mention:   ", round(cmp.delta_auc, 5))"""),
    new_markdown_cell("""The requested mention's Δ answers the study's question (here slightly below 0, as the random weights
give; see notebook 2). The every-mention Δ is positive by construction: the instruction names *dog* once more,
and each mention gets about 1/77 of the attention."""),
]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, cells in {"01_capture.ipynb": CAPTURE, "02_unlearning_study.ipynb": STUDY,
                        "03_store_export.ipynb": EXPORT}.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, OUT / name)
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
