"""TSViT: temporo-spatial vision transformer for satellite image time series.

Tarasiou, Chavez and Zafeiriou, "ViTs for SITS: Vision Transformers for Satellite Image Time
Series", CVPR 2023. A readable re-implementation: attention factorised first over time (per
patch location), then over space (per class).

::

    x (B, T, C, H, W)        doy (B, T) in 0..365
      | p x p patches, flattened (p p C)      | one-hot(366) -> Linear(366, d)
      v                                       v
    patch_embedding: Linear(p*p*C, d)  +  temporal encoding              -> (B*N, T, d)
      | prepend K class tokens (temporal_token)                          -> (B*N, K+T, d)
    temporal_encoder: depth_t pre-norm blocks + LayerNorm  (per patch location)
      | keep the K class outputs, regroup per class                      -> (B*K, N, d)
      | + space_pos_embedding (N, d)
    space_encoder: depth_s pre-norm blocks + LayerNorm    (per class)
      | mlp_head: LayerNorm + Linear(d, p*p), unpatchify                 -> (B, K, H, W)
      | optional class_adapter: Linear(K -> K') over the class axis      -> (B, K', H, W)

A block is ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. The attention has separate bias-free
``q``, ``k``, ``v`` linears (parameter count equal to the paper's fused bias-free ``to_qkv``) and an
output ``o`` with bias; it reads ``num_heads`` and ``head_dim`` from its attributes so heads can be
pruned by slicing q/k/v rows and o columns and lowering ``num_heads``. FFN sizes are read from
``mlp.fc1``/``mlp.fc2``. Module names (the contract used by :mod:`slimtune.families.tsvit`):

- ``patch_embedding``, ``temporal_embedding`` (Linear), ``temporal_token`` (Parameter (1, K, d)),
  ``space_pos_embedding`` (Parameter (1, N, d));
- ``temporal_encoder.layers.{i}`` and ``space_encoder.layers.{i}`` (:class:`TSViTBlock`), each
  with ``norm1``, ``attn.{q,k,v,o}``, ``norm2``, ``mlp.{fc1,fc2}``; final norms
  ``temporal_encoder.norm`` / ``space_encoder.norm``;
- ``mlp_head.0`` (LayerNorm), ``mlp_head.1`` (Linear(d, p*p)), optional ``class_adapter``.

The PASTIS configuration (d=128, p=2, C=10, K=19, N=144, 4+4 blocks, FFN 512) has exactly
:data:`PASTIS_NUM_PARAMS` parameters::

    patch 40*128+128 + time 366*128+128 + tokens 19*128 + pos 144*128 + head 2*128+128*4+4
    + 2 * (4 * (2*2*128 + 3*128*128 + 128*128+128 + 128*512+512 + 512*128+128) + 2*128)
    = 1,657,476

The logits are un-patchified in the natural order (pixel (i*p + a, j*p + b) comes from patch
(i, j), output a*p + b).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TSViTConfig",
    "TSViT",
    "TSViTBlock",
    "TSViTAttention",
    "TSViTMLP",
    "TSViTEncoder",
    "PASTIS_NUM_PARAMS",
    "DAYS",
]

PASTIS_NUM_PARAMS = 1_657_476
"""Parameter count of TSViT in the paper's PASTIS configuration (:meth:`TSViTConfig.pastis`)."""

DAYS = 366
"""Size of the day-of-year one-hot vocabulary (0..365)."""


