"""The seed's network: a three-level FPN on a small stride-2 backbone."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import upsample_add_conv1x1


class TinyFPN(nn.Module):
    """Bottom-up: three stride-2 3x3 convs with ReLU, 3 -> 64 -> 128 -> 256 channels
    (C1, C2, C3 at 1/2, 1/4, 1/8 of the input). Top-down: ``P3 = latlayer1(C3)``,
    ``P2 = upsample_add(P3, latlayer2(C2))``, ``P1 = upsample_add(P2, latlayer3(C1))``, each
    smoothed by a 3x3 conv (toplayer1..3). A (1, 3, 256, 256) input gives (1, 32, 32, 32),
    (1, 32, 64, 64) and (1, 32, 128, 128).

    Args:
        in_channels: input image channels.
        out_channels: channels of every pyramid level.
        fused: run each top-down merge as one :func:`fpn_kernels.upsample_add_conv1x1` call;
            False runs the eager ``conv1x1 + interpolate + add`` (the outputs are equal).
        backend: the op's backend when ``fused``.
    """

    def __init__(
        self, in_channels: int = 3, out_channels: int = 32, *, fused: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.bottomlayer1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1)
        self.bottomlayer2 = nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1)
        self.bottomlayer3 = nn.Conv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.latlayer1 = nn.Conv2d(256, out_channels, kernel_size=1)
        self.latlayer2 = nn.Conv2d(128, out_channels, kernel_size=1)
        self.latlayer3 = nn.Conv2d(64, out_channels, kernel_size=1)
        self.toplayer1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.toplayer2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.toplayer3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}"

    def upsample_add(self, top: Tensor, latlayer: nn.Conv2d, bottom: Tensor) -> Tensor:
        """``latlayer(bottom) + nearest-upsample(top)`` to ``bottom``'s size."""
        if self.fused:
            return upsample_add_conv1x1(
                bottom, latlayer.weight, latlayer.bias, top, backend=self.backend
            )
        return latlayer(bottom) + F.interpolate(top, size=bottom.shape[-2:], mode="nearest")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` (N, C, H, W) -> (P3, P2, P1) at 1/8, 1/4 and 1/2 of H, W."""
        c1 = F.relu(self.bottomlayer1(x))
        c2 = F.relu(self.bottomlayer2(c1))
        c3 = F.relu(self.bottomlayer3(c2))
        p3 = self.latlayer1(c3)
        p2 = self.upsample_add(p3, self.latlayer2, c2)
        p1 = self.upsample_add(p2, self.latlayer3, c1)
        return self.toplayer1(p3), self.toplayer2(p2), self.toplayer3(p1)
