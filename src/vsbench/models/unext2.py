"""UNeXt2-style ConvNeXt encoder/decoder for 3D stacks (after VisCy's UNeXt2, Liu et al. 2024).

A 3D stem folds the Z stack into channels (a Conv3d whose kernel spans the
whole training depth), 2D ConvNeXt stages do the work at low cost, and a
pixel-to-voxel head unfolds channels back into Z (a pixel-shuffle in Y/X and a
channel → Z reshape) followed by a small 3D refinement. The training depth
`in_stack_depth` is fixed by the weights; other depths are handled inside
`forward` (shallower stacks are edge-padded, deeper ones are predicted in
half-overlapping Z windows blended with tent weights), so the model keeps the
registry's any-size contract and a Z-window predictor can use `z_window` to
avoid the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vsbench.models._registry import register


def unext2_config(settings: Mapping) -> dict:
    return {
        "in_channels": 1,
        "out_channels": 1,
        "in_stack_depth": int(settings["crop"][0]),
        "base_channels": int(settings["base_channels"]),
        "depth": int(settings["depth"]),
        "blocks": int(settings.get("blocks", 2)),
        "stem_stride": int(settings.get("stem_stride", 2)),
    }


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map (ConvNeXt's channels_first norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7 → LayerNorm → 1×1 expand (4×) → GELU → 1×1 project, layer-scaled residual.

    The layer scale starts at 0.1 rather than ConvNeXt's 1e-6: campaigns train
    small models for few epochs, so blocks must contribute from the first step.
    """

    def __init__(self, dim: int, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def _tent(n: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=torch.float32)
    w = torch.minimum(i + 1, n - i)
    return w / w.max()


@register("unext2", config=unext2_config)
class UNeXt2(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        in_stack_depth: int = 8,
        base_channels: int = 16,
        depth: int = 3,
        blocks: int = 2,
        stem_stride: int = 2,
        head_channels: int = 4,
    ):
        super().__init__()
        if min(in_stack_depth, base_channels, depth, blocks, stem_stride, head_channels) < 1:
            raise ValueError("UNeXt2 sizes must all be >= 1")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.z_window, self.depth, self.head_channels = in_stack_depth, depth, head_channels
        d = stem_stride * 2 ** (depth - 1)
        self.divisibility = (1, d, d)
        dims = [base_channels * 2**i for i in range(depth)]
        s = stem_stride
        self.stem = nn.Conv3d(in_channels, dims[0], (in_stack_depth, s, s), stride=(1, s, s))
        self.stem_norm = LayerNorm2d(dims[0])
        self.downs = nn.ModuleList()
        self.encoders = nn.ModuleList()
        for i, dim in enumerate(dims):
            if i > 0:
                self.downs.append(
                    nn.Sequential(
                        LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)
                    )
                )
            self.encoders.append(nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(blocks)]))
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(depth - 1):
            # pixel-shuffle upsampling: dims[i+1] → 4·dims[i] channels → 2× in Y and X
            self.ups.append(
                nn.Sequential(nn.Conv2d(dims[i + 1], 4 * dims[i], 1), nn.PixelShuffle(2))
            )
            self.fuse.append(nn.Conv2d(2 * dims[i], dims[i], 1))
            self.decoders.append(nn.Sequential(*[ConvNeXtBlock(dims[i]) for _ in range(blocks)]))
        self.head_2d = nn.Sequential(
            LayerNorm2d(dims[0]),
            nn.Conv2d(dims[0], head_channels * in_stack_depth * s * s, 1),
            nn.PixelShuffle(s),
        )
        self.head_3d = nn.Sequential(
            nn.Conv3d(head_channels, head_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(head_channels, out_channels, 1),
        )

    def _forward_window(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, z_window, Y, X) with Y, X divisible → (B, C_out, z_window, Y, X)."""
        b, _, z, h, w = x.shape
        x = self.stem_norm(self.stem(x)[:, :, 0])
        skips = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = self.downs[i - 1](x)
            x = enc(x)
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = self.ups[i](x)
            x = self.decoders[i](self.fuse[i](torch.cat([skips[i], x], dim=1)))
        x = self.head_2d(x).reshape(b, self.head_channels, z, h, w)
        return self.head_3d(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, h, w = x.shape[-3:]
        pad_y, pad_x = (-h) % self.divisibility[1], (-w) % self.divisibility[2]
        pad_z = max(0, self.z_window - z)
        if pad_y or pad_x or pad_z:
            x = F.pad(x, (0, pad_x, 0, pad_y, 0, pad_z), mode="replicate")
        zw = self.z_window
        if x.shape[2] == zw:
            out = self._forward_window(x)
        else:
            n = x.shape[2]
            stride = max(1, zw // 2)
            starts = [*range(0, n - zw, stride), n - zw]
            tent = _tent(zw, x.device).reshape(1, 1, zw, 1, 1)
            out = x.new_zeros((x.shape[0], self.out_channels, *x.shape[2:]))
            wsum = x.new_zeros((1, 1, n, 1, 1))
            for z0 in starts:
                out[:, :, z0 : z0 + zw] += self._forward_window(x[:, :, z0 : z0 + zw]) * tent
                wsum[:, :, z0 : z0 + zw] += tent
            out = out / wsum
        return out[..., :z, :h, :w]
