"""Building blocks of the qing models: attention, encoder blocks, position encodings, heads, token dropout."""

from qing.layers.attention import Attention
from qing.layers.encoder import NORM_PLACEMENTS, EncoderBlock
from qing.layers.pos_embed import POS_EMBED_TYPES, LearnedPosEmbed, SinCosPosEmbed, sincos_table
from qing.layers.residual_head import ResidualHead
from qing.layers.token_dropout import TokenDropout

__all__ = [
    "NORM_PLACEMENTS",
    "POS_EMBED_TYPES",
    "Attention",
    "EncoderBlock",
    "LearnedPosEmbed",
    "ResidualHead",
    "SinCosPosEmbed",
    "TokenDropout",
    "sincos_table",
]
