"""The authors' MNIST networks (docs/maths.md section 6, ``ModelConfig.arch = "authors"``, the ``paper`` preset).

The authors' VAE ties every convolution width to the latent size D (their ``ConvEncoder2`` /
``ConvDecoder2``), and their posterior (``ConvEncoder3_Unsuper2`` with ``s_dim = 100``) runs two
conv stacks of the same shape on the frame pair, one for the spikes and one for the slab:

    encoder    Conv4x4/2 (C -> D), Conv4x4/2 (D -> 2D), Conv (S/4)x(S/4) (2D -> 3D),
               Conv1x1 (3D -> 2D), Conv1x1 (2D -> 2D), linear heads 2D -> D for mean and log-variance
    decoder    Linear (D -> D), ConvT1x1 (D -> 2D), ConvT1x1 (2D -> 3D), ConvT (S/4)x(S/4) (3D -> 2D),
               ConvT4x4/2 (2D -> D), ConvT4x4/2 (D -> C)
    posterior  two stacks Conv4x4/2 (2C -> w), Conv4x4/2 (w -> 2w), Conv (S/4)x(S/4) (2w -> 3w),
               Conv1x1 (3w -> 2w), Conv1x1 (2w -> w), w = 100; linear heads: spike logits from the
               first stack, slab parameters from the second (sta's Laplace location and scale, where
               the authors' head gave one speed, 2 * sigmoid)

ReLU between the layers of a stack, none after its last layer (as in the authors' code: the linear
heads read the last convolution directly). The decoder returns logits (the authors end with a
sigmoid; :class:`sta.models.STAModel` applies it in the likelihood). At D = 324 on 3x28x28 frames
this is 70.9M parameters for the VAE and 6.7M for the posterior, against 0.79M and 0.29M for the
default small networks (``arch = "small"``) at the same latent size and conv width 64.

The spatial sizes need S divisible by 4: two stride-2 convolutions take S to S/4, the full
(S/4)x(S/4) convolution takes that to 1x1, and the decoder mirrors it exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AuthorsEncoder", "AuthorsDecoder", "AuthorsPosterior", "conv_stack", "parameter_counts"]


def _check(image_size: int, **widths) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
        raise ValueError(f"image_size: the authors' networks need a multiple of 4 (>= 4), got {image_size!r}")
    for name, value in widths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _init(net: nn.Module) -> None:
    # He (fan-in, ReLU) initialisation with zero biases, as sta.models.networks does for the small ones
    # (PyTorch's default left the small encoder's output nearly independent of the image).
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def conv_stack(in_channels: int, width: int, out_channels: int, image_size: int) -> nn.Sequential:
    """The authors' encoder stack: ``(N, in_channels, S, S) -> (N, out_channels * 1 * 1)``.

    Conv4x4/2 (in -> w), Conv4x4/2 (w -> 2w), Conv (S/4)x(S/4) (2w -> 3w), Conv1x1 (3w -> 2w),
    Conv1x1 (2w -> out), ReLU between, flattened.
    """
    _check(image_size, in_channels=in_channels, width=width, out_channels=out_channels)
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(2 * w, 3 * w, image_size // 4), nn.ReLU(),
        nn.Conv2d(3 * w, 2 * w, 1), nn.ReLU(),
        nn.Conv2d(2 * w, out_channels, 1),
        nn.Flatten(),
    )


class AuthorsEncoder(nn.Module):
    """q(z_0 | x_0): images ``(N, C, S, S) -> (N, 2D)``, the mean then the log-variance (D each)."""

    def __init__(self, in_channels: int, latent: int, image_size: int):
        super().__init__()
        self.conv = conv_stack(in_channels, latent, 2 * latent, image_size)
        self.mean = nn.Linear(2 * latent, latent)
        self.logvar = nn.Linear(2 * latent, latent)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return torch.cat([self.mean(h), self.logvar(h)], dim=1)


class AuthorsDecoder(nn.Module):
    """p(x | z): latents ``(N, D) -> (N, C, S, S)`` Bernoulli logits."""

    def __init__(self, latent: int, out_channels: int, image_size: int):
        super().__init__()
        _check(image_size, latent=latent, out_channels=out_channels)
        d = latent
        self.linear = nn.Linear(d, d)
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(d, 2 * d, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * d, 3 * d, 1), nn.ReLU(),
            nn.ConvTranspose2d(3 * d, 2 * d, image_size // 4), nn.ReLU(),
            nn.ConvTranspose2d(2 * d, d, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(d, out_channels, 4, 2, 1),
        )
        _init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv(self.linear(z)[:, :, None, None])


class _BlockLinear(nn.Linear):
    """A linear layer whose output rows ``[:split]`` read only input features ``[:width]`` and rows
    ``[split:]`` only features ``[width:]`` (a block-diagonal weight, the off blocks held at 0)."""

    def __init__(self, width: int, out_features: int, split: int):
        super().__init__(2 * width, out_features)
        mask = torch.zeros(out_features, 2 * width)
        mask[:split, :width] = 1.0
        mask[split:, width:] = 1.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.linear(h, self.weight * self.mask, self.bias)


class AuthorsPosterior(nn.Module):
    """Frame pairs ``(N, 2C, S, S) -> (N, out_features)``: the first ``out_features - slab_features``
    outputs (the spike logits) come from the spike stack, the last ``slab_features`` (slab
    parameters) from the slab stack; two stacks of :func:`conv_stack`'s shape at ``width``.

    With no spike outputs (the dense model) only the slab stack is built. The heads form one
    block-diagonal linear layer, ``mlp[-1]``, named like :class:`sta.models.ConvEncoder`'s so that
    :class:`sta.models.CoefficientModel` initialises both posteriors' outputs the same way.
    """

    def __init__(self, in_channels: int, out_features: int, slab_features: int, image_size: int, width: int = 100):
        super().__init__()
        if not isinstance(slab_features, int) or not 0 < slab_features <= out_features:
            raise ValueError(f"slab_features: expected an int in [1, out_features={out_features}], got {slab_features!r}")
        self.num_spike = out_features - slab_features
        self.slab = conv_stack(in_channels, width, width, image_size)
        self.spike = conv_stack(in_channels, width, width, image_size) if self.num_spike else None
        head = _BlockLinear(width, out_features, self.num_spike) if self.num_spike else nn.Linear(width, out_features)
        self.mlp = nn.Sequential(head)
        _init(self)
        if self.num_spike:
            with torch.no_grad():  # the off blocks are never read: hold them at 0, not at random values
                head.weight.mul_(head.mask)

    def forward(self, pairs: Tensor) -> Tensor:
        h = self.slab(pairs)
        if self.spike is not None:
            h = torch.cat([self.spike(pairs), h], dim=1)
        return self.mlp(h)


def parameter_counts(model: nn.Module) -> dict:
    """Trainable parameters of a model's parts: ``{'encoder': n, 'decoder': n, 'posterior': n,
    'other': n (fields, prior, directions), 'total': n}`` (parts the model lacks count 0)."""
    counts = {}
    for part in ("encoder", "decoder", "posterior"):
        sub = getattr(model, part, None)
        counts[part] = sum(p.numel() for p in sub.parameters() if p.requires_grad) if sub is not None else 0
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts
