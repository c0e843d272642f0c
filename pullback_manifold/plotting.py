"""Pictures of 2-D latent spaces: metric background, geodesics, points (matplotlib).

matplotlib is an optional dependency (``pip install pullback-manifold[examples]``);
it is imported when these functions are called.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["magnification_factor", "plot_magnification", "plot_curves"]


def magnification_factor(space, points: Tensor) -> Tensor:
    r"""Volume element :math:`\sqrt{\det G(z)}` of the metric.

    Large where the decoder stretches latent space (or, for a stochastic
    decoder, where its uncertainty grows).

    Parameters
    ----------
    space : PullbackManifold
    points : Tensor, shape=[..., d]

    Returns
    -------
    factor : Tensor, shape=[...]
    """
    G = space.metric.metric_matrix(points)
    return torch.linalg.det(G).clamp_min(0).sqrt()


def plot_magnification(
    ax,
    space,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    resolution: int = 120,
    log_scale: bool = True,
    cmap: str = "viridis",
    dtype: torch.dtype = torch.float64,
    colorbar: bool = True,
):
    """Draw ``sqrt(det G)`` of a 2-D latent space as an image on ``ax``.

    Parameters
    ----------
    ax : matplotlib Axes
    space : PullbackManifold
        A space with ``dim == 2``.
    xlim, ylim : (float, float)
        Extent of the picture in latent coordinates.
    resolution : int
        Grid points per axis.
    log_scale : bool
        Show ``log10`` of the factor (its range often spans decades).
    cmap : str
    dtype : torch.dtype
        dtype of the grid points.
    colorbar : bool
        Add a colorbar.

    Returns
    -------
    image : matplotlib AxesImage
    """
    if space.dim != 2:
        raise ValueError(f"plot_magnification draws 2-D latent spaces; this space has dim={space.dim}")
    xs = torch.linspace(*xlim, resolution, dtype=dtype)
    ys = torch.linspace(*ylim, resolution, dtype=dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    with torch.no_grad():
        factor = magnification_factor(space, grid.reshape(-1, 2)).reshape(resolution, resolution)
    values = factor.log10() if log_scale else factor
    image = ax.imshow(
        values.cpu().numpy(),
        extent=(*xlim, *ylim),
        origin="lower",
        cmap=cmap,
        aspect="auto",
        interpolation="bilinear",
    )
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=r"$\log_{10}\sqrt{\det G}$" if log_scale else r"$\sqrt{\det G}$")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    return image


def plot_curves(ax, curves: Tensor, **kwargs):
    """Draw latent curves ``(n_nodes, 2)`` or ``(n_curves, n_nodes, 2)`` on ``ax``.

    Parameters
    ----------
    ax : matplotlib Axes
    curves : Tensor, shape=[..., n_nodes, 2]
    **kwargs
        Passed to ``ax.plot`` (the label is attached to the first curve only).

    Returns
    -------
    lines : list of matplotlib Line2D
    """
    curves = torch.as_tensor(curves).detach().cpu()
    if curves.dim() == 2:
        curves = curves[None]
    lines = []
    for i, curve in enumerate(curves.reshape(-1, *curves.shape[-2:])):
        label = kwargs.pop("label", None) if i == 0 else None
        lines += ax.plot(curve[:, 0].numpy(), curve[:, 1].numpy(), label=label, **kwargs)
    return lines
