"""Plain-PyTorch re-implementation of the original CNN-Transformer hybrid (the script users migrate from).

Written from the design description (``../shared/DESIGN.md``, "The original design") and kept
deliberately literal: sequence-first ``nn.MultiheadAttention``, post-norm layers, a 5000-long
sinusoidal buffer saved in the state dict, the DenseNet registered twice (``base_model`` and
``cnn_features``) and a sigmoid at the end. Tests compare qing against it; the throughput
benchmark uses it as the "before" baseline. Not part of the package.
"""

import math

import torch
import torchvision
from torch import nn


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float, max_len: int = 5000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(1))  # (max_len, 1, d): sequence-first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, D)
        return self.dropout(x + self.pe[: x.size(0)])


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, D)
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x))))))


class TransformerEncoder(nn.Module):
    def __init__(self, d_model: int, nhead: int, ffn_dim: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.pos_encoder = PositionalEncoding(d_model, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_encoder(x)
        for layer in self.layers:
            x = layer(x)
        return x


class OriginalHybrid(nn.Module):
    """DenseNet121 features -> 49 tokens -> [cls] + sinusoidal positions -> encoder -> head -> sigmoid."""

    def __init__(
        self,
        num_classes: int = 1,
        d_model: int = 512,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        num_layers: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.base_model = torchvision.models.densenet121(weights=None)
        self.cnn_features = self.base_model.features
        self.feature_projection = nn.Sequential(nn.Linear(1024, d_model), nn.LayerNorm(d_model))
        self.class_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.transformer_encoder = TransformerEncoder(d_model, num_heads, ffn_dim, num_layers, dropout)
        self.classifier = nn.Sequential(
            nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn_features(x)  # (B, 1024, 7, 7), no final ReLU
        tokens = self.feature_projection(features.flatten(2).transpose(1, 2))  # (B, 49, D)
        tokens = torch.cat([self.class_token.expand(x.size(0), -1, -1), tokens], dim=1)
        encoded = self.transformer_encoder(tokens.transpose(0, 1)).transpose(0, 1)  # (B, 50, D)
        combined = torch.cat([encoded[:, 0], encoded[:, 1:].mean(dim=1)], dim=1)
        return torch.sigmoid(self.classifier(combined))
