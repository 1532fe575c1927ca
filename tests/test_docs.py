"""The documentation: the site builds without warnings, every public name has
a reference page, and every Python block of the guides and the README runs.

Each page's blocks run top to bottom in a fresh process
(``tests/doc_blocks.py``), as a reader would paste them, so an example that
breaks fails here with the page's own line in the traceback.
"""

import html
import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

import soap_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
RUNNER = pathlib.Path(__file__).resolve().parent / 'doc_blocks.py'
sys.path.insert(0, str(RUNNER.parent))

import doc_blocks  # pylint: disable=g-import-not-at-top,wrong-import-position

PAGES = sorted(p.relative_to(ROOT).as_posix() for p in
               [ROOT / 'README.md', *DOCS.glob('*.md')]
               if doc_blocks.python_blocks(p.read_text()))
GUIDES = ('getting_started', 'choosing_and_tuning', 'scanned_and_blocks',
          'sharding', 'numerics', 'adaptive_refresh', 'pytorch_soap')


def _words(text: str) -> str:
  """Lower-case words, punctuation and markup dropped."""
  return ' '.join(re.sub(r'[^0-9a-z_]+', ' ', text.lower()).split())


def _article(path: pathlib.Path) -> str:
  """The words of an HTML page's main article."""
  page = path.read_text()
  page = page[page.index('<article'):page.index('</article>')]
  return _words(html.unescape(re.sub(r'<[^>]+>', ' ', page)))


def _rendered_summary(docstring: str) -> str:
  """A docstring's first line as the site shows it: roles by their target's
  last name (``:func:`~a.b``` as ``b``), literal markup dropped."""
  first = ' '.join(docstring.strip().split('\n')[0].split())
  first = re.sub(r':\w+:`~?([^`]*)`',
                 lambda m: m.group(1).rsplit('.', 1)[-1], first)
  return _words(first)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """The site, built once with warnings as errors."""
  out = tmp_path_factory.mktemp('site')
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '-n', '--keep-going', '-q', '-b',
       'html', '-d', str(out / 'doctrees'), str(DOCS), str(out / 'html')],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return out / 'html'


def test_every_public_name_has_a_rendered_reference_page(site):
  names = [*soap_optax.__all__, 'problems']
  for name in names:
    page = site / '_autosummary' / f'soap_optax.{name}.html'
    assert page.exists(), name
    obj = (importlib.import_module('soap_optax.problems') if name == 'problems'
           else getattr(soap_optax, name))
    summary = _rendered_summary(obj.__doc__ or '')
    assert summary, f'{name} has no docstring'
    assert summary in _article(page), name
  # The docstrings' math reaches MathJax, not the page as raw markup.
  soap_page = (site / '_autosummary' / 'soap_optax.soap.html').read_text()
  assert 'math notranslate' in soap_page and '.. math::' not in soap_page


def test_every_guide_and_the_notebook_are_in_the_site(site):
  for guide in GUIDES + ('api', 'architecture', 'benchmarks'):
    assert (site / f'{guide}.html').exists(), guide
  notebook = site / '_notebooks' / 'shampoo_adafactor_identity.html'
  assert notebook.exists()
  # Rendered with its saved outputs: the two figures are in the page.
  assert notebook.read_text().count('<img') >= 2


def test_math_renders_offline_and_code_has_a_copy_button(site):
  """MathJax is served with the site (no CDN) and code blocks get a copy
  button."""
  page = (site / '_autosummary' / 'soap_optax.soap.html').read_text()
  scripts = re.findall(r'<script[^>]*src="([^"]+)"', page)
  mathjax = [src for src in scripts if 'mathjax' in src.lower()]
  assert mathjax and all(not src.startswith(('http:', 'https:', '//'))
                         for src in mathjax), mathjax
  assert (site / '_autosummary' / mathjax[0].split('?')[0]).resolve().exists()
  assert any('clipboard' in src or 'copybutton' in src for src in scripts)


def test_no_user_page_names_a_private_module(site):
  """The guides and the API pages (not the highlighted sources under
  ``_modules``, nor the benchmark log) name no private ``soap_optax._*``."""
  pages = [p for p in site.rglob('*.html')
           if '_modules' not in p.parts and '<article' in p.read_text()
           and p.name not in ('benchmarks.html', 'architecture.html')]
  offending = [p.name for p in pages
               if re.search(r'soap_optax\._[a-z]', _article(p).replace(
                   ' ', '.'))
               or re.search(r'href="[^"]*soap_optax\._[a-z]', p.read_text())]
  assert not offending, offending


def test_the_engine_options_are_documented_under_a_public_page(site):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from soap_optax import _skeleton  # pylint: disable=g-import-not-at-top
  api = (site / 'api.html').read_text()
  section = api[api.index('id="engine-options"'):]
  for field in dataclasses.fields(_skeleton.EngineConfig):
    if field.name != 'foam_allowed':  # Set by each transform.
      term = ('<code class="docutils literal notranslate"><span class="pre">'
              f'{field.name}</span></code>')
      assert term in section, field.name


def test_the_glossary_defines_the_terms_the_guides_use(site):
  page = (site / 'glossary.html').read_text()
  for term in ('unit', 'stack', 'block', 'factor', 'basis', 'refresh',
               'staleness', 'grafting', 'rejected unit', 'null-space basis',
               'owner', 'bucket'):
    assert f'id="term-{term.replace(" ", "-")}"' in page, term
  # Linked from their first use on the getting-started page.
  assert 'glossary.html#term-unit' in (
      site / 'getting_started.html').read_text()


def test_every_guide_has_code_that_runs():
  for guide in GUIDES:
    assert f'docs/{guide}.md' in PAGES, guide


@pytest.mark.parametrize('page', PAGES)
def test_page_code_blocks_run(page):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  result = subprocess.run(
      [sys.executable, str(RUNNER), page], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  ran = len(doc_blocks.python_blocks((ROOT / page).read_text()))
  assert f'{page}: {ran} blocks ran' in result.stdout


def test_readme_is_short_and_one_click_from_the_guides():
  readme = (ROOT / 'README.md').read_text()
  assert len(readme.splitlines()) <= 250
  for guide in ('sharding', 'choosing_and_tuning', 'numerics'):
    assert f'](docs/{guide}.md)' in readme, guide
  # .ci/run reads the first lines: the install, test and run commands.
  for tag in ('install', 'test', 'run'):
    assert f'```bash {tag}\n' in readme, tag


def test_blocks_are_found_as_a_reader_sees_them():
  text = '\n'.join([
      'Intro', '```python', 'a = 1', '```', '', '```bash', 'ls', '```',
      '- item', '', '  ```python', '  b = a + 1', '  ```', '~~~text',
      'not code', '~~~'])
  assert doc_blocks.python_blocks(text) == [(3, 'a = 1\n'), (12, 'b = a + 1\n')]
