"""geomstats' own metric test cases: the spherical chart's pull-back vs geomstats' Hypersphere(2).

``RiemannianMetricComparisonTestCase`` compares our metric with a reference
metric point by point on random data. Two comparisons:

* extrinsic: geomstats' ``Hypersphere(2)`` (points in R^3), with a point
  transformer built from geomstats' own spherical <-> extrinsic conversions,
  for inner products, norms, exp, log, dist and geodesics (both forms);
* intrinsic: geomstats' ``Hypersphere(2, intrinsic=True)``, whose Christoffel
  symbols are given in the same spherical chart, and whose metric matrix is
  carried into the chart by geomstats' own tangent map.
"""

import math

import pytest
import torch
from geomstats.geometry.hypersphere import Hypersphere, HypersphereMetric
from geomstats.test.parametrizers import DataBasedParametrizer
from geomstats.test.utils import PointTransformer
from geomstats.test_cases.geometry.riemannian_metric import RiemannianMetricComparisonTestCase
from geomstats.test.data import TestData

from decoders_zoo import spherical_chart
from pullback_manifold import PullbackManifold

F64 = torch.float64


@pytest.fixture(autouse=True)
def _float64(float64_default):
    """geomstats generates its random data in torch's default dtype."""


class SphericalPatchData:
    """Random points inside the chart's patch, away from the poles, and short tangent vectors."""

    def __init__(self, space):
        self.space = space

    def random_point(self, n_points=1):
        shape = (n_points, 2) if n_points > 1 else (2,)
        u = torch.rand(shape, dtype=F64)
        theta = math.pi / 4 + u[..., 0] * math.pi / 2
        phi = 0.5 + u[..., 1] * 1.5
        return torch.stack([theta, phi], dim=-1)

    def random_tangent_vec(self, base_point):
        return (torch.rand(base_point.shape, dtype=F64) - 0.5) * 0.8


class SphericalToExtrinsic(PointTransformer):
    def __init__(self):
        self.sphere = Hypersphere(2)

    def transform_point(self, point):
        return self.sphere.spherical_to_extrinsic(point)

    def transform_tangent_vec(self, tangent_vec, base_point):
        return self.sphere.tangent_spherical_to_extrinsic(tangent_vec, base_point)

    def inverse_transform_point(self, other_point):
        return self.sphere.extrinsic_to_spherical(other_point)

    def inverse_transform_tangent_vec(self, other_tangent_vec, other_base_point):
        return self.sphere.tangent_extrinsic_to_spherical(other_tangent_vec, base_point=other_base_point)


class HypersphereMetricInChart(HypersphereMetric):
    """geomstats' sphere metric in spherical coordinates: G = T^T T, T geomstats' tangent map."""

    def metric_matrix(self, base_point=None):
        sphere = Hypersphere(2)
        basis = torch.eye(2, dtype=base_point.dtype)
        columns = [
            sphere.tangent_spherical_to_extrinsic(basis[i].expand(base_point.shape), base_point) for i in range(2)
        ]
        tangent_map = torch.stack(columns, dim=-1)  # (..., 3, 2)
        return tangent_map.transpose(-1, -2) @ tangent_map


class SphereChartExtrinsicData(TestData):
    trials = 1
    N_RANDOM_POINTS = [1, 4]
    N_TIME_POINTS = [1, 3]
    tolerances = {
        "inner_product_random": {"atol": 1e-10},
        "squared_norm_random": {"atol": 1e-10},
        "norm_random": {"atol": 1e-10},
        "exp_random": {"atol": 1e-7},
        "log_random": {"atol": 1e-7},
        "squared_dist_random": {"atol": 1e-7},
        "dist_random": {"atol": 1e-7},
        "geodesic_ivp_random": {"atol": 1e-7},
        "geodesic_bvp_random": {"atol": 1e-7},
    }

    def inner_product_random_test_data(self):
        return self.generate_random_data()

    def squared_norm_random_test_data(self):
        return self.generate_random_data()

    def norm_random_test_data(self):
        return self.generate_random_data()

    def exp_random_test_data(self):
        return self.generate_random_data()

    def log_random_test_data(self):
        return self.generate_random_data()

    def squared_dist_random_test_data(self):
        return self.generate_random_data()

    def dist_random_test_data(self):
        return self.generate_random_data()

    def geodesic_ivp_random_test_data(self):
        return self.generate_random_data_with_time()

    def geodesic_bvp_random_test_data(self):
        return self.generate_random_data_with_time()


class TestSphereChartVsHypersphere(RiemannianMetricComparisonTestCase, metaclass=DataBasedParametrizer):
    space = PullbackManifold(spherical_chart, dim=2)
    other_space = Hypersphere(2)
    data_generator = SphericalPatchData(space)
    point_transformer = SphericalToExtrinsic()
    testing_data = SphereChartExtrinsicData()


class SphereChartIntrinsicData(TestData):
    trials = 1
    N_RANDOM_POINTS = [1, 5]
    tolerances = {
        "metric_matrix_random": {"atol": 1e-12},
        "cometric_matrix_random": {"atol": 1e-10},
        "christoffels_random": {"atol": 1e-10},
    }

    def metric_matrix_random_test_data(self):
        return self.generate_random_data()

    def cometric_matrix_random_test_data(self):
        return self.generate_random_data()

    def christoffels_random_test_data(self):
        return self.generate_random_data()


class TestSphereChartVsHypersphereIntrinsic(RiemannianMetricComparisonTestCase, metaclass=DataBasedParametrizer):
    space = PullbackManifold(spherical_chart, dim=2)
    other_space = Hypersphere(2, intrinsic=True, equip=False).equip_with_metric(HypersphereMetricInChart)
    data_generator = SphericalPatchData(space)
    testing_data = SphereChartIntrinsicData()