@dataclass
class TSViTConfig:
    """Architecture of a :class:`TSViT`."""

    img_size: int = 24
    """Tile height and width in pixels (square tiles)."""
    patch_size: int = 2
    """Patch side ``p``; ``img_size`` must be a multiple of it."""
    num_channels: int = 10
    """Spectral bands ``C`` per image (10 for Sentinel-2)."""
    num_classes: int = 19
    """Number of class tokens ``K`` (and of output classes unless ``head_classes`` is set)."""
    max_seq_len: int = 60
    """Largest number of acquisitions ``T`` accepted."""
    dim: int = 128
    """Token width ``d``."""
    temporal_depth: int = 4
    """Blocks of the temporal encoder."""
    spatial_depth: int = 4
    """Blocks of the spatial encoder."""
    num_heads: int = 4
    """Attention heads per block."""
    head_dim: int = 32
    """Width of one attention head."""
    mlp_dim: int = 512
    """Hidden width of the blocks' FFN."""
    dropout: float = 0.0
    """Dropout inside the blocks (attention output and FFN)."""
    emb_dropout: float = 0.0
    """Dropout on the encoders' input tokens."""
    head_classes: int | None = None
    """If set, a ``class_adapter`` Linear(num_classes -> head_classes) maps the logits."""

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "num_channels",
            "num_classes",
            "max_seq_len",
            "dim",
            "temporal_depth",
            "spatial_depth",
            "num_heads",
            "head_dim",
            "mlp_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TSViTConfig.{name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"TSViTConfig.img_size ({self.img_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        for name in ("dropout", "emb_dropout"):
            value = float(getattr(self, name))
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TSViTConfig.{name} must be in [0, 1), got {value!r}")
        hc = self.head_classes
        if hc is not None and (not isinstance(hc, int) or hc < 1):
            raise ValueError(f"TSViTConfig.head_classes must be None or >= 1, got {hc!r}")

    @property
    def num_patches(self) -> int:
        """Patch locations ``N`` per tile."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def out_classes(self) -> int:
        """Number of output classes (channels of the logits)."""
        return self.head_classes if self.head_classes is not None else self.num_classes

    @classmethod
    def pastis(cls, **overrides: Any) -> TSViTConfig:
        """The paper's PASTIS configuration (24x24, T <= 60, 10 bands, 19 classes)."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> TSViTConfig:
        """A small configuration that trains on a CPU (d=64, 2+2 layers, 4 heads of 16)."""
        base: dict[str, Any] = {
            "dim": 64,
            "temporal_depth": 2,
            "spatial_depth": 2,
            "num_heads": 4,
            "head_dim": 16,
            "mlp_dim": 128,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> TSViTConfig:
        """A tiny configuration for tests (8x8 tiles, d=16, 1+1 layers, 2 heads of 8)."""
        base: dict[str, Any] = {
            "img_size": 8,
            "num_classes": 3,
            "max_seq_len": 12,
            "dim": 16,
            "temporal_depth": 1,
            "spatial_depth": 1,
            "num_heads": 2,
            "head_dim": 8,
            "mlp_dim": 32,
        }
        return cls(**{**base, **overrides})


class TSViTAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v (no bias) and an output projection ``o``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.o = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of ``x`` (batch, tokens, dim)."""
        b, n, _ = x.shape
        h, hd = self.num_heads, self.head_dim

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, h, hd).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.dropout(self.o(out.transpose(1, 2).reshape(b, n, h * hd)))


class TSViTMLP(nn.Module):
    """Feed-forward network ``fc2(dropout(gelu(fc1(x))))``; its neurons are fc1's rows."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the FFN to ``x`` (..., dim)."""
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class TSViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TSViTAttention(dim, num_heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TSViTMLP(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Transform ``x`` (batch, tokens, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TSViTEncoder(nn.Module):
    """A stack of :class:`TSViTBlock` (``layers``) followed by a LayerNorm (``norm``)."""

    def __init__(self, cfg: TSViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TSViTBlock(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.dropout)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        """Run every block then the final norm on ``x`` (batch, tokens, dim)."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TSViT(nn.Module):
    """TSViT for semantic segmentation of satellite image time series (see module docstring).

    Args:
        config: the architecture; ``model.config`` keeps it (``config.num_classes`` is the number
            of class tokens, read by the prompt method through the family).
    """

    def __init__(self, config: TSViTConfig) -> None:
        super().__init__()
        self.config = config
        c, d, p = config, config.dim, config.patch_size
        self.patch_embedding = nn.Linear(p * p * c.num_channels, d)
        self.temporal_embedding = nn.Linear(DAYS, d)
        # Standard normal initialisation of the learned tokens, as in the paper.
        self.temporal_token = nn.Parameter(torch.randn(1, c.num_classes, d))
        self.temporal_encoder = TSViTEncoder(c, c.temporal_depth)
        self.space_pos_embedding = nn.Parameter(torch.randn(1, c.num_patches, d))
        self.space_encoder = TSViTEncoder(c, c.spatial_depth)
        self.dropout = nn.Dropout(c.emb_dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, p * p))
        self.class_adapter: nn.Linear | None = (
            nn.Linear(c.num_classes, c.head_classes) if c.head_classes is not None else None
        )

    @classmethod
    def pastis(cls, **overrides: Any) -> TSViT:
        """TSViT in the paper's PASTIS configuration (1,657,476 parameters)."""
        return cls(TSViTConfig.pastis(**overrides))

    @classmethod
    def small(cls, **overrides: Any) -> TSViT:
        """TSViT in the small CPU configuration (:meth:`TSViTConfig.small`)."""
        return cls(TSViTConfig.small(**overrides))

    def _check(self, x: Tensor, doy: Tensor) -> None:
        c = self.config
        if x.dim() != 5:
            raise ValueError(f"TSViT expects x of shape (B, T, C, H, W), got {tuple(x.shape)}")
        b, t, ch, h, w = x.shape
        if ch != c.num_channels or h != c.img_size or w != c.img_size:
            raise ValueError(
                f"TSViT expects x (B, T, {c.num_channels}, {c.img_size}, {c.img_size}), "
                f"got {tuple(x.shape)}"
            )
        if t > c.max_seq_len:
            raise ValueError(f"TSViT accepts at most {c.max_seq_len} dates, got T={t}")
        if tuple(doy.shape) != (b, t) or doy.is_floating_point():
            raise ValueError(
                f"TSViT expects integer doy of shape ({b}, {t}), got {doy.dtype} {tuple(doy.shape)}"
            )
        if doy.numel() and (int(doy.min()) < 0 or int(doy.max()) >= DAYS):
            raise ValueError(
                f"day of year must lie in 0..{DAYS - 1}, got {int(doy.min())}..{int(doy.max())}"
            )

    def forward(self, x: Tensor, doy: Tensor) -> Tensor:
        """Segment a batch of time series.

        Args:
            x: images (B, T, C, H, W), float.
            doy: day of year (B, T), integer in 0..365.

        Returns:
            Logits (B, K, H, W), ``K = config.out_classes``.
        """
        self._check(x, doy)
        c = self.config
        b, t, ch, hh, ww = x.shape
        p = c.patch_size
        gh, gw = hh // p, ww // p
        n = gh * gw
        k = self.temporal_token.shape[1]
        # Patches (B*N, T, p*p*C), flattened in (p_row, p_col, band) order.
        patches = x.reshape(b, t, ch, gh, p, gw, p).permute(0, 3, 5, 1, 4, 6, 2)
        tokens = self.patch_embedding(patches.reshape(b * n, t, p * p * ch))
        when = self.temporal_embedding(F.one_hot(doy.long(), DAYS).to(tokens.dtype))  # (B, T, d)
        tokens = tokens + when[:, None].expand(b, n, t, -1).reshape(b * n, t, -1)
        cls = self.temporal_token.to(tokens.dtype).expand(b * n, -1, -1)
        tokens = self.temporal_encoder(self.dropout(torch.cat([cls, tokens], dim=1)))
        # Keep the K class outputs and regroup them per class: (B*K, N, d).
        tokens = tokens[:, :k].reshape(b, n, k, -1).transpose(1, 2).reshape(b * k, n, -1)
        tokens = self.space_encoder(self.dropout(tokens + self.space_pos_embedding))
        pix = self.mlp_head(tokens)  # (B*K, N, p*p)
        logits = pix.reshape(b, k, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, k, hh, ww)
        if self.class_adapter is not None:
            logits = self.class_adapter(logits.movedim(1, -1)).movedim(-1, 1)
        return logits

    def adapt_classes(self, new_k: int, mode: str = "tokens", *, reset_head: bool = False) -> TSViT:
        """Change the number of output classes for transfer (e.g. PASTIS 19 -> wheat/other 2).

        Call it on the base model, before :func:`slimtune.apply`.

        Args:
            new_k: number of output classes (>= 1).
            mode: ``"tokens"`` replaces the K class tokens by ``new_k`` fresh ones (standard
                normal) and drops any class adapter; the per-pixel head is shared by all classes
                and is kept unless ``reset_head``. ``"linear"`` keeps the K tokens and adds (or
                replaces) ``class_adapter`` = Linear(K -> new_k) on the logits.
            reset_head: re-initialise ``mlp_head`` (``"tokens"`` mode only).

        Returns:
            ``self``, with ``config`` updated (``num_classes`` or ``head_classes``).
        """
        if not isinstance(new_k, int) or new_k < 1:
            raise ValueError(f"new_k must be a positive integer, got {new_k!r}")
        ref = self.temporal_token
        if mode == "tokens":
            self.temporal_token = nn.Parameter(
                torch.randn(1, new_k, ref.shape[-1], device=ref.device, dtype=ref.dtype)
            )
            self.class_adapter = None
            self.config = replace(self.config, num_classes=new_k, head_classes=None)
            if reset_head:
                for m in self.mlp_head:
                    m.reset_parameters()  # type: ignore[operator]
        elif mode == "linear":
            if reset_head:
                raise ValueError("reset_head is only meaningful with mode='tokens'")
            k = ref.shape[1]
            self.class_adapter = nn.Linear(k, new_k, device=ref.device, dtype=ref.dtype)
            self.config = replace(self.config, head_classes=new_k)
        else:
            raise ValueError(f"adapt_classes mode must be 'tokens' or 'linear', got {mode!r}")
        return self

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"img={c.img_size}, p={c.patch_size}, C={c.num_channels}, K={c.num_classes}, "
            f"d={c.dim}, depth={c.temporal_depth}+{c.spatial_depth}, "
            f"heads={c.num_heads}x{c.head_dim}, mlp={c.mlp_dim}"
        )
