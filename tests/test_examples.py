"""The examples run end to end (``--quick``) and print what they claim.

Each example runs in a subprocess with ``OMP_NUM_THREADS=1``, writing into a temporary
directory. Besides the exit status and the pictures, the tests check printed facts that
can fail: every logarithm converged, the scores are scores, and -- the library's
promise -- geodesic distances and Fréchet means do not depend on the latent
parametrization while Euclidean ones do.

Slow (minutes: geodesics of the digits VAE take hundreds of ODE steps each), so
excluded from the default run: ``python -m pytest -m slow tests/test_examples.py``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOAT = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan)"


def run_example(name: str, out: pathlib.Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=3600,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def assert_picture(path: pathlib.Path) -> None:
    from matplotlib.image import imread

    assert path.exists(), f"{path.name} was not written"
    assert path.stat().st_size > 10_000, f"{path.name} is only {path.stat().st_size} bytes"
    image = imread(path)
    assert min(image.shape[:2]) > 100, image.shape
    assert image[..., :3].std() > 0.05, f"{path.name} is (nearly) blank"


def converged_counts(stdout: str) -> list[tuple[int, int]]:
    """``(converged, total)`` of every ``LogResult.summary()`` line printed."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) pairs converged", stdout)]


def number_after(label: str, stdout: str) -> float:
    match = re.search(re.escape(label) + r"\s*" + FLOAT, stdout)
    assert match, f"{label!r} not found in the output:\n{stdout[-3000:]}"
    return float(match.group(1))


def test_digits_example(tmp_path):
    stdout = run_example("digits_vae.py", tmp_path)
    for name in ("digits_latent.png", "digits_interpolations.png", "digits_means.png"):
        assert_picture(tmp_path / name)

    counts = converged_counts(stdout)
    assert len(counts) >= 2, stdout  # the Fréchet-mean check and the batched solve
    assert all(done == total for done, total in counts), counts

    # the interpolation table: the decoded geodesic and straight line join the same codes
    rows = re.findall(r"^\s+(\d) to (\d)\s+" + r"\s+".join([FLOAT] * 5), stdout, flags=re.MULTILINE)
    assert rows, stdout
    for row in rows:
        geodesic, line, chord = (float(x) for x in row[2:5])
        assert geodesic > 0 and line > 0 and chord > 0

    # the scores table: three distances, each with ARI in [-1, 1] and the rest in [0, 1]
    scores = re.findall(r"^\s+(geodesic \(pull-back\)|Euclidean latent|pixels \(64-D, reference\))\s+"
                        + r"\s+".join([FLOAT] * 4), stdout, flags=re.MULTILINE)
    assert [s[0] for s in scores] == ["geodesic (pull-back)", "Euclidean latent", "pixels (64-D, reference)"], stdout
    for _, ari, pur, nn1, nn3 in scores:
        assert -1 <= float(ari) <= 1
        assert all(0 <= float(x) <= 1 for x in (pur, nn1, nn3))
    assert "Timings" in stdout and re.search(r"total\s+" + FLOAT + " s", stdout)


def test_identifiability_example(tmp_path):
    stdout = run_example("identifiability.py", tmp_path)
    assert_picture(tmp_path / "identifiability.png")

    counts = converged_counts(stdout)
    assert len(counts) >= 4, stdout  # distances in z and w, logarithms at the means in z and w
    assert all(done == total for done, total in counts), counts

    assert number_after("decode every code identically: max |f(z) - (f o h^-1)(h(z))| =", stdout) < 1e-5
    # Euclidean latent distances change with the parametrization; geodesic distances do not
    assert number_after("max relative difference, Euclidean latent distances:", stdout) > 1e-2
    assert number_after("max relative difference, geodesic distances:", stdout) < 1e-6
    assert number_after("max latent gap along the curves:", stdout) < 1e-4
    # the Fréchet mean maps by h, the Euclidean mean does not
    assert number_after("max |h(Frechet z) - Frechet w| =", stdout) < 1e-5
    assert number_after("max |h(Euclid z) - Euclid w| =", stdout) > 1e-2
