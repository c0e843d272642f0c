"""A small seeded Gaussian VAE, and one trained on scikit-learn's digits.

:func:`digits_vae` trains (in seconds, on CPU) a 2-D latent VAE on the 8x8
digits bundled with scikit-learn and fits the RBF precision of
:mod:`pullback_manifold.variance` to its residuals, giving a
:class:`~pullback_manifold.GaussianDecoder` whose ``sigma`` grows between and
away from the digit clusters. The result is cached per process: tests, examples
and benchmarks share one trained model.

The decoder's hidden layers are ``tanh`` (not ReLU): the geodesic equation uses
second derivatives of the decoder, which vanish almost everywhere for a
piecewise-linear network.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .decoders import GaussianDecoder
from .errors import is_positive_int
from .variance import RBFPrecision, fit_rbf_precision

__all__ = ["GaussianVAE", "train_vae", "DigitsVAE", "digits_vae", "load_digits_data"]


class GaussianVAE(nn.Module):
    """A VAE with a Gaussian encoder and a Gaussian decoder of fixed isotropic variance.

    Encoder: MLP ``x -> (mean, log-variance)`` of ``q(z|x)``. Decoder: MLP
    ``z -> mean`` of ``p(x|z)``, squashed by a sigmoid to ``[0, 1]`` (the data's
    range). The likelihood's variance ``obs_std**2`` is a fixed training
    hyperparameter; the geometry uses a separately fitted, position-dependent
    ``sigma(z)`` (:func:`~pullback_manifold.fit_rbf_precision`).

    Parameters
    ----------
    data_dim : int
        ``D``, the flattened data dimension.
    latent_dim : int
        ``d``.
    hidden : int
        Width of the two hidden layers of encoder and decoder.
    obs_std : float
        Standard deviation of the Gaussian likelihood during training.
    """

    def __init__(self, data_dim: int, latent_dim: int = 2, hidden: int = 128, obs_std: float = 0.1):
        super().__init__()
        self.data_dim, self.latent_dim, self.obs_std = data_dim, latent_dim, obs_std
        self.encoder = nn.Sequential(
            nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, data_dim),
            nn.Sigmoid(),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(z|x)``.

        Parameters
        ----------
        x : Tensor, shape=[n, D]

        Returns
        -------
        mean, logvar : Tensor, shape=[n, d]
        """
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return mean, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Decoder mean.

        Parameters
        ----------
        z : Tensor, shape=[n, d]

        Returns
        -------
        x_mean : Tensor, shape=[n, D]
        """
        return self.decoder(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Negative ELBO per data point (up to a constant), one reparametrized sample.

        Parameters
        ----------
        x : Tensor, shape=[n, D]
        generator : torch.Generator, optional
            Source of the reparametrization noise.

        Returns
        -------
        loss : Tensor, shape=[]
        """
        mean, logvar = self.encode(x)
        if generator is None:
            eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        else:  # drawn where the generator lives (a CPU generator also seeds a model on the GPU)
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=generator.device)
            eps = eps.to(mean.device)
        z = mean + (0.5 * logvar).exp() * eps
        reconstruction = 0.5 * ((x - self.decode(z)) / self.obs_std).pow(2).sum(-1)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return (reconstruction + kl).mean()


