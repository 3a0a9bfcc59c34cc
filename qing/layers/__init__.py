"""Building blocks of the qing models: attention, encoder blocks, position encodings."""

from qing.layers.attention import Attention
from qing.layers.encoder import NORM_PLACEMENTS, EncoderBlock
from qing.layers.pos_embed import POS_EMBED_TYPES, LearnedPosEmbed, SinCosPosEmbed, sincos_table

__all__ = [
    "NORM_PLACEMENTS",
    "POS_EMBED_TYPES",
    "Attention",
    "EncoderBlock",
    "LearnedPosEmbed",
    "SinCosPosEmbed",
    "sincos_table",
]
