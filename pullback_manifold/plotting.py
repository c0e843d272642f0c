"""Pictures of 2-D latent spaces: metric background, geodesics, points (matplotlib).

matplotlib is an optional dependency (``pip install pullback-manifold[examples]``);
it is imported when these functions are called.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "magnification_factor",
    "plot_magnification",
    "plot_field",
    "plot_curves",
    "plot_latent_points",
    "image_grid",
    "plot_image_strip",
]


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
    return plot_field(
        ax,
        lambda z: magnification_factor(space, z),
        xlim,
        ylim,
        resolution=resolution,
        log_scale=log_scale,
        cmap=cmap,
        dtype=dtype,
        colorbar=colorbar,
        label=r"$\log_{10}\sqrt{\det G}$" if log_scale else r"$\sqrt{\det G}$",
    )


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
    if curves.dim() < 2 or curves.shape[-1] != 2:
        raise ValueError(
            f"curves must have shape (..., n_nodes, 2), got {tuple(curves.shape)}: a 2-D latent space's "
            "curves (project others to two coordinates first)"
        )
    if curves.dim() == 2:
        curves = curves[None]
    lines = []
    for i, curve in enumerate(curves.reshape(-1, *curves.shape[-2:])):
        label = kwargs.pop("label", None) if i == 0 else None
        lines += ax.plot(curve[:, 0].numpy(), curve[:, 1].numpy(), label=label, **kwargs)
    return lines


def plot_field(
    ax,
    field,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    resolution: int = 120,
    log_scale: bool = False,
    cmap: str = "viridis",
    dtype: torch.dtype = torch.float64,
    colorbar: bool = True,
    label: str | None = None,
    **kwargs,
):
    """Draw a scalar field of a 2-D latent space as an image on ``ax``.

    For example the magnification factor (see :func:`plot_magnification`) or
    the mean standard deviation of a Gaussian decoder,
    ``lambda z: std(z).mean(-1)``.

    Parameters
    ----------
    ax : matplotlib Axes
    field : callable
        Maps latent points ``(n, 2)`` to values ``(n,)``; evaluated without
        gradients on a ``resolution x resolution`` grid, in one batch.
    xlim, ylim : (float, float)
        Extent of the picture in latent coordinates.
    resolution : int
        Grid points per axis.
    log_scale : bool
        Show ``log10`` of the values.
    cmap : str
    dtype : torch.dtype
        dtype of the grid points.
    colorbar : bool
        Add a colorbar (labelled ``label``).
    label : str, optional
        Colorbar label.
    **kwargs
        Passed to ``ax.imshow``.

    Returns
    -------
    image : matplotlib AxesImage
    """
    xs = torch.linspace(*xlim, resolution, dtype=dtype, device="cpu")  # pictures are made on the CPU
    ys = torch.linspace(*ylim, resolution, dtype=dtype, device="cpu")
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    with torch.no_grad():
        values = torch.as_tensor(field(grid.reshape(-1, 2))).reshape(resolution, resolution)
    if log_scale:
        values = values.log10()
    options = dict(extent=(*xlim, *ylim), origin="lower", cmap=cmap, aspect="auto", interpolation="bilinear")
    options.update(kwargs)
    image = ax.imshow(values.detach().cpu().numpy(), **options)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    return image


def plot_latent_points(
    ax,
    points: Tensor,
    labels: Tensor | None = None,
    *,
    cmap: str = "tab10",
    class_names=None,
    legend: bool = True,
    s: float = 8.0,
    alpha: float = 0.75,
    **kwargs,
):
    """Scatter latent codes ``(n, 2)`` on ``ax``, coloured by class.

    Parameters
    ----------
    ax : matplotlib Axes
    points : Tensor, shape=[n, 2]
    labels : Tensor, shape=[n], optional
        Integer classes ``0, 1, ...``; class ``k`` gets colour ``k`` of ``cmap``.
        Without labels, every point gets the first colour.
    cmap : str
        A qualitative matplotlib colormap.
    class_names : sequence of str, optional
        Legend entry of each class (default: the class number).
    legend : bool
        Add a legend (one entry per class present).
    s, alpha : float
        Marker size and opacity.
    **kwargs
        Passed to ``ax.scatter``.

    Returns
    -------
    collections : list of matplotlib PathCollection
        One per class, in increasing class order.
    """
    import matplotlib

    points = torch.as_tensor(points).detach().cpu()
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {tuple(points.shape)}")
    if labels is None:
        labels = torch.zeros(len(points), dtype=torch.long, device="cpu")
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.shape != points.shape[:1]:
        raise ValueError(f"labels must have shape ({len(points)},), got {tuple(labels.shape)}")
    # Classes are integers >= 0 (a float k would pick a colour at the fraction k of the colormap).
    if labels.is_floating_point() and bool((labels != labels.round()).any()):
        raise ValueError("labels must be integer classes 0, 1, ...; got non-integer values")
    labels = labels.long()
    if bool((labels < 0).any()):
        raise ValueError(f"labels must be integer classes 0, 1, ...; got {int(labels.min())}")
    if class_names is not None and len(labels) and int(labels.max()) >= len(class_names):
        raise ValueError(f"class {int(labels.max())} has no name: class_names has {len(class_names)} entries")
    colours = matplotlib.colormaps[cmap]
    collections = []
    for k in torch.unique(labels).tolist():
        mask = labels == k
        name = str(k) if class_names is None else str(class_names[k])
        collections.append(
            ax.scatter(
                points[mask, 0].numpy(),
                points[mask, 1].numpy(),
                s=s,
                alpha=alpha,
                color=colours(k % colours.N),
                label=name,
                linewidths=0,
                **kwargs,
            )
        )
    if legend:
        ax.legend(handles=collections, markerscale=12.0 / max(s, 1e-3) ** 0.5, loc="best", framealpha=0.85)
    return collections


def image_grid(images: Tensor, image_shape: tuple[int, int], pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile flattened images into one picture, row by row.

    Parameters
    ----------
    images : Tensor, shape=[n_cols, D] or [n_rows, n_cols, D]
        Flattened images, ``D = height * width``; one row if 2-D.
    image_shape : (int, int)
        ``(height, width)`` of one image.
    pad : int
        Pixels between neighbouring images.
    pad_value : float
        Value of the padding pixels.

    Returns
    -------
    grid : Tensor, shape=[n_rows * (height + pad) - pad, n_cols * (width + pad) - pad]
    """
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() == 2:
        images = images[None]
    if images.dim() != 3:
        raise ValueError(f"images must have shape (n_cols, D) or (n_rows, n_cols, D), got {tuple(images.shape)}")
    h, w = image_shape
    if images.shape[-1] != h * w:
        raise ValueError(f"images have {images.shape[-1]} pixels, image_shape {tuple(image_shape)} needs {h * w}")
    n_rows, n_cols = images.shape[:2]
    shape = (n_rows * (h + pad) - pad, n_cols * (w + pad) - pad)
    grid = torch.full(shape, float(pad_value), dtype=images.dtype, device="cpu")
    for i in range(n_rows):
        for j in range(n_cols):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = images[i, j].reshape(h, w)
    return grid


def plot_image_strip(
    ax,
    images: Tensor,
    image_shape: tuple[int, int],
    *,
    row_labels=None,
    pad: int = 1,
    cmap: str = "gray_r",
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
):
    """Draw rows of flattened images (e.g. decoded interpolations) on ``ax``.

    Parameters
    ----------
    ax : matplotlib Axes
    images : Tensor, shape=[n_cols, D] or [n_rows, n_cols, D]
        Flattened images, ``D = height * width``.
    image_shape : (int, int)
        ``(height, width)`` of one image.
    row_labels : sequence of str, optional
        One label per row, written left of it.
    pad : int
        Pixels between images; the padding takes the colour of ``vmin``
        (white with ``gray_r``).
    cmap : str
    vmin, vmax : float
        Colour range of the pixel values.
    title : str, optional

    Returns
    -------
    image : matplotlib AxesImage
    """
    grid = image_grid(images, image_shape, pad=pad, pad_value=vmin)
    image = ax.imshow(grid.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    h = image_shape[0]
    if row_labels is not None:
        ax.set_yticks([i * (h + pad) + (h - 1) / 2 for i in range(len(row_labels))])
        ax.set_yticklabels([str(label) for label in row_labels])
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        ax.set_title(title)
    return image
