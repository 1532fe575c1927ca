"""Sphinx configuration of the soap_optax documentation.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` after
``pip install -e ".[docs]"``; ``tests/test_docs.py`` does the same in CI.
"""

import pathlib
import shutil

import soap_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent

project = 'soap_optax'
author = 'the soap_optax authors'
copyright = '2026, the soap_optax authors'  # pylint: disable=redefined-builtin
release = soap_optax.__version__

extensions = [
    'myst_nb',  # MyST Markdown pages and notebooks (it loads myst_parser).
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'sphinx_copybutton',  # A copy button on every code block.
    # MathJax 3 copied into the site's _static (no CDN): formulas render
    # offline.
    'sphinx-mathjax-offline',
]

# The copy button leaves out the prompts of doctest examples and shells.
copybutton_prompt_text = r'>>> |\.\.\. |\$ '
copybutton_prompt_is_regexp = True

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}
templates_path = ['_templates']
exclude_patterns = ['_build', 'README.md']

# The API reference: one page per public name, generated from the docstrings.
autosummary_generate = True
autodoc_typehints = 'none'  # the docstrings say what each argument takes
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The states' Attributes sections say what each field holds; the field
# annotations (``jax.Array``, the engine's private state class) would be
# links to nowhere on this site.
napoleon_attr_annotations = False

# A dead cross-reference fails the build (tests/test_docs.py builds with -n).
nitpicky = True

# MyST: $...$ and $$...$$ math, ::: fences, heading anchors for links.
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3

# The notebook is rendered with the outputs it was saved with; the tests run
# it in a kernel (tests/test_notebooks.py), so the build does not execute it.
nb_execution_mode = 'off'

html_theme = 'sphinx_book_theme'
html_title = 'soap_optax'
html_theme_options = {'show_toc_level': 2}


def _copy_notebooks():
  """The notebooks live in ``notebooks/``; Sphinx reads them from here."""
  target = pathlib.Path(__file__).resolve().parent / '_notebooks'
  target.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    shutil.copyfile(notebook, target / notebook.name)


_copy_notebooks()
