"""Sphinx configuration of the pullback-manifold documentation.

Build (from the repository root; warnings are errors):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Document the sources next to this file, whatever copy of the package is installed.
sys.path.insert(0, str(ROOT))

# geomstats 2.8 calls torch.jit.script at import time; that deprecation is not ours to show.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pullback_manifold  # noqa: E402  (before geomstats: selects its pytorch backend)

project = "pullback-manifold"
author = "pullback-manifold developers"
copyright = "pullback-manifold developers"
release = pullback_manifold.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "requirements.txt", "guide/snippets/*"]

# --- MyST (narrative pages are Markdown) -------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- autodoc / numpydoc --------------------------------------------------------
# Classes list their members explicitly in api/*.rst: PullbackManifold and its
# metric inherit dozens of geomstats methods, which must not flood the pages.
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc's "Parameters" sections carry the types and shapes
autodoc_class_signature = "mixed"
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# --- HTML ----------------------------------------------------------------------
html_theme = "furo"
html_title = f"pullback-manifold {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"


# --- docstring pre-processing --------------------------------------------------
_SHAPE = re.compile(r"shape=\[[^\]]*\]")


def _escape_shape_stars(app, what, name, obj, options, lines):
    """Escape ``*`` in ``shape=[n, *out]`` type specs, which reST would read as emphasis.

    Runs before numpydoc (priority 400 < its 500), on the raw docstring lines.
    """
    for i, line in enumerate(lines):
        if "shape=[" in line and "*" in line:
            lines[i] = _SHAPE.sub(lambda m: re.sub(r"(?<!\\)\*", r"\\*", m.group(0)), line)


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_stars, priority=400)
