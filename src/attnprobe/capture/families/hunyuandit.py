"""HunyuanDiT (``HunyuanDiT2DModel``): a DiT whose ``attn2`` cross-attends to two encoders' positions joined along
the sequence — the bilingual CLIP (BERT) encoder's 77, then the mT5 encoder's 256 (``encoder_hidden_states_t5``,
projected by the transformer) — with the rotary embedding on the queries only; read at the kernel. Padding positions
are not masked: the transformer replaces them with a learned padding embedding, which keeps attention."""

from .registry import Family


def _bert_then_t5(pipe):
    return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]


FAMILY = Family(
    name="hunyuandit",
    title="HunyuanDiT (HunyuanDiT2DModel)",
    denoisers=("HunyuanDiT2DModel",),
    kinds=("cross",),
    text_streams=_bert_then_t5,
    reader="kernel",
)
