"""The shapes model: a small Stable-Diffusion-layout pipeline trained on ``attnprobe.models.shapes.scenes`` scenes.

Components (all diffusers / transformers classes, saved as a normal pipeline folder that
``StableDiffusionPipeline.from_pretrained`` loads):

- tokenizer: the real CLIP BPE tokenizer, 16 positions (every caption of the generator fits in 15 tokens);
- text encoder: ``CLIPTextModel`` with **0 layers** — token + position embeddings and the final layer norm, so a
  token's key carries that word (and its slot in the caption) and nothing of the rest of the caption;
- VAE: a 2-level ``AutoencoderKL`` (32 px image ↔ 16 × 16 × 4 latent), trained first as an autoencoder;
- denoiser: a 3-level ``UNet2DConditionModel`` (16, 8, 4 latent cells) with cross-attention at every level;
- scheduler: ``DDIMScheduler`` with Stable Diffusion's betas (scaled linear, 0.00085–0.012, 1000 steps).

``train`` runs the whole recipe on CPU, seeded, and writes the pipeline folder (weights in fp16 safetensors).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..._quiet import quiet_notes
from ...errors import ArgumentError, ModelLoadError
from ..tokenizers import DATA, clip_tokenizer
from . import scenes as shapes

__all__ = ["HELD_OUT", "SIZE", "MAX_TOKENS", "build_components", "make_dataset", "train", "load", "weights_folder"]

SIZE = 32  # image side in pixels
MAX_TOKENS = 16  # tokenizer positions (BOS + 13 words + EOS + 1 pad for the longest caption)
#: colour–shape pairs never drawn in training (reported separately: do the words compose?)
HELD_OUT = frozenset({("red", "triangle"), ("blue", "circle")})
TEXT_WIDTH = 48
UNET_CHANNELS = (48, 96, 96)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def weights_folder() -> Path:
    """The shipped pipeline folder (package data ``attnprobe/models/data/shapes``)."""
    return Path(str(DATA / "shapes"))


@quiet_notes()
def load(dtype: torch.dtype = torch.float32, device="cpu"):
    """The shipped shapes model: a ``StableDiffusionPipeline`` (weights stored in fp16, cast to ``dtype``).

    Raises:
        ModelLoadError: the package was installed without its data (``attnprobe/models/data/shapes``).
    """
    from diffusers import StableDiffusionPipeline

    folder = weights_folder()
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"the shapes model's weights are missing from {folder}: reinstall attnprobe")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    try:  # a 15 MB model: no "Loading pipeline components" bars
        for module, _ in bars:
            module.disable_progress_bar()
        with warnings.catch_warnings():  # diffusers ≥ 0.40 prefers dtype=, which older ones do not take
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    finally:
        for module, enabled in bars:
            if enabled:
                module.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tokenizer():
    """The real CLIP BPE tokenizer (``attnprobe.models.tokenizers.clip_tokenizer``) cut to ``MAX_TOKENS`` (16) positions."""
    tok = clip_tokenizer()
    tok.model_max_length = MAX_TOKENS
    return tok


def text_encoder(seed: int = 0):
    """A seeded ``CLIPTextModel`` with 0 layers, width ``TEXT_WIDTH`` (48), 16 positions: each key is its token's
    embedding plus its position's, after the final layer norm (``[token, 48]`` per prompt)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH,
                            num_hidden_layers=0, num_attention_heads=1, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def vae(seed: int = 0):
    """A seeded 2-level ``AutoencoderKL``: ``[3, 32, 32]`` images in −1..1 ↔ ``[4, 16, 16]`` latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                         layers_per_block=1, sample_size=SIZE)


def unet(seed: int = 0):
    """A seeded 3-level ``UNet2DConditionModel`` on ``[4, 16, 16]`` latents, channels ``UNET_CHANNELS``, cross-attention
    to 48-wide text keys at every level (10 sites, 4 heads each)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=UNET_CHANNELS, down_block_types=("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=4, norm_num_groups=16)


def scheduler():
    """``DDIMScheduler`` with Stable Diffusion's betas (``SCHEDULER``), ``steps_offset=1`` as SD 1.5 ships it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_components(seed: int = 0) -> dict:
    """Untrained components (seeded): the random-weight baseline of the shapes model."""
    return dict(tokenizer=tokenizer(), text_encoder=text_encoder(seed), vae=vae(seed), unet=unet(seed),
                scheduler=scheduler())


def make_dataset(n: int, seed: int, held_out=HELD_OUT):
    """``n`` jittered scenes: images ``[n, 3, 32, 32]`` in −1..1 (float32) and their captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = shapes.render(shapes.sample_objects(rng, held_out), size=SIZE, jitter=rng)
        images[i] = scene.image
        captions.append(scene.caption)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


def _log(path: Path, quiet: bool = False, **row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if not quiet:
        print(json.dumps(row), flush=True)


@quiet_notes()
def train(out: str | Path, seed: int = 0, scenes: int = 30000, vae_steps: int = 1000, unet_steps: int = 4500,
          batch: int = 64, lr: float = 1e-3, ema: float = 0.999, drop_caption: float = 0.1,
          save_every: int = 500, threads: int = 2, quiet: bool = False, overwrite: bool = False) -> Path:
    """Train the shapes model from nothing and write the pipeline folder to ``out`` (fp16 safetensors).

    Deterministic for a given seed and thread count on one machine (torch CPU kernels). Checkpoints the EMA
    pipeline every ``save_every`` denoiser steps, so a stopped run still leaves a usable model. Logs to
    ``out/train.jsonl`` (and prints each row unless ``quiet``).

    Raises:
        ArgumentError (a ValueError): a count < 1, or ``out`` already holds a run (``train.jsonl`` or ``pipeline/``) and not
            ``overwrite``. OSError: ``out`` cannot be made a folder.
    """
    for name, value in (("scenes", scenes), ("vae_steps", vae_steps), ("unet_steps", unet_steps), ("batch", batch),
                        ("save_every", save_every), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be an integer ≥ 1; got {value!r}")
    if seed < 0:
        raise ArgumentError(f"seed must be ≥ 0; got {seed}")
    held = [p for p in ("train.jsonl", "pipeline") if (Path(out) / p).exists()]
    if held and not overwrite:
        raise ArgumentError(f"{str(out)!r} already holds a run ({', '.join(held)}): give another folder, or overwrite=True "
                         "(--overwrite) to replace it")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.jsonl"
    log.write_text("")
    parts = build_components(seed)
    x, captions = make_dataset(scenes, seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.time()

    # 1. the autoencoder: reconstruction (L1 + MSE) with a tiny KL term, as SD's VAE recipe in miniature
    ae = parts["vae"].train()
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(vae_steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        batch_x = x[idx]
        dist = ae.encode(batch_x).latent_dist
        z = dist.sample(generator=gen)
        rec = ae.decode(z).sample
        kl = dist.kl().mean() / (4 * (SIZE // 2) ** 2)
        loss = (rec - batch_x).abs().mean() + (rec - batch_x).pow(2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / vae_steps))
        if step % 100 == 0 or step == vae_steps - 1:
            _log(log, quiet, stage="vae", step=step, loss=round(loss.item(), 5), seconds=round(time.time() - started))
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([ae.encode(x[i:i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
    scale = float(1.0 / latents.std())
    ae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    # 2. the text: ids once (the encoder trains with the UNet, end to end)
    tok = parts["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids

    # 3. the denoiser and the text encoder, epsilon prediction, EMA
    net, te = parts["unet"].train(), parts["text_encoder"].train()
    noise_schedule = DDPMScheduler(**SCHEDULER)
    params = list(net.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_net, ema_te = unet(seed), text_encoder(seed)
    ema_net.load_state_dict(net.state_dict())
    ema_te.load_state_dict(te.state_dict())
    ema_params = list(ema_net.parameters()) + list(ema_te.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    warmup = 200
    for step in range(unet_steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        cond = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < drop_caption
        cond[drop] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        zt = noise_schedule.add_noise(z0, noise, t)
        pred = net(zt, t, te(cond)[0]).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / unet_steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(factor, 0.02)
        opt.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == unet_steps - 1:
            _log(log, quiet, stage="unet", step=step, loss=round(loss.item(), 5), seconds=round(time.time() - started))
        if (step + 1) % save_every == 0 or step == unet_steps - 1:
            pipe = StableDiffusionPipeline(vae=ae, text_encoder=ema_te.eval(), tokenizer=tok, unet=ema_net.eval(),
                                           scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            save(pipe, out / "pipeline")
            _log(log, quiet, stage="saved", step=step + 1, seconds=round(time.time() - started))
    return out / "pipeline"


def save(pipe, folder: Path) -> None:
    """Write ``pipe`` as fp16 safetensors (to a temporary folder, then renamed into place).

    The modules are cast to fp16 and back, so a checkpoint mid-training rounds the EMA weights to fp16 (part of the
    recipe: the shipped weights were trained this way).
    """
    import shutil

    from diffusers.utils import logging as diffusers_logging

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 cast's "modules to keep in float32: []" note
    try:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
    finally:
        diffusers_logging.set_verbosity(level)
    slim_tokenizer(tmp / "tokenizer")
    run_in_fp32(tmp / "text_encoder")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def slim_tokenizer(folder: Path) -> None:
    """Store the tokenizer as CLIP's own vocab.json + merges.txt (1.5 MB, shipped with attnprobe) instead of the
    3.6 MB tokenizer.json that transformers writes: the same tokenizer, loaded the same way."""
    import shutil
    from importlib import resources

    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer.json").unlink(missing_ok=True)
    source = DATA / "clip"
    for name in ("vocab.json", "merges.txt"):
        with resources.as_file(source / name) as path:
            shutil.copyfile(path, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def run_in_fp32(folder: Path) -> None:
    """Mark a transformers model saved in fp16 as one that loads in fp32 (its config's ``dtype``): transformers
    loads a checkpoint in the config's dtype by default and diffusers in fp32, so without this a plain
    ``DiffusionPipeline.from_pretrained(folder)`` mixes fp16 text keys with an fp32 UNet and fails."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
