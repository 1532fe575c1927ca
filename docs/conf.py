"""Sphinx configuration of the soap_optax documentation.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` after
``pip install -e ".[docs]"``; ``tests/test_docs.py`` does the same in CI
(with ``-n``, and local inventories for the links into JAX, optax and Flax:
see ``EXTERNAL_DOCS`` below).
"""

import fnmatch
import os
import pathlib
import shutil
import subprocess
import tarfile

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
    'sphinx.ext.intersphinx',
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
exclude_patterns = ['_build', '_generated', 'README.md']

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

# Links into the JAX, optax and Flax documentation: names such as
# :class:`optax.GradientTransformation` resolve through each project's
# inventory (objects.inv). By default Sphinx downloads the inventories. To
# build without a network, either point SOAP_OPTAX_DOCS_INVENTORIES at a folder
# holding jax.inv, optax.inv and flax.inv (tests/test_docs.py writes one from
# the installed packages, and only then is a name the inventories lack an
# error), or set SOAP_OPTAX_DOCS_OFFLINE=1: the three projects' names then
# render as code without links. Against the projects' own inventories a name
# they document elsewhere than under the name users import (or not at all)
# renders as code too, instead of failing the nitpicky build.
EXTERNAL_DOCS = {
    'jax': 'https://docs.jax.dev/en/latest/',
    'optax': 'https://optax.readthedocs.io/en/latest/',
    'flax': 'https://flax.readthedocs.io/en/latest/',
}
_offline = os.environ.get('SOAP_OPTAX_DOCS_OFFLINE') == '1'
_inventories = None if _offline else os.environ.get(
    'SOAP_OPTAX_DOCS_INVENTORIES')
if _inventories:
  intersphinx_mapping = {
      name: (url, os.path.join(os.path.abspath(_inventories), f'{name}.inv'))
      for name, url in EXTERNAL_DOCS.items()}
else:
  nitpick_ignore_regex = [
      (r'py:.*', r'(%s)(\..*)?' % '|'.join(EXTERNAL_DOCS))]
  intersphinx_mapping = {} if _offline else {
      name: (url, None) for name, url in EXTERNAL_DOCS.items()}

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


# The landing page offers the source of this version as an archive, so the
# site says where the code is and how to install it without a repository
# address. ``ARCHIVE`` is written here at every build (git-ignored).
ARCHIVE = pathlib.Path(__file__).resolve().parent / '_generated' / (
    'soap_optax-source.tar.gz')


def _tracked_files() -> list[str]:
  """The repository's files as git tracks them; outside a git checkout of
  this project (an unpacked archive), the files that ``.gitignore``'s
  patterns (a name or a folder/) leave."""
  try:
    listing = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True,
                             capture_output=True).stdout
    names = sorted(name for name in os.fsdecode(listing).split('\0')
                   if name and (ROOT / name).is_file())
    if 'pyproject.toml' in names:
      return names
  except (OSError, subprocess.CalledProcessError):
    pass
  ignore = ROOT / '.gitignore'
  patterns = [line.strip().rstrip('/') for line in
              (ignore.read_text().splitlines() if ignore.exists() else [])
              if line.strip() and not line.startswith('#')]
  patterns.append('.git')

  def ignored(relative: str) -> bool:
    """Whether a pattern matches the path's own name or the whole path
    (its folders were checked on the way down)."""
    name = relative.rsplit('/', 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) or
               fnmatch.fnmatch(relative, pattern) for pattern in patterns)

  names = []
  for folder, subfolders, files in os.walk(ROOT):
    prefix = pathlib.Path(folder).relative_to(ROOT).as_posix()
    prefix = '' if prefix == '.' else prefix + '/'
    # Ignored folders (.git, build outputs, a virtual environment) are not
    # walked into.
    subfolders[:] = [d for d in subfolders if not ignored(prefix + d)]
    names += [prefix + f for f in files if not ignored(prefix + f)]
  return sorted(names)


def _write_source_archive():
  """``ARCHIVE``: the tracked files under one ``soap_optax/`` folder."""
  ARCHIVE.parent.mkdir(exist_ok=True)
  with tarfile.open(ARCHIVE, 'w:gz') as archive:
    for name in _tracked_files():
      archive.add(ROOT / name, arcname=f'soap_optax/{name}', recursive=False)


_write_source_archive()
