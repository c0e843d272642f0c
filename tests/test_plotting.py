"""Plotting helpers: classes and their colours."""

import pytest
import torch

from pullback_manifold.plotting import plot_curves, plot_latent_points

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after the backend is chosen


def test_float_labels_are_classes_with_distinct_colours():
    """A float class 1.0 once picked the colour at the fraction 1.0 of the colormap (the last),
    the same as 2.0."""
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    fig, ax = plt.subplots()
    try:
        floats = plot_latent_points(ax, z, torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0]), class_names=["a", "b", "c"])
        ints = plot_latent_points(ax, z, torch.tensor([0, 0, 1, 1, 2]))
        colours = [tuple(c.get_facecolor()[0]) for c in floats]
        assert len(set(colours)) == 3 and colours == [tuple(c.get_facecolor()[0]) for c in ints]
        assert [c.get_label() for c in floats] == ["a", "b", "c"]
        with pytest.raises(ValueError, match="integer classes"):
            plot_latent_points(ax, z, torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match="integer classes"):
            plot_latent_points(ax, z, torch.tensor([-1, 0, 1, 1, 0]), class_names=["a", "b"])
        with pytest.raises(ValueError, match="class 2 has no name"):
            plot_latent_points(ax, z, torch.tensor([0, 0, 1, 1, 2]), class_names=["a", "b"])
    finally:
        plt.close(fig)


def test_curves_of_another_latent_dimension_are_rejected():
    """A 3-D curve once lost its third coordinate silently."""
    fig, ax = plt.subplots()
    try:
        assert len(plot_curves(ax, torch.zeros(4, 5, 2))) == 4
        with pytest.raises(ValueError, match=r"curves must have shape \(\.\.\., n_nodes, 2\), got \(5, 3\)"):
            plot_curves(ax, torch.zeros(5, 3))
    finally:
        plt.close(fig)
