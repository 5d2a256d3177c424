"""The base branch: UniAD-like transformer reconstruction of frozen backbone features (docs/design.md §1).

Tokens are the h×w feature positions. A linear layer projects C → D; encoder layers refine the
tokens; each decoder layer starts from its own learned query (UniAD's layer-wise queries), attends to
the encoder memory and to the previous decoder output, and a linear layer projects back D → C.
Every attention is neighbour-masked: a token may not attend to its k×k neighbourhood, so it cannot
copy itself and must reconstruct a position from its surroundings. Feature jitter (training only)
adds noise scaled by each token's norm, so the model learns to denoise towards normal features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcad.core.config import BaseBranchConfig
from dcad.core.errors import ModelError


def neighbor_mask(grid: tuple[int, int], k: int) -> Tensor | None:
    """Bool [h·w, h·w]: True where query token i may NOT attend to key token j (j in i's k×k window)."""
    if k == 0:
        return None
    if k % 2 == 0:
        raise ModelError(f"base.neighbor_size={k} must be odd (or 0 to disable the neighbour mask)")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    radius = k // 2
    mask = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    if bool(mask.all(dim=1).any()):
        raise ModelError(f"base.neighbor_size={k} masks every token of the {h}x{w} grid; use a smaller value")
    return mask


def feature_jitter(tokens: Tensor, scale: float, prob: float, generator: torch.Generator | None) -> Tensor:
    """UniAD jitter on [B, L, C] tokens: + N(0,1)·(‖f‖₂/C)·scale per token.

    Applied to each sample independently with probability `prob` (UniAD flips one coin per batch)."""
    batch, _, channels = tokens.shape
    noise_device = generator.device if generator is not None else tokens.device
    noise = torch.randn(tokens.shape, generator=generator, device=noise_device).to(tokens.device, tokens.dtype)
    keep = torch.rand(batch, generator=generator, device=noise_device).to(tokens.device) < prob
    norms = tokens.norm(dim=2, keepdim=True) / channels
    return tokens + noise * norms * scale * keep.view(batch, 1, 1).to(tokens.dtype)


def _attention(cfg: BaseBranchConfig) -> nn.MultiheadAttention:
    """No dropout on attention probabilities: on CPU it forces the slow attention path (~7× slower at
    16×16 tokens); `cfg.dropout` still applies to the residual branches and the feed-forward layers."""
    return nn.MultiheadAttention(cfg.hidden_dim, cfg.num_heads, dropout=0.0, batch_first=True)


class _EncoderLayer(nn.Module):
    """Post-norm self-attention layer; the positional embedding is added to queries and keys (DETR/UniAD)."""

    def __init__(self, cfg: BaseBranchConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.attn = _attention(cfg)
        self.ffn = _FeedForward(cfg)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.drop(self.attn(q, q, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.ffn(x))


class _DecoderLayer(nn.Module):
    """UniAD decoder layer: learned query_i attends to the encoder memory, then to the previous output."""

    def __init__(self, cfg: BaseBranchConfig, num_tokens: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.query = nn.Parameter(torch.randn(num_tokens, d) * 0.02)
        self.memory_attn = _attention(cfg)
        self.output_attn = _attention(cfg)
        self.ffn = _FeedForward(cfg)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, previous: Tensor, memory: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        tgt = self.query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        attended = self.memory_attn(tgt + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.drop1(attended))
        attended = self.output_attn(tgt + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(attended))
        return self.norm3(tgt + self.ffn(tgt))


class _FeedForward(nn.Sequential):
    def __init__(self, cfg: BaseBranchConfig) -> None:
        super().__init__(
            nn.Linear(cfg.hidden_dim, cfg.ffn_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, cfg.hidden_dim),
            nn.Dropout(cfg.dropout),
        )


class BaseReconstructor(nn.Module):
    """Reconstructs [B,C,h,w] features of normal images; one model for all categories."""

    def __init__(self, in_channels: int, grid: tuple[int, int], cfg: BaseBranchConfig,
                 stage_channels: list[int] | None = None) -> None:
        super().__init__()
        if cfg.hidden_dim % cfg.num_heads:
            raise ModelError(f"base.hidden_dim={cfg.hidden_dim} must be divisible by base.num_heads={cfg.num_heads}")
        self.in_channels = in_channels
        self.stage_channels = list(stage_channels or [in_channels])
        if sum(self.stage_channels) != in_channels:
            raise ModelError(f"base branch: stage channels {self.stage_channels} do not add up to {in_channels}")
        self.distance = cfg.distance
        self.grid = (int(grid[0]), int(grid[1]))
        self.jitter_scale = cfg.jitter_scale
        self.jitter_prob = cfg.jitter_prob
        num_tokens = self.grid[0] * self.grid[1]
        self.input_proj = nn.Linear(in_channels, cfg.hidden_dim)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, cfg.hidden_dim) * 0.02)
        self.encoder = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(cfg, num_tokens) for _ in range(cfg.num_decoder_layers))
        self.output_proj = nn.Linear(cfg.hidden_dim, in_channels)
        self.register_buffer("attn_mask", neighbor_mask(self.grid, cfg.neighbor_size), persistent=False)

    def forward(self, feats: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """feats [B,C,h,w] → reconstruction [B,C,h,w]; jitter is applied in training mode only."""
        self._check_input(feats)
        batch, channels, h, w = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)  # [B, L, C]
        if self.training and self.jitter_scale > 0 and self.jitter_prob > 0:
            tokens = feature_jitter(tokens, self.jitter_scale, self.jitter_prob, generator)
        x = self.input_proj(tokens)
        pos = self.pos_embed.unsqueeze(0)
        for layer in self.encoder:
            x = layer(x, pos, self.attn_mask)
        memory, out = x, x
        for layer in self.decoder:
            out = layer(out, memory, pos, self.attn_mask)
        return self.output_proj(out).transpose(1, 2).reshape(batch, channels, h, w)

    def token_error(self, feats: Tensor, recon: Tensor) -> Tensor:
        """[B,1,h,w] per-token error under `base.distance` (what the base map shows and the loss averages)."""
        return token_error(feats, recon, self.distance, self.stage_channels)

    def anomaly_map(self, feats: Tensor, recon: Tensor, image_size: int) -> Tensor:
        """[B,1,S,S]: the per-token error upsampled to the image."""
        return upsample_map(self.token_error(feats, recon), image_size)

    def _check_input(self, feats: Tensor) -> None:
        expected = (self.in_channels, *self.grid)
        if feats.ndim != 4 or tuple(feats.shape[1:]) != expected:
            wanted = ",".join(str(n) for n in expected)
            raise ModelError(f"base branch expects features [B,{wanted}], got {tuple(feats.shape)}")


def token_error(feats: Tensor, recon: Tensor, distance: str = "l2", stage_channels: list[int] | None = None) -> Tensor:
    """[B,1,h,w]: ‖F − F̂‖ over all channels (``l2``), or the mean over backbone stages of 1 − cos(F_s, F̂_s)
    (``cosine``: every stage counts alike, whatever its channel count and feature magnitude)."""
    feats, recon = feats.float(), recon.float()
    if distance == "l2":
        return (feats - recon).pow(2).sum(dim=1, keepdim=True).sqrt()
    if distance != "cosine":
        raise ModelError(f"base.distance: unknown distance '{distance}' (l2 or cosine)")
    splits = stage_channels or [feats.shape[1]]
    errors = [1.0 - F.cosine_similarity(f, r, dim=1, eps=1e-6)
              for f, r in zip(feats.split(splits, dim=1), recon.split(splits, dim=1))]
    return torch.stack(errors).mean(dim=0).unsqueeze(1)


def upsample_map(error: Tensor, image_size: int) -> Tensor:
    """[B,1,h,w] → bilinear to [B,1,S,S]."""
    return F.interpolate(error, size=(image_size, image_size), mode="bilinear", align_corners=False)