def train_vae(
    data: Tensor,
    latent_dim: int = 2,
    epochs: int = 200,
    seed: int = 0,
    *,
    hidden: int = 128,
    obs_std: float = 0.1,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> GaussianVAE:
    """Train a :class:`GaussianVAE` with Adam; deterministic given ``seed``.

    The global torch RNG is left as it was (initialization and sampling use a
    forked RNG and a private generator).

    Parameters
    ----------
    data : Tensor, shape=[n, D]
        Training data, best scaled to ``[0, 1]`` (the decoder mean is a sigmoid).
    latent_dim : int
    epochs : int
        Passes over the data, in shuffled minibatches.
    seed : int
    hidden : int
        Hidden width.
    obs_std : float
        Likelihood standard deviation during training.
    batch_size : int
    lr : float
        Adam learning rate (decayed by cosine annealing to 0).

    Returns
    -------
    model : GaussianVAE
        float32, in eval mode.
    """
    data = torch.as_tensor(data)
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"data must have shape (n, D), n, D >= 1 (flatten images first), got {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("data contains NaN or Inf: training would make every weight NaN; drop or impute those rows")
    for name, value in (("latent_dim", latent_dim), ("epochs", epochs), ("hidden", hidden), ("batch_size", batch_size)):
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    x = data.to(torch.float32)
    n = x.shape[0]
    previous = torch.get_default_dtype()
    # The same float32 initialization wherever x is and whatever the default dtype (under a
    # float64 default the layers were float64 and the first batch failed).
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            model = GaussianVAE(x.shape[1], latent_dim, hidden, obs_std)
        finally:
            torch.set_default_dtype(previous)
    model = model.to(x.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-n // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        for start in range(0, n, batch_size):
            batch = x[order[start : start + batch_size]]
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch, generator).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class DigitsVAE:
    """A VAE trained on scikit-learn's digits, with its fitted expected-metric decoder.

    Attributes
    ----------
    model : GaussianVAE
        The trained VAE (float32, eval mode, parameters frozen).
    mean_decoder : nn.Module
        ``(n, d) -> (n, 64)``, the decoder mean (``model.decoder``).
    std : RBFPrecision
        ``(n, d) -> (n, 64)``, the fitted RBF-precision standard deviation.
    decoder : GaussianDecoder
        ``GaussianDecoder(mean_decoder, std)``: give it to ``PullbackManifold``.
    codes : Tensor, shape=[n, d]
        Encoder means of the training images, float64.
    data : Tensor, shape=[n, 64]
        The images scaled to ``[0, 1]``, float64.
    labels : Tensor, shape=[n]
        Digit classes, int64.
    train_seconds : float
        Wall time of training and fitting.
    """

    model: GaussianVAE
    mean_decoder: nn.Module
    std: RBFPrecision
    decoder: GaussianDecoder
    codes: Tensor
    data: Tensor
    labels: Tensor
    train_seconds: float


def load_digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (no download), scaled to ``[0, 1]``.

    Returns
    -------
    data : Tensor, shape=[1797, 64]
        float64.
    labels : Tensor, shape=[1797]
        int64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("the digits data come with scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    data = torch.as_tensor(digits.data, dtype=torch.float64) / 16.0
    return data, torch.as_tensor(digits.target, dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def digits_vae(seed: int = 0, latent_dim: int = 2) -> DigitsVAE:
    """Train a VAE on scikit-learn's digits and fit its RBF-precision ``sigma``; cached per process.

    Takes about ten seconds on one CPU core. Deterministic given ``seed`` and
    torch's threading setup: float32 sums are ordered by the threads, and 200
    epochs amplify last-bit differences (measured: runs started under
    ``OMP_NUM_THREADS=1`` and runs calling ``torch.set_num_threads(1)`` after
    import trained models whose geodesic lengths differ by 1e-3). Fix the
    threading the same way to compare runs. The same object is returned to
    every caller with the same arguments: do not modify it.

    Parameters
    ----------
    seed : int
        Seed of initialization, minibatches, reparametrization noise and k-means.
    latent_dim : int

    Returns
    -------
    result : DigitsVAE

    Examples
    --------
    >>> from pullback_manifold import PullbackManifold
    >>> vae = digits_vae()  # doctest: +SKIP
    >>> space = PullbackManifold(vae.decoder, dim=2)  # doctest: +SKIP
    """
    start = time.perf_counter()
    data, labels = load_digits_data()
    model = train_vae(data, latent_dim=latent_dim, seed=seed)
    with torch.no_grad():
        codes = model.encode(data.to(torch.float32))[0].to(torch.float64)
    # sigma far from the data zeta^{-1/2} ~ 3.2 (pixels are in [0, 1]; residuals ~0.12);
    # 32 centres keep the RBF field smooth enough for the geodesic ODE
    std = fit_rbf_precision(codes, data, model.decoder, n_centers=32, zeta=0.1, curvature=1.0, seed=seed)
    decoder = GaussianDecoder(model.decoder, std)
    return DigitsVAE(
        model=model,
        mean_decoder=model.decoder,
        std=std,
        decoder=decoder,
        codes=codes,
        data=data,
        labels=labels,
        train_seconds=time.perf_counter() - start,
    )
