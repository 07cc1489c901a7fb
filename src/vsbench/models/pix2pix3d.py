"""pix2pix3d: a generative baseline — a registered generator (unet3d or unext2) and a
multi-scale 3D PatchGAN discriminator trained with LSGAN + λ·L1 (Isola et al. 2017; LSGAN,
Mao et al. 2017; multi-scale D as in pix2pixHD).

`adversarial = True` tells the trainer to use its manual-optimisation loop: per batch one
discriminator step, then one generator step, with the discriminator's learning rate a tenth
of the generator's (TTUR). The checkpoint holds both networks; prediction (`forward`) is the
generator alone, and validation scores it with the model's configured loss like any other
architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vsbench.models._registry import REGISTRY, register

L1_WEIGHT = 100.0
D_LR_FRACTION = 0.1  # TTUR: discriminator lr = generator lr / 10


class PatchDiscriminator3D(nn.Module):
    """PatchGAN over (source, target) pairs: C-(2C)-(4C)-… 4×4 in-plane convs, LeakyReLU 0.2,
    InstanceNorm except on the first layer, one logit per patch.

    Strides are (1, 2, 2) because stacks are thin in Z (8–16 slices) and voxels
    anisotropic; Z context comes from the 3-slice kernels.
    """

    def __init__(self, in_channels: int = 2, base_channels: int = 16, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(n_layers):
            c_out = base_channels * 2 ** min(i, 3)
            layers.append(nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)))
            if i > 0:
                layers.append(nn.InstanceNorm3d(c_out, affine=True))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        layers.append(nn.Conv3d(c_in, 1, (3, 4, 4), padding=(1, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _down_yx(x: torch.Tensor) -> torch.Tensor:
    """2× average in Y/X as a reshape-mean (avg_pool3d's CUDA backward is nondeterministic)."""
    n, c, z, h, w = x.shape
    x = x[..., : h - h % 2, : w - w % 2]
    return x.reshape(n, c, z, h // 2, 2, w // 2, 2).mean((4, 6))


class MultiScaleDiscriminator3D(nn.Module):
    """`num_scales` PatchGANs on the pair at full, ½, ¼ … in-plane resolution."""

    def __init__(
        self, in_channels: int = 2, base_channels: int = 16, n_layers: int = 3, num_scales: int = 2
    ):
        super().__init__()
        if min(base_channels, n_layers, num_scales) < 1:
            raise ValueError("discriminator sizes must all be >= 1")
        self.n_layers = n_layers
        self.scales = nn.ModuleList(
            PatchDiscriminator3D(in_channels, base_channels, n_layers) for _ in range(num_scales)
        )

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Logits per scale; a scale whose Y/X would fall below 2^(layers+1) is skipped
        (its patches would cover more than the crop)."""
        x = torch.cat([source, target], dim=1)
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = _down_yx(x)
            if i and min(x.shape[-2:]) < 2 ** (self.n_layers + 1):
                break
            out.append(d(x))
        return out


def lsgan_loss(logits: Sequence[torch.Tensor], real: bool) -> torch.Tensor:
    """Least-squares GAN loss averaged over scales: mean((D − 1)²) for real, mean(D²) for fake."""
    goal = 1.0 if real else 0.0
    return torch.stack([((p.float() - goal) ** 2).mean() for p in logits]).mean()


def discriminator_loss(d_real: Sequence[torch.Tensor], d_fake: Sequence[torch.Tensor]):
    return 0.5 * (lsgan_loss(d_real, True) + lsgan_loss(d_fake, False))


def generator_loss(
    d_fake: Sequence[torch.Tensor],
    fake: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = L1_WEIGHT,
) -> torch.Tensor:
    """Fool D (LSGAN) + λ·L1 to the target (λ = 100 as in pix2pix)."""
    return lsgan_loss(d_fake, True) + l1_weight * F.l1_loss(fake.float(), target.float())


GENERATORS = ("unet3d", "unext2")


def pix2pix3d_config(settings: Mapping) -> dict:
    generator = str(settings.get("generator", "unet3d"))
    if generator not in GENERATORS:
        raise ValueError(f"pix2pix3d generator must be one of {GENERATORS}, got {generator!r}")
    return {
        "generator_arch": generator,
        "generator_config": REGISTRY[generator].config({**settings, "arch": generator}),
        "disc_base_channels": int(settings.get("disc_base_channels", 16)),
        "disc_layers": 3,
        "disc_scales": 2,
        "l1_weight": float(settings.get("l1_weight", L1_WEIGHT)),
    }


@register("pix2pix3d", config=pix2pix3d_config)
class Pix2Pix3D(nn.Module):
    """A registered generator plus the multi-scale discriminator; forward = the generator."""

    adversarial = True

    def __init__(
        self,
        generator_arch: str = "unet3d",
        generator_config: Mapping | None = None,
        disc_base_channels: int = 16,
        disc_layers: int = 3,
        disc_scales: int = 2,
        l1_weight: float = L1_WEIGHT,
    ):
        super().__init__()
        from vsbench.models import build_model

        if generator_arch not in GENERATORS:
            raise ValueError(
                f"pix2pix3d generator must be one of {GENERATORS}, got {generator_arch!r}"
            )
        self.l1_weight = float(l1_weight)
        self.generator = build_model(generator_arch, dict(generator_config or {}))
        self.divisibility = tuple(getattr(self.generator, "divisibility", (1, 1, 1)))
        self.z_window = getattr(self.generator, "z_window", None)
        self.out_channels = int(getattr(self.generator, "out_channels", 1))
        in_ch = int(getattr(self.generator, "in_channels", 1)) + self.out_channels
        self.discriminator = MultiScaleDiscriminator3D(
            in_ch, disc_base_channels, disc_layers, disc_scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x)
