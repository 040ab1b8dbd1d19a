"""The DDPM UNet of Ho et al. (2020), "Denoising Diffusion Probabilistic Models".

The network predicts the noise ``eps`` of ``x_t``: ``forward(x (B,C,H,W), t (B,) int64) -> (B,C,H,W)``.

Layout (as in the DDPM reference code, ``diffusion_tf/models/unet.py``)::

    t ──timestep_embedding(ch)──Linear(ch,4ch)──SiLU──Linear(4ch,4ch)──▶ temb   (added in every ResBlock)
    x ──conv3x3──▶ [level 0: num_res_blocks × (ResBlock [+Attention]), Downsample] ... [last level: no Downsample]
      ──▶ middle: ResBlock, Attention (unless mid_attention=False), ResBlock
      ──▶ [last level .. level 0: (num_res_blocks+1) × (concat skip, ResBlock [+Attention]), Upsample except level 0]
      ──▶ GroupNorm, SiLU, conv3x3 ──▶ eps_pred

Blocks:
  * ``ResBlock``: h = conv3x3(SiLU(GN(x))); h += Linear(SiLU(temb)); h = conv3x3(Dropout(SiLU(GN(h))));
    return skip(x) + h, with skip a 1x1 conv when the channel count changes.
  * ``AttentionBlock``: single- or multi-head self-attention over the H·W positions
    (``F.scaled_dot_product_attention``), pre-GroupNorm, residual.
  * ``Downsample``: conv3x3 with stride 2.  ``Upsample``: nearest ×2 then conv3x3.

Initialisation follows DDPM practice: the last conv of every ResBlock, the output projection of every
AttentionBlock and the network's output conv are zero-initialised, so every residual block starts as the
identity and the untrained network predicts ``eps_pred = 0`` exactly. Other layers keep PyTorch's defaults.

GroupNorm uses ``norm_groups`` groups (32 in DDPM); where a channel count is not divisible by it (small test
networks) the largest divisor of the channel count not above ``norm_groups`` is used instead.

Named configurations live in ``UNET_CONFIGS``; ``build_unet("cifar32", dropout=0.0)`` builds one with overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from isofast.models.embedding import timestep_embedding

__all__ = [
    "UNET_CONFIGS",
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "build_unet",
]


def _group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` (32 for every DDPM width)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_group_count(channels, max_groups), channels, eps=1e-6)


class ResBlock(nn.Module):
    """DDPM residual block with an additive time embedding.

    x: (B, in_ch, H, W), temb: (B, temb_dim) -> (B, out_ch, H, W).
    ``out = skip(x) + conv2(Dropout(SiLU(GN(conv1(SiLU(GN(x))) + Linear(SiLU(temb))))))``; ``conv2`` is
    zero-initialised so the block starts as ``skip(x)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions of a feature map, residual.

    x: (B, C, H, W) -> (B, C, H, W).  ``q, k, v = 1x1conv(GN(x))`` split into ``num_heads`` heads of
    ``C / num_heads`` channels; ``out = x + proj(softmax(q kᵀ / sqrt(C/num_heads)) v)``, computed by
    ``F.scaled_dot_product_attention``. ``proj`` is zero-initialised (the block starts as the identity).
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = _norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (B, 3C, H, W) -> 3 × (B, heads, HW, C/heads): the token axis must be second to last for SDPA.
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a 3x3 convolution with stride 2 (DDPM's ``resamp_with_conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W) by nearest-neighbour ×2 then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a ``UNet``.

    image_size: side of the square input; must be divisible by ``2**(len(channel_mult) - 1)``.
    in_channels / out_channels: image channels (out defaults to in: the network predicts eps).
    base_channels: width ``ch`` of level 0; level ``i`` has ``ch * channel_mult[i]`` channels.
    num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up, as in DDPM).
    attention_resolutions: feature-map sides (e.g. 16) at which an AttentionBlock follows each ResBlock;
        each must be one of the resolutions the network visits (``image_size / 2**i``).
    dropout: dropout probability inside every ResBlock.
    norm_groups: GroupNorm groups (adapted down to a divisor of small channel counts).
    num_heads: attention heads.
    time_embed_dim: width of the time embedding MLP output; ``None`` -> ``4 * base_channels``.
    mid_attention: whether the middle stage has an AttentionBlock between its two ResBlocks (DDPM: yes).
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32
    num_heads: int = 1
    time_embed_dim: int | None = None
    mid_attention: bool = True

    def __post_init__(self) -> None:
        # Accept lists from JSON/CLI and store tuples so the config stays hashable and comparable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        self.validate()

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each level, level 0 first."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("image_size", "in_channels", "base_channels", "norm_groups", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"UNetConfig.out_channels must be a positive int or None, got {self.out_channels!r}")
        if self.time_embed_dim is not None and (
            not isinstance(self.time_embed_dim, int) or self.time_embed_dim < 1
        ):
            raise ValueError(f"UNetConfig.time_embed_dim must be a positive int or None, got {self.time_embed_dim!r}")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be an int >= 1, got {self.num_res_blocks!r}")
        if len(self.channel_mult) == 0 or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig.image_size={self.image_size} is not divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={self.channel_mult} downsamples {len(self.channel_mult) - 1} times)"
            )
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(
                f"UNetConfig.attention_resolutions {bad} are not among the resolutions this network visits "
                f"{self.resolutions}"
            )
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_heads:
                raise ValueError(
                    f"UNetConfig.num_heads={self.num_heads} must divide every level width "
                    f"base_channels*channel_mult = {[self.base_channels * m for m in self.channel_mult]}"
                )


