"""Tests of isofast.models.unet: shapes of every named config, blocks against plain formulas, zero-init,
gradient flow, channels_last and bf16 autocast, config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isofast.models.unet import (
    UNET_CONFIGS,
    AttentionBlock,
    Downsample,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    _group_count,
    build_unet,
)


def _randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (the zero-initialised ones included) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(max(p[0].numel(), 1))))
    return module


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_every_named_config_maps_input_shape_to_itself(name):
    cfg = UNET_CONFIGS[name]
    batch = 1 if name in ("flowers64", "cifar32") else 3
    model = build_unet(name).eval()
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (batch,), dtype=torch.int64)
    with torch.no_grad():
        y = model(x, t)
    assert y.shape == x.shape
    assert y.dtype == torch.float32


def test_cifar32_has_the_ddpm_parameter_count():
    # Ho et al. report 35.7M parameters for their CIFAR-10 model; a wiring mistake changes this number.
    n = sum(p.numel() for p in build_unet("cifar32").parameters())
    assert abs(n / 1e6 - 35.7) < 0.05, n


def test_untrained_network_predicts_zero_and_resblocks_start_as_identity():
    model = build_unet("tiny")
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, torch.tensor([3, 700]))) == 0
    block = ResBlock(32, 32, 64, norm_groups=8)
    h = torch.randn(2, 32, 5, 5)
    assert torch.equal(block(h, torch.randn(2, 64)), h)
    attn = AttentionBlock(32, norm_groups=8)
    assert torch.equal(attn(h), h)


def test_resblock_matches_its_formula():
    torch.manual_seed(1)
    block = _randomize_(ResBlock(12, 20, 16, dropout=0.0, norm_groups=4)).eval()
    x, temb = torch.randn(3, 12, 6, 6), torch.randn(3, 16)
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)),
                 block.conv1.weight, block.conv1.bias, padding=1)
    h = h + (F.silu(temb) @ block.temb_proj.weight.T + block.temb_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6)),
                 block.conv2.weight, block.conv2.bias, padding=1)
    ref = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, temb), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_explicit_softmax_attention(heads):
    torch.manual_seed(2)
    c, hh, ww = 16, 3, 5
    block = _randomize_(AttentionBlock(c, num_heads=heads, norm_groups=4))
    x = torch.randn(2, c, hh, ww, dtype=torch.float64)
    block = block.double()
    n = F.group_norm(x, 4, block.norm.weight, block.norm.bias, 1e-6)
    qkv = torch.einsum("oc,bcp->bop", block.qkv.weight[:, :, 0, 0], n.flatten(2)) + block.qkv.bias[None, :, None]
    q, k, v = qkv.chunk(3, dim=1)  # each (B, C, HW)
    d = c // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (z[:, i * d:(i + 1) * d] for z in (q, k, v))
        w = torch.softmax(torch.einsum("bdi,bdj->bij", qi, ki) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("bij,bdj->bdi", w, vi))
    a = torch.cat(outs, dim=1).reshape(2, c, hh, ww)
    ref = x + F.conv2d(a, block.proj.weight, block.proj.bias)
    torch.testing.assert_close(block(x), ref, atol=1e-10, rtol=1e-10)


def test_down_and_upsample_shapes_and_upsample_is_nearest_then_conv():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6)
    assert Downsample(8)(x).shape == (2, 8, 3, 3)
    up = Upsample(8)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_gradient_reaches_every_parameter_of_tiny():
    model = _randomize_(build_unet("tiny"), seed=4)
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.tensor([1, 999])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_still_lets_the_output_conv_learn():
    model = build_unet("tiny")
    model(torch.randn(2, 3, 16, 16), torch.tensor([5, 6])).sub(1.0).square().mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_output_depends_on_timestep():
    model = _randomize_(build_unet("digits8"), seed=5).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    y = model(x, torch.tensor([10, 900]))
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_channels_last_gives_the_same_output():
    model = _randomize_(build_unet("tiny"), seed=6).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = _randomize_(build_unet("tiny"), seed=7).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 300])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 5e-2, rel


def test_group_count_adapts_to_small_widths():
    assert _group_count(256, 32) == 32
    assert _group_count(48, 32) == 24
    assert _group_count(3, 32) == 3
    assert _group_count(32, 8) == 8


def test_bad_configs_raise_value_error_naming_the_field():
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(image_size=32, attention_resolutions=(12,))
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="no_such_net"):
        build_unet("no_such_net")
    with pytest.raises(ValueError, match="widht"):
        build_unet("tiny", widht=3)
    with pytest.raises(ValueError, match="image_size"):
        build_unet("tiny", image_size=17)
    with pytest.raises(TypeError):
        UNet("tiny")  # type: ignore[arg-type]


def test_build_unet_applies_overrides():
    model = build_unet("tiny", in_channels=1, image_size=8, base_channels=16)
    assert model.config.in_channels == 1 and model.config.image_size == 8
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    assert build_unet(UNET_CONFIGS["digits8"]).config == UNET_CONFIGS["digits8"]


def test_forward_rejects_wrong_shapes():
    model = build_unet("tiny")
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


def test_config_round_trips_through_json():
    import dataclasses
    import json

    for cfg in UNET_CONFIGS.values():
        again = UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert again == cfg
