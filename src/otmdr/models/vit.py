"""Vision Transformers (Dosovitskiy et al. 2021) for small images: 32x32 CIFAR, 28x28 MNIST, 8x8 digits.

Patch size 4 by default (a 32x32 image is an 8x8 grid of 64 tokens, a 28x28 one 7x7). The patch
embedding is a convolution whose stride is the patch size; learned position embeddings are sized
from ``input_size // patch_size``. The blocks are pre-norm: ``x + attn(LN(x))`` then
``x + mlp(LN(x))``, multi-head self-attention through ``F.scaled_dot_product_attention`` and a
GELU MLP. A final LayerNorm, **global average pooling over the tokens** (no class token, as in
Beyer et al. 2022, "Better plain ViT baselines") and a linear head give the logits.

Initialisation: truncated normal (std 0.02, cut at two standard deviations) for the linear layers,
the patch embedding and the position embeddings; zero biases; LayerNorm weight one, bias zero.
Dropout and stochastic depth are options, off by default.

Sizes (10 classes, 3 channels, 32x32, patch 4, MLP ratio 4):

========== ===== ===== ===== ============
name       embed depth heads parameters
========== ===== ===== ===== ============
vit-mini      64     4     4      207,946
vit-tiny     192    12     3    5,362,378
vit-small    384    12     6   21,341,578
========== ===== ===== ===== ============

Each transformer block is one :class:`Block` in ``model.blocks`` (an ``nn.ModuleList``): these
are the units a sharded strategy (FSDP2) wraps one by one, ``fully_shard(block)`` for each, before
the whole model; :func:`wrap_units` lists them (also for an ensemble of ViTs).

An input whose size differs from ``input_size`` (but is a multiple of the patch size) is accepted:
the grid of position embeddings is resized to the input's grid by bilinear interpolation, as when
a ViT is fine-tuned at another resolution (Dosovitskiy et al. 2021, section 3.2). Train at the
data's size: ``otmdr train`` passes the data's image size as ``input_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_sizes
from .registry import register_model

__all__ = ["Attention", "Block", "DropPath", "Mlp", "VisionTransformer", "wrap_units"]


def _trunc_normal(tensor: Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a random
    subset of samples (each with probability ``p``) and scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention: one linear layer for queries, keys and values, the heads'
    ``softmax(q k^T / sqrt(head_dim)) v`` by ``F.scaled_dot_product_attention``, an output projection."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, dim = x.shape
        # (n, tokens, 3 * dim) -> 3 tensors of (n, heads, tokens, head_dim)
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.drop(self.proj(out.transpose(1, 2).reshape(n, tokens, dim)))


class Mlp(nn.Module):
    """Linear, GELU, (dropout), linear, (dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``; one FSDP unit."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT for small images: conv patch embedding, learned position embeddings, pre-norm blocks
    (``self.blocks``, the FSDP units), final LayerNorm, global average pooling, linear head.

    ``drop_path`` is the stochastic-depth rate of the last block, rising linearly from 0 at the
    first; ``dropout`` applies after the embeddings, in the MLPs and after the attention
    projection; ``attn_dropout`` on the attention weights. All three are 0 by default.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, patch_size: int = 4,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        check_sizes(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                    input_size=input_size)
        if patch_size > input_size:
            raise ValueError(f"patch_size ({patch_size}) must be at most input_size ({input_size})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        for name, rate in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.patch_size = patch_size
        #: the grid of patches the position embeddings are learned for (rows, columns)
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout, attn_dropout, rate)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights and position embeddings, zero biases, unit LayerNorms."""
        _trunc_normal(self.pos_embed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _trunc_normal(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """The position embeddings for a ``rows x cols`` grid of patches, ``(1, rows * cols, dim)``:
        the learned ones, bilinearly resized where the grid differs from ``self.grid``."""
        if (rows, cols) == self.grid:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed.reshape(1, self.grid[0], self.grid[1], dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"the input's size {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}: choose a patch_size that divides the image size")
        x = self.patch_embed(x)  # (n, dim, rows, cols)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (n, tokens, dim)
        x = self.pos_drop(x + self.position_embedding(rows, cols))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def wrap_units(model: nn.Module) -> list[nn.Module]:
    """The per-block units a sharded strategy wraps (``fully_shard(unit)`` for each, then the
    whole model): every :class:`Block` of every :class:`VisionTransformer` in ``model`` (one ViT,
    or an ensemble of them), in order. Empty for a model without ViTs."""
    return [block for module in model.modules() if isinstance(module, VisionTransformer) for block in module.blocks]


def _vit(embed_dim: int, depth: int, num_heads: int, description: str):
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, patch_size: int = 4,
              embed_dim: int = embed_dim, depth: int = depth, num_heads: int = num_heads, mlp_ratio: float = 4.0,
              dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0) -> nn.Module:
        return VisionTransformer(num_classes, in_channels, input_size, patch_size, embed_dim, depth, num_heads,
                                 mlp_ratio, dropout, attn_dropout, drop_path)

    build.__doc__ = (f"{description}: embed {embed_dim}, depth {depth}, {num_heads} heads, MLP ratio 4, patch 4, "
                     "average pooling.")
    return build


register_model("vit-mini")(_vit(64, 4, 4, "ViT-Mini (CPU tests and demos)"))
register_model("vit-tiny")(_vit(192, 12, 3, "ViT-Tiny (the sizes of DeiT-Ti, Touvron et al. 2021)"))
register_model("vit-small")(_vit(384, 12, 6, "ViT-Small (the sizes of DeiT-S, Touvron et al. 2021)"))