UNET_CONFIGS: dict[str, UNetConfig] = {
    # Oxford Flowers 64x64: 4 levels 64-32-16-8, no attention anywhere (not even in the middle stage).
    "flowers64": UNetConfig(
        image_size=64, in_channels=3, base_channels=64, channel_mult=(1, 2, 4, 8),
        num_res_blocks=2, attention_resolutions=(), dropout=0.0, mid_attention=False,
    ),
    # DDPM's CIFAR-10 model (35.7M parameters): ch=128, mult 1,2,2,2, 2 blocks, attention at 16x16, dropout 0.1.
    "cifar32": UNetConfig(
        image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
        num_res_blocks=2, attention_resolutions=(16,), dropout=0.1,
    ),
    # Tests and CPU demos: 16x16 RGB, 2 levels, attention at the lowest resolution (8x8).
    "tiny": UNetConfig(
        image_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, norm_groups=8,
    ),
    # scikit-learn's bundled 8x8 digits (1 channel): 8 -> 4 with attention at 4x4.
    "digits8": UNetConfig(
        image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2),
        num_res_blocks=2, attention_resolutions=(4,), dropout=0.0, norm_groups=8,
    ),
}


class UNet(nn.Module):
    """DDPM UNet: ``forward(x (B,C,H,W) float, t (B,) int64 timesteps) -> eps_pred (B,C_out,H,W)``.

    ``H`` and ``W`` must equal ``config.image_size`` (attention placement is tied to resolution).
    Works with ``channels_last`` inputs and under ``torch.autocast`` (bf16/fp16): GroupNorm and the
    sinusoidal embedding are computed in float32, the rest follows autocast.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        ch = config.base_channels
        temb_ch = config.time_embed_dim or 4 * ch
        groups = config.norm_groups
        out_ch = config.out_channels or config.in_channels

        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path: remember the width of every tensor pushed on the skip stack.
        self.down = nn.ModuleList()
        skip_widths = [ch]
        width = ch
        n_levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            res = config.resolutions[level]
            for _ in range(config.num_res_blocks):
                blocks = [ResBlock(width, ch * mult, temb_ch, config.dropout, groups)]
                width = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttentionBlock(width, config.num_heads, groups))
                self.down.append(nn.ModuleList(blocks))
                skip_widths.append(width)
            if level != n_levels - 1:
                self.down.append(nn.ModuleList([Downsample(width)]))
                skip_widths.append(width)

        mid: list[nn.Module] = [ResBlock(width, width, temb_ch, config.dropout, groups)]
        if config.mid_attention:
            mid.append(AttentionBlock(width, config.num_heads, groups))
        mid.append(ResBlock(width, width, temb_ch, config.dropout, groups))
        self.mid = nn.ModuleList(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(n_levels)):
            mult = config.channel_mult[level]
            res = config.resolutions[level]
            for _ in range(config.num_res_blocks + 1):
                blocks = [ResBlock(width + skip_widths.pop(), ch * mult, temb_ch, config.dropout, groups)]
                width = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttentionBlock(width, config.num_heads, groups))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(width)]))
        assert not skip_widths

        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"x must have shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        temb = self.time_mlp(timestep_embedding(t, cfg.base_channels))

        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            skips.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(name_or_config: str | UNetConfig = "tiny", **overrides: object) -> UNet:
    """Build a ``UNet`` from a name in ``UNET_CONFIGS`` or a ``UNetConfig``, with field overrides.

    ``build_unet("cifar32", dropout=0.0)``; an unknown name or field raises ValueError naming it.
    """
    if isinstance(name_or_config, UNetConfig):
        config = name_or_config
    elif isinstance(name_or_config, str):
        if name_or_config not in UNET_CONFIGS:
            raise ValueError(f"unknown UNet config {name_or_config!r}; known: {sorted(UNET_CONFIGS)}")
        config = UNET_CONFIGS[name_or_config]
    else:
        raise TypeError(f"name_or_config must be a str or UNetConfig, got {type(name_or_config).__name__}")
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNetConfig field(s) {unknown}; known: {sorted(known)}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return UNet(config)

