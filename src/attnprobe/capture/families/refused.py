"""Denoisers attnprobe refuses by what they are, before the pipeline runs (``Family.refused`` says why): video and
other 3-D denoisers (their queries span latent frames), audio denoisers (no image grid), priors that denoise one
CLIP image embedding (no image positions), Stable Cascade's decoder (no per-token text) and Qwen-Image 2.1 (a
block-causal sequence with a KV cache). Each names the diffusers 0.42 classes it covers; a class it does not name
falls to the generic family, which is refused too unless a probe is told to record it by structure.
"""

from .cascade import is_prior
from .registry import Family, first_text_encoder

VIDEO = Family(
    name="video",
    title="a video or other 3-D denoiser",
    denoisers=(
        "AllegroTransformer3DModel", "AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel",
        "ChronoEditTransformer3DModel", "CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel",
        "CosmosTransformer3DModel", "EasyAnimateTransformer3DModel", "HeliosTransformer3DModel",
        "HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel", "HunyuanVideoFramepackTransformer3DModel",
        "I2VGenXLUNet", "JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel",
        "Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel", "LTXVideoTransformer3DModel",
        "LTX2VideoTransformer3DModel", "LatteTransformer3DModel", "MochiTransformer3DModel",
        "MotifVideoTransformer3DModel", "SanaVideoTransformer3DModel", "SanaWMTransformer3DModel",
        "SkyReelsV2Transformer3DModel", "UNet3DConditionModel", "UNetMotionModel", "UNetSpatioTemporalConditionModel",
        "WanTransformer3DModel", "WanAnimateTransformer3DModel", "WanVACETransformer3DModel",
    ),
    kinds=(),
    text_streams=first_text_encoder,
    refused="it denoises latent frames (frames × height × width), and attnprobe's maps have no frame axis yet "
            "([call, sample, head, qh, qw, token]): its queries would be read as one image grid",
)

AUDIO = Family(
    name="audio",
    title="an audio denoiser",
    denoisers=("AceStepTransformer1DModel", "AudioLDM2UNet2DConditionModel", "LongCatAudioDiTTransformer",
               "StableAudioDiTModel", "StableAudio3DiTModel"),
    kinds=(),
    text_streams=first_text_encoder,
    refused="its queries are positions in an audio latent, not an image grid",
)

PRIOR = Family(
    name="prior",
    title="a CLIP-embedding prior (PriorTransformer)",
    denoisers=("PriorTransformer",),
    kinds=(),
    text_streams=first_text_encoder,
    refused="it denoises one CLIP image embedding, so there are no image positions whose attention to the text "
            "could be recorded; probe the decoder pipeline that turns the embedding into an image",
)

CASCADE_DECODER = Family(
    name="cascade-decoder",
    title="Stable Cascade's decoder (StableCascadeUNet without clip_text_in_channels)",
    denoisers=("StableCascadeUNet",),
    kinds=(),
    text_streams=first_text_encoder,
    matches=lambda denoiser: not is_prior(denoiser),
    pipelines=("StableCascadeDecoder", "StableCascadeCombined"),
    refused="its attention blocks attend to the image and the pooled CLIP text embedding alone (clip_seq keys made "
            "from one vector), never to the prompt's tokens, so there is no token whose attention could be recorded. "
            "Probe the prior instead: StableCascadePriorPipeline (a StableCascadeCombinedPipeline's prior_pipe), "
            "whose prior attends to CLIP's token positions",
)

QWEN_IMAGE_21 = Family(
    name="qwen-image-2.1",
    title="Qwen-Image 2.1 (QwenImage21Transformer2DModel)",
    denoisers=("QwenImage21Transformer2DModel",),
    kinds=(),
    text_streams=first_text_encoder,
    refused="its text and image positions share one block-causal sequence (causal text, the latent slots placed "
            "among the vision-language positions), whose attention runs as one kernel call per segment of that "
            "sequence (or flex attention), and with the default KV cache every step after the first attends from the "
            "target image's queries to keys cached at the first: attnprobe reads one bidirectional kernel call over "
            "[text; image] per site and cannot tell these keys apart exactly",
)

FAMILIES = (VIDEO, AUDIO, PRIOR, CASCADE_DECODER, QWEN_IMAGE_21)
