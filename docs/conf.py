"""Sphinx configuration for Prism's documentation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

import prism  # noqa: E402

project = "Prism"
author = "Prism developers"
copyright = "2026, Prism developers"
release = prism.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
]

numpydoc_show_class_members = False
numpydoc_validation_checks: set[str] = set()
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "none"
autosummary_generate = False
intersphinx_mapping: dict[str, tuple[str, None]] = {}
templates_path: list[str] = []
plot_html_show_source_link = False
plot_html_show_formats = False
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "tutorials/README.rst"]
# Furo: a maintained theme whose code blocks and tables scroll instead of being
# clipped, readable from phone width to wide screens.
html_theme = "furo"
html_title = f"Prism {release}"
html_static_path = ["_static"]
html_css_files = ["prism.css"]
html_theme_options = {"navigation_with_keys": True}
pygments_style = "friendly"
pygments_dark_style = "monokai"


def _keep_page_contents(app, doctree):
    """Keep the pages' own "On this page" lists: Furo hides its side ToC below ~1310 px."""
    from docutils import nodes

    for topic in doctree.findall(nodes.topic):
        if "contents" in topic["classes"]:
            topic["classes"].append("this-will-duplicate-information-and-it-is-still-useful-here")


def setup(app):
    app.connect("doctree-read", _keep_page_contents)

sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r"/tutorial_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "abort_on_example_error": True,
    "show_memory": False,
}

# Tutorials and doctests run on the CPU reference; keep the interpreter off so
# nothing pretends to be a GPU kernel.
os.environ.setdefault("MPLBACKEND", "Agg")
doctest_global_setup = "import torch\ntorch.manual_seed(0)\n"

# The theory page's figures are drawn by the package itself, every build, so
# the pictures always show what the code computes.
from prism.theory.plots import write_all_figures  # noqa: E402

write_all_figures(str(ROOT / "docs" / "_static" / "theory"))

# The Performance page's tables come from the committed benchmark JSON.
from performance_tables import render as render_performance  # noqa: E402

render_performance(ROOT)

# The Estimators page's tables come from the estimator registry and the
# committed sweep and benchmark JSON.
from estimator_tables import render as render_estimators  # noqa: E402

render_estimators(ROOT)
