import torch

from semvae.models import Classifier, ResNetVAE, freeze


def test_vae_shapes_for_configurable_sizes():
    for latent_dim, widths, blocks in [(16, (32, 64, 128), 1), (3, (8, 8, 16), 2), (32, (4, 8, 8), 0)]:
        vae = ResNetVAE(latent_dim, widths, blocks)
        x = torch.rand(5, 1, 28, 28)
        logits, mu, logvar, z = vae(x)
        assert logits.shape == (5, 1, 28, 28)
        assert mu.shape == logvar.shape == z.shape == (5, latent_dim)
        assert vae.decode(torch.zeros(2, latent_dim)).shape == (2, 1, 28, 28)


def test_decoded_image_depends_on_its_own_code_only():
    # no batch statistics in the VAE: shifted and unshifted codes can share one decoder call
    vae = ResNetVAE(8, (8, 16, 16), 1)
    z = torch.randn(6, 8)
    together = vae.decode(z)
    alone = torch.cat([vae.decode(z[i : i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_classifier_logits_and_features():
    net = Classifier((8, 16, 24), 1)
    x = torch.rand(7, 1, 28, 28)
    assert net(x).shape == (7, 10)
    assert net.features(x).shape == (7, 24) and net.feature_dim == 24


def test_freeze_keeps_gradient_flowing_to_inputs_only():
    net = freeze(Classifier((8, 16, 24), 1))
    assert not net.training
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    net.features(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
