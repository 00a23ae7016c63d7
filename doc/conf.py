"""Sphinx configuration (autodoc + numpydoc + sphinx-gallery).

Build from the repository root, output outside the sources::

    python -m pip install "torch==2.13.0" -e ".[doc]"
    python -m sphinx -W doc build/doc

The build writes two folders of generated sources into ``doc/`` (both
git-ignored): ``generated/`` (autosummary stubs) and ``auto_examples/``
(the gallery, from ``examples/``; the ``plot_*.py`` examples are run).
"""

import os
import re

project = "sklearn_cif"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "_intersphinx", "_templates"]

autosummary_generate = True
numpydoc_show_class_members = False
# numpydoc's docstring validation stays off (the default): with -W only real
# Sphinx errors and warnings fail the build.
numpydoc_validation_checks = set()

# Every inventory falls back to an empty local one, so a build without network
# (CI here) still passes -W: links to these projects are then plain text.
# With network the remote inventory is used and the fallback is never read.
_OFFLINE = "_intersphinx/empty.inv"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, _OFFLINE)),
    "numpy": ("https://numpy.org/doc/stable", (None, _OFFLINE)),
    "scipy": ("https://docs.scipy.org/doc/scipy", (None, _OFFLINE)),
    "sklearn": ("https://scikit-learn.org/stable", (None, _OFFLINE)),
    "torch": ("https://docs.pytorch.org/docs/stable", (None, _OFFLINE)),
    "skorch": ("https://skorch.readthedocs.io/en/stable", (None, _OFFLINE)),
}
intersphinx_timeout = 10

# The gallery examples train tiny torch models: more threads gain nothing, and
# torch's default (one per core) is several times slower where cores are busy.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # run only examples/plot_*.py (the others are shown as source)
    "filename_pattern": re.escape(os.sep) + "plot_",
    "download_all_examples": False,
}


def _skip_member(app, what, name, obj, skip, options):
    # scikit-learn's generated metadata-routing setters (set_fit_request, ...):
    # their docstrings link into scikit-learn's own glossary.
    if re.fullmatch(r"set_\w+_request", name):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
