"""FNet3D-style 3D UNet (the issue's `fnet3d`), registered as `unet3d`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vsbench.models._registry import register


def z_levels_for(crop_z: int, depth: int, min_z: int = 2) -> int:
    """How many levels may halve Z so the coarsest level keeps >= `min_z` slices."""
    levels = 0
    while levels < depth and crop_z // 2 ** (levels + 1) >= min_z:
        levels += 1
    return levels


def unet3d_config(settings: Mapping) -> dict:
    depth = int(settings["depth"])
    return {
        "in_channels": 1,
        "out_channels": 1,
        "base_channels": int(settings["base_channels"]),
        "depth": depth,
        "z_levels": z_levels_for(int(settings["crop"][0]), depth),
        "inplane_levels": 1,
    }


def _double_conv(c_in: int, c_out: int, kernels: tuple[int, int]) -> nn.Sequential:
    """Two conv+BN+ReLU; `kernels` gives each conv's Z extent (3 = 3×3×3, 1 = in-plane 1×3×3)."""
    layers = []
    for i, kz in enumerate(kernels):
        layers += [
            nn.Conv3d(
                c_in if i == 0 else c_out, c_out, (kz, 3, 3), padding=(kz // 2, 1, 1), bias=False
            ),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


@register("unet3d", config=unet3d_config)
class UNet3D(nn.Module):
    """FNet3D-style UNet (Ounkomol et al. 2018): two conv+BN+ReLU per level,
    channels doubling in the first conv of each deeper level, strided-conv
    downsampling, transposed-conv upsampling, skip concatenation.

    Downsampling is always 2× in Y and X; in Z only for the first `z_levels`
    levels, because microscopy stacks are thin (a 2 µm-step stack may have 8–16
    slices): `z_levels_for` picks it from the training crop so Z never falls
    below 2 slices. Strided convs (not max-pooling) keep the CUDA backward
    deterministic.

    The finest `inplane_levels` levels use in-plane 1×3×3 kernels after a
    3×3×3 stem: voxels are strongly anisotropic (Z step ~6× the XY pixel in the
    demo), so, as nnU-Net does for anisotropic spacing, Z context at full
    resolution comes from the stem and the coarser 3×3×3 levels. It also makes
    CPU training ~3× faster (3×3×3 backward with few channels is slow on CPU).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 8,
        depth: int = 2,
        z_levels: int | None = None,
        inplane_levels: int = 1,
    ):
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError("UNet3D needs depth >= 1 and base_channels >= 1")
        z_levels = depth if z_levels is None else int(z_levels)
        if not 0 <= z_levels <= depth:
            raise ValueError(f"z_levels must be in [0, depth={depth}], got {z_levels}")
        if not 0 <= inplane_levels <= depth:
            raise ValueError(f"inplane_levels must be in [0, depth={depth}], got {inplane_levels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth, self.z_levels, self.inplane_levels = depth, z_levels, inplane_levels
        self.divisibility = (2**z_levels, 2**depth, 2**depth)
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth):
            kz = 1 if level < inplane_levels else 3
            c_in = in_channels if level == 0 else chans[level - 1]
            self.encoders.append(_double_conv(c_in, chans[level], (3 if level == 0 else kz, kz)))
            self.decoders.append(_double_conv(2 * chans[level], chans[level], (kz, kz)))
            k = (2 if level < z_levels else 1, 2, 2)
            self.downs.append(
                nn.Sequential(
                    nn.Conv3d(chans[level], chans[level], k, stride=k, bias=False),
                    nn.BatchNorm3d(chans[level]),
                    nn.ReLU(inplace=True),
                )
            )
            self.ups.append(
                nn.Sequential(
                    nn.ConvTranspose3d(chans[level + 1], chans[level], k, stride=k, bias=False),
                    nn.BatchNorm3d(chans[level]),
                    nn.ReLU(inplace=True),
                )
            )
        self.bottleneck = _double_conv(chans[depth - 1], chans[depth], (3, 3))
        self.head = nn.Conv3d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-3:]
        pad = [(-s) % d for s, d in zip(size, self.divisibility, strict=True)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for level in reversed(range(self.depth)):
            x = self.ups[level](x)
            x = self.decoders[level](torch.cat([skips[level], x], dim=1))
        x = self.head(x)
        return x[..., : size[0], : size[1], : size[2]]
