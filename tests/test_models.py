"""The U-Net's decoders really differ, and shapes are right for any channel count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dust.models import DualDecoderUNet2D, UNet2D


def _has(module: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def test_upsample_flag_is_really_used():
    deconv, bilinear = UNet2D(upsample="deconv"), UNet2D(upsample="bilinear")
    assert _has(deconv.decoder, nn.ConvTranspose2d) and not _has(deconv.decoder, nn.Upsample)
    assert _has(bilinear.decoder, nn.Upsample) and not _has(bilinear.decoder, nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="unknown upsample mode"):
        UNet2D(upsample="nearest-ish")


def test_dual_decoder_shares_encoder_and_decoders_differ():
    torch.manual_seed(0)
    model = DualDecoderUNet2D(in_channels=2, num_classes=3, channels=(4, 8, 16, 32, 64)).eval()
    assert _has(model.decoder, nn.ConvTranspose2d) and not _has(model.decoder, nn.Upsample)
    assert _has(model.aux_decoder, nn.Upsample) and not _has(model.aux_decoder, nn.ConvTranspose2d)
    main, aux = model(torch.rand(2, 2, 32, 32))
    assert main.shape == aux.shape == (2, 3, 32, 32)
    assert not torch.allclose(main, aux)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    single = UNet2D(in_channels=2, num_classes=3, channels=(4, 8, 16, 32, 64))
    assert sum(p.numel() for p in single.encoder.parameters()) == n_encoder  # one shared encoder


def test_standard_unet_size():
    # channels 16-32-64-128-256 as in SSL4MIS: ~1.8 M parameters
    n = sum(p.numel() for p in UNet2D().parameters())
    assert 1.5e6 < n < 2.2e6


@pytest.mark.parametrize(("depth", "kernel"), [(2, 3), (3, 5), (8, 3)])
def test_a_3d_convolution_trains_with_the_right_weight_gradient_under_bf16(depth, kernel):
    """Shallow inputs (depth 2 under a 3x3x3 kernel: a VNet's bottleneck on a 32-deep crop) are where some CPUs'
    bf16 Conv3d weight gradient is garbage; dust's Conv3d must match fp32 on the same bf16-rounded operands there."""
    from dust.models.layers import conv

    torch.manual_seed(0)
    layer = conv(3)(16, 16, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(2, 16, depth, 8, 8).bfloat16().float()
    with torch.no_grad():
        layer.weight.copy_(layer.weight.bfloat16().float())
    upstream = torch.randn(2, 16, depth, 8, 8).bfloat16().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().backward(upstream)
    reference = torch.nn.grad.conv3d_weight(x, layer.weight.shape, upstream, padding=kernel // 2)
    error = (layer.weight.grad - reference).abs().max() / reference.abs().max()
    assert torch.isfinite(layer.weight.grad).all() and error < 0.05
