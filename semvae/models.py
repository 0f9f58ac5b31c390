"""ResNet VAE and the digit classifiers for 1x28x28 images.

The VAE and the ResNet classifier work at three resolutions (28, 14, 7 pixels) with configurable channel widths and
residual blocks per resolution. The VAE has no batch normalisation: a decoded image depends on its own latent code
only, so shifted and unshifted codes can share one batched decoder call without leaking statistics between them.
The ResNet classifier uses batch normalisation and is frozen (eval mode) whenever it serves as the feature extractor
phi. Two classifiers of other architecture families serve only as judges of the evaluation, never in a loss: a
multilayer perceptron (``MLPClassifier``) and a plain LeNet-style CNN without residual connections or normalisation
(``PlainCNNClassifier``). Every classifier has ``features`` (its penultimate reading, the judge's features),
``feature_dim`` and a ``forward`` giving class logits; ``build_classifier`` makes one from its architecture name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class ResidualBlock(nn.Module):
    """Pre-activation residual block, conv3x3 -> act -> conv3x3; the last conv starts at zero (identity block)."""

    def __init__(self, channels: int, norm: bool):
        super().__init__()
        make_norm = (lambda: nn.BatchNorm2d(channels)) if norm else nn.Identity
        self.norm1, self.norm2 = make_norm(), make_norm()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _stage(channels: int, blocks: int, norm: bool) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels, norm) for _ in range(blocks)])


class Encoder(nn.Module):
    """x (B,1,28,28) -> features (B, widths[2]*7*7); residual stages at 28, 14 and 7 pixels."""

    def __init__(self, widths: Sequence[int], blocks: int, norm: bool):
        super().__init__()
        w0, w1, w2 = widths
        self.net = nn.Sequential(
            nn.Conv2d(1, w0, 3, padding=1),
            _stage(w0, blocks, norm),
            nn.Conv2d(w0, w1, 4, stride=2, padding=1),  # 28 -> 14
            _stage(w1, blocks, norm),
            nn.Conv2d(w1, w2, 4, stride=2, padding=1),  # 14 -> 7
            _stage(w2, blocks, norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def reparameterize(mu: Tensor, logvar: Tensor, noise: Tensor | None = None) -> Tensor:
    """z = mu + exp(logvar / 2) * noise, with standard normal ``noise`` drawn here when not given."""
    return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if noise is None else noise)


class ResNetVAE(nn.Module):
    """Gaussian encoder q(z|x) = N(mu, diag exp(logvar)) and a mirrored decoder giving Bernoulli logits."""

    def __init__(self, latent_dim: int = 16, widths: Sequence[int] = (16, 32, 64), blocks: int = 1):
        super().__init__()
        w0, w1, w2 = widths
        self.latent_dim = latent_dim
        self.encoder = Encoder(widths, blocks, norm=False)
        self.to_posterior = nn.Sequential(nn.SiLU(), nn.Flatten(), nn.Linear(w2 * 7 * 7, 2 * latent_dim))
        self.from_latent = nn.Linear(latent_dim, w2 * 7 * 7)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (w2, 7, 7)),
            _stage(w2, blocks, norm=False),
            nn.SiLU(),
            nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1),  # 7 -> 14
            _stage(w1, blocks, norm=False),
            nn.SiLU(),
            nn.ConvTranspose2d(w1, w0, 4, stride=2, padding=1),  # 14 -> 28
            _stage(w0, blocks, norm=False),
            nn.SiLU(),
            nn.Conv2d(w0, 1, 3, padding=1),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each (B, L)."""
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits (B, 1, 28, 28); the image is their sigmoid."""
        return self.decoder(self.from_latent(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (logits, mu, logvar, z) with z drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decode(z), mu, logvar, z


class Classifier(nn.Module):
    """ResNet digit classifier; ``features`` returns the penultimate features used as phi.

    Inputs are images in [0, 1]; the standardisation is part of the model so that decoded images can be fed as is.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), blocks: int = 1, n_classes: int = 10):
        super().__init__()
        self.encoder = Encoder(widths, blocks, norm=True)
        self.head_norm = nn.BatchNorm2d(widths[2])
        self.head = nn.Linear(widths[2], n_classes)
        self.feature_dim = widths[2]

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, widths[2]): global average of the last stage's activations."""
        h = self.encoder((x - MNIST_MEAN) / MNIST_STD)
        return F.silu(self.head_norm(h)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLPClassifier(nn.Module):
    """Multilayer perceptron on the 784 standardised pixels: ``widths`` hidden layers, each Linear -> ReLU, then a
    linear head. No convolution, no normalisation, no residual path: it shares nothing with the ResNets but the data.
    """

    def __init__(self, widths: Sequence[int] = (256, 128), n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip([28 * 28, *widths[:-1]], widths, strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], n_classes)
        self.feature_dim = widths[-1]

    def features(self, x: Tensor) -> Tensor:
        """The last hidden layer's activations (B, widths[-1])."""
        return self.body((x - MNIST_MEAN) / MNIST_STD)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PlainCNNClassifier(nn.Module):
    """LeNet-style CNN: conv5x5 -> ReLU -> max-pool (28 -> 14), conv5x5 -> ReLU -> max-pool (14 -> 7), then a fully
    connected hidden layer with ReLU and a linear head; ``widths`` = (channels, channels, hidden units). No residual
    path, no normalisation, no global average pooling (the ResNets' reading is a pooled map; this one flattens it).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 128), n_classes: int = 10):
        super().__init__()
        c1, c2, hidden = widths
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, n_classes)
        self.feature_dim = hidden

    def features(self, x: Tensor) -> Tensor:
        """The hidden layer's activations (B, widths[2])."""
        return self.body((x - MNIST_MEAN) / MNIST_STD)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# classifier architectures by name (ClassifierConfig.arch; stored in a model file's "architecture")
CLASSIFIER_ARCHS = ("resnet", "mlp", "cnn")


def build_classifier(arch: str, widths: Sequence[int], blocks: int = 1) -> nn.Module:
    """A fresh classifier of architecture ``arch`` (one of ``CLASSIFIER_ARCHS``); ``blocks`` counts for the ResNet
    only."""
    if arch == "resnet":
        return Classifier(widths, blocks)
    if arch == "mlp":
        return MLPClassifier(widths)
    if arch == "cnn":
        return PlainCNNClassifier(widths)
    raise ValueError(f"unknown classifier architecture {arch!r}; allowed: {', '.join(CLASSIFIER_ARCHS)}")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradient into the weights; gradients still flow through the model to its inputs."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
