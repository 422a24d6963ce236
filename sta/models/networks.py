"""The networks every model kind shares: a convolutional encoder and decoder (docs/maths.md 4.2).

The encoder maps frames ``(N, C, S, S)`` to features (``2D`` for the mean and log-variance of
``q(z | x)``; the coefficient posterior uses the same network on frame pairs, ``2C`` channels); the
decoder maps latents ``(N, D)`` to per-pixel logits ``(N, C, S, S)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvEncoder", "ConvDecoder"]

#: The conv stacks compute in channels-last (NHWC) layout: oneDNN's CPU convolutions (and cuDNN's
#: tensor-core ones) are faster on it. Measured on this project's AMD EPYC (1 thread, paper sizes
#: D 324 K 3, T 8, 28x28x3): a training iteration at batch 128 1.41 / 1.33 s -> 0.73 / 0.72 s (two
#: alternating pairs of runs); the decoder's forward at batch 32 0.106 -> 0.039 s
#: (benchmarks/bench_train.py, reference vs fast). The same maths; only the summation order inside
#: a convolution changes.
MEMORY_FORMAT = torch.channels_last


def _channels_last(conv: nn.Module) -> nn.Module:
    """``conv`` with its 4-d weights in :data:`MEMORY_FORMAT` (``.to(device)`` keeps the layout).

    Applied after the initialisation: a random init fills memory in storage order, so initialising
    NHWC weights would draw other weights from the same seed."""
    return conv.to(memory_format=MEMORY_FORMAT)


def _init_relu_net(net: nn.Module) -> None:
    """He (fan-in, ReLU) initialisation with zero biases for every conv and linear layer.

    Why: with PyTorch's default init the quick preset's encoder output was nearly independent of
    the image (std of mu over a batch 0.0013) and every model collapsed to the mean image (static
    VAE on digits, 300 Adam steps: KL(z_0) 0.1 nats, recon 505 nats/frame, worse than the 532 of
    the mean image). With He init: KL 17 nats, recon 342 nats/frame after the same 300 steps.
    """
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def _conv_sizes(image_size: int) -> list[int]:
    """Spatial sizes of the stride-2 conv stack: halve (floor) until <= 4, e.g. 28 -> [28, 14, 7, 3]."""
    sizes = [image_size]
    while sizes[-1] > 4:
        sizes.append((sizes[-1] - 2) // 2 + 1)  # Conv2d(kernel 4, stride 2, padding 1)
    return sizes


class ConvEncoder(nn.Module):
    """Images ``(N, C, S, S) -> (N, out)``: stride-2 4x4 convolutions down to <= 4x4, then an MLP."""

    def __init__(self, in_channels: int, out_features: int, image_size: int, width: int = 32, mlp: int = 256):
        super().__init__()
        sizes = _conv_sizes(image_size)
        layers, ch = [], in_channels
        for _ in sizes[1:]:
            layers += [nn.Conv2d(ch, width, 4, 2, 1), nn.ReLU()]
            ch = width
        self.conv = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(ch * sizes[-1] ** 2, mlp), nn.ReLU(), nn.Linear(mlp, out_features))
        _init_relu_net(self)
        _channels_last(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.conv(x.contiguous(memory_format=MEMORY_FORMAT)))


class ConvDecoder(nn.Module):
    """Latents ``(N, D) -> (N, C, S, S)`` logits: an MLP, then nearest upsampling + 3x3 convolutions."""

    def __init__(self, latent: int, out_channels: int, image_size: int, width: int = 32, mlp: int = 256):
        super().__init__()
        sizes = _conv_sizes(image_size)[::-1]
        self.width, self.start = width, sizes[0]
        self.mlp = nn.Sequential(nn.Linear(latent, mlp), nn.ReLU(), nn.Linear(mlp, width * sizes[0] ** 2), nn.ReLU())
        layers = []
        for size in sizes[1:]:
            layers += [nn.Upsample(size=(size, size), mode="nearest"), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()]
        layers.append(nn.Conv2d(width, out_channels, 3, 1, 1))
        self.conv = nn.Sequential(*layers)
        _init_relu_net(self)
        _channels_last(self.conv)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mlp(z).view(z.shape[0], self.width, self.start, self.start)
        return self.conv(h.contiguous(memory_format=MEMORY_FORMAT))
