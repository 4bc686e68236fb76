"""Models attnprobe builds or ships, so that everything runs offline: tiny pipelines of every supported family with
seeded random weights, real configs on the ``meta`` device, tokenizers from shipped files, the trained shapes model,
stores with known answers, and the loader of any pipeline by name.

- ``tiny``: ``tiny_sd_pipeline``, ``tiny_sdxl_pipeline``, ``tiny_sd3_pipeline``, ``tiny_flux_pipeline``,
  ``tiny_pixart_pipeline``, ``full_size_pipeline``, ``tiny_clip``, ``shapes_pipeline``; built from
  ``components`` (seeded encoders, VAEs, schedulers); ``tiny_pipeline(name)`` builds any of them by name.
- ``tiny_llm``: the tiny pipelines of families with an LLM text encoder (Sana, Qwen-Image, Flux.2).
- ``tiny_dits``: the tiny pipelines of newer DiT families (PRX).
- ``tiny_vlm``: more of them, whose vision-language encoder also rewrites prompts (LongCat-Image).
- ``tiny_video``: the tiny video pipelines (Wan 2.1, SkyReels-V2, CogVideoX), whose maps have a frame axis.
- ``tiny_ltx``: the tiny LTX-Video pipeline (packed video latents, a frame axis too).
- ``tiny_allegro``, ``tiny_sana_video``, ``tiny_mochi``: the tiny Allegro, Sana-Video and Mochi 1 pipelines, frame axis too.
- ``tiny_unets``: the tiny pipelines of UNets that are not ``UNet2DConditionModel`` (Kandinsky 3, Stable Cascade's
  prior).
- ``configs``: real UNet and transformer configs and ``unet_on_meta`` / ``transformer_on_meta``.
- ``tokenizers``: the real CLIP tokenizer (``data/clip``), an offline T5-style one and an LLM-style one with a chat
  template.
- ``shapes``: the shapes model: its scenes with ground truth, the model and its training, its evaluation.
- ``synthetic``: ``synthetic_store`` and ``synthetic_video_store``, stores with known answers.
- ``loader``: ``load_pipeline(name)``: the offline models by name, else a hub id or folder.

``attnprobe.testing`` re-exports the builders for tests and users; nothing in the library imports it.
"""

from .loader import OFFLINE_MODELS, TINY_MODELS, load_pipeline

__all__ = ["load_pipeline", "TINY_MODELS", "OFFLINE_MODELS"]
