"""The documentation: the site builds without warnings, every public name has
a reference page, and every Python block of the guides and the README runs.

Each page's blocks run top to bottom in a fresh process
(``tests/doc_blocks.py``), as a reader would paste them, so an example that
breaks fails here with the page's own line in the traceback.
"""

import html
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zlib

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


# A cross-reference to JAX, optax or Flax: a Python role naming one of them.
EXTERNAL_ROLE = re.compile(
    r'(?::|\{)(func|class|mod)(?::|\})`(?:[^`<]*<)?((?:jax|optax|flax)\.[\w.]+)>?`')
ROLE_OF = {'py:function': 'func', 'py:class': 'class', 'py:module': 'mod'}


def external_references() -> dict[str, set[str]]:
  """{name: roles} of every reference into JAX, optax or Flax that the site
  renders (the guides and the package's docstrings)."""
  sources = [*DOCS.glob('*.md'), *(ROOT / 'soap_optax').rglob('*.py')]
  references = {}
  for source in sources:
    for role, name in EXTERNAL_ROLE.findall(source.read_text()):
      references.setdefault(name, set()).add(role)
  return references


def _python_object(name: str):
  """The object a dotted name names in the installed packages, by import
  and attribute lookup; a ``LookupError`` if there is none."""
  parts = name.split('.')
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:split]))
    except ImportError:
      continue
    for attribute in parts[split:]:
      if not hasattr(obj, attribute):
        raise LookupError(name)
      obj = getattr(obj, attribute)
    return obj
  raise LookupError(name)


def _inventory_type(obj) -> str:
  if inspect.ismodule(obj):
    return 'py:module'
  return 'py:class' if inspect.isclass(obj) else 'py:function'


def write_inventories(folder: pathlib.Path) -> None:
  """Sphinx inventories (objects.inv, version 2) for jax, optax and flax
  that hold the names this site references, each typed by what it is in the
  installed package, so a misspelt name or a wrong role fails the nitpicky
  build as it would against the projects' own inventories. The addresses
  follow the ``name.html`` pattern: the tests check that links are made, not
  where the projects put their pages."""
  entries = {'jax': [], 'optax': [], 'flax': []}
  for name in external_references():
    kind = _inventory_type(_python_object(name))
    entries[name.split('.')[0]].append(f'{name} {kind} 1 {name}.html -')
  for project, lines in entries.items():
    header = (f'# Sphinx inventory version 2\n# Project: {project}\n'
              '# Version: \n# The remainder of this file is compressed using '
              'zlib.\n').encode()
    body = zlib.compress(('\n'.join(sorted(lines)) + '\n').encode())
    (folder / f'{project}.inv').write_bytes(header + body)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """The site, built once with warnings as errors, its links into JAX,
  optax and Flax resolved against local inventories (no network)."""
  out = tmp_path_factory.mktemp('site')
  (out / 'inventories').mkdir()
  write_inventories(out / 'inventories')
  env = dict(os.environ,
             SOAP_OPTAX_DOCS_INVENTORIES=str(out / 'inventories'))
  env.pop('SOAP_OPTAX_DOCS_OFFLINE', None)
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '-n', '--keep-going', '-q', '-b',
       'html', '-d', str(out / 'doctrees'), str(DOCS), str(out / 'html')],
      capture_output=True, text=True, timeout=600, check=False, env=env)
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


def test_external_names_are_real_and_link_to_their_projects(site):
  """Every reference into JAX, optax and Flax names an object of the
  installed package with the role of its kind, and renders as a link into
  that project's documentation."""
  references = external_references()
  assert {'optax.GradientTransformation', 'optax.chain', 'jax.sharding.Mesh',
          'flax.nnx.Optimizer'} <= set(references)
  for name, roles in references.items():
    assert roles == {ROLE_OF[_inventory_type(_python_object(name))]}, name
  with pytest.raises(LookupError):
    _python_object('optax.chian')
  index = (site / 'index.html').read_text()
  assert ('href="https://optax.readthedocs.io/en/latest/'
          'optax.GradientTransformation.html"') in index
  sharding = (site / 'sharding.html').read_text()
  assert 'href="https://docs.jax.dev/en/latest/jax.sharding.Mesh.html"' in (
      sharding)


def test_the_landing_page_offers_the_source_and_its_install(site):
  """The landing page links the source archive the site carries (the
  repository's tracked files in one ``soap_optax/`` folder) and says how to
  unpack and install it."""
  index = (site / 'index.html').read_text()
  link = re.search(r'href="(_downloads/[^"]+/soap_optax-source\.tar\.gz)"',
                   index)
  assert link, 'no link to the source archive'
  words = _article(site / 'index.html')
  assert 'tar xzf soap_optax source tar gz cd soap_optax pip install e' in (
      words)
  with tarfile.open(site / link.group(1)) as archive:
    members = {m.name for m in archive.getmembers() if m.isfile()}
  tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT,
                           capture_output=True, text=True,
                           check=True).stdout.split('\0')
  assert members == {f'soap_optax/{name}' for name in tracked
                     if name and (ROOT / name).is_file()}
  assert {'soap_optax/pyproject.toml', 'soap_optax/README.md',
          'soap_optax/soap_optax/__init__.py'} <= members


def test_the_source_archive_rebuilds_from_itself(site, tmp_path):
  """Outside a git checkout (the archive unpacked) the docs configuration
  picks the same files by ``.gitignore``'s patterns, its own outputs
  (notebook copies, the archive) and build folders left out."""
  archive_path = next((site / '_downloads').glob('*/soap_optax-source.tar.gz'))
  with tarfile.open(archive_path) as archive:
    archive.extractall(tmp_path, filter='data')
    members = {m.name for m in archive.getmembers() if m.isfile()}
  unpacked = tmp_path / 'soap_optax'
  # Files a build or a test run leaves behind, which the archive must skip.
  (unpacked / 'soap_optax' / '__pycache__').mkdir()
  (unpacked / 'soap_optax' / '__pycache__' / 'x.pyc').write_bytes(b'')
  (unpacked / 'docs' / '_build').mkdir()
  (unpacked / 'docs' / '_build' / 'index.html').write_text('')
  env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path))
  subprocess.run([sys.executable, str(unpacked / 'docs' / 'conf.py')],
                 cwd=unpacked, env=env, check=True, timeout=120)
  with tarfile.open(unpacked / 'docs' / '_generated' /
                    'soap_optax-source.tar.gz') as archive:
    rebuilt = {m.name for m in archive.getmembers() if m.isfile()}
  assert rebuilt == members, (rebuilt ^ members)


def test_every_guide_and_the_notebook_are_in_the_site(site):
  for guide in GUIDES + ('api', 'architecture', 'benchmarks', 'performance',
                        'glossary'):
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


# Characters of a formula that Python code never holds.
FORMULA_CHARACTERS = '²³√Σ∑⊗⊙·ᵀ⁻½∈'
RAW_LATEX = re.compile(
    r'\\(frac|sqrt|top|begin|mathrm|varepsilon|epsilon|beta|times|le|ge|'
    r'odot|otimes|sum|lambda|kappa)\b|\$[^$\s][^$]*\$')


def formula_defects(page: str) -> list[str]:
  """A built page's formulas that did not reach MathJax: raw LaTeX (or
  ``$...$``) in its text, and formula characters inside inline code."""
  body = page[page.index('<body'):]
  body = re.sub(r'<script.*?</script>', ' ', body, flags=re.S)
  body = re.sub(r'<(span|div) class="math[^"]*">.*?</\1>', ' ', body,
                flags=re.S)
  body = re.sub(r'<pre.*?</pre>', ' ', body, flags=re.S)
  defects = []
  for code in re.findall(r'<code class="docutils literal[^"]*">(.*?)</code>',
                         body, flags=re.S):
    code = html.unescape(re.sub(r'<[^>]+>', '', code))
    if any(character in code for character in FORMULA_CHARACTERS):
      defects.append(f'formula as code: {code}')
  text = html.unescape(re.sub(r'<[^>]+>', ' ', body))
  defects += [f'raw LaTeX: {text[max(0, m.start() - 30):m.end() + 30]}'
              for m in RAW_LATEX.finditer(text)]
  return defects


def test_formulas_are_typeset_on_every_page(site):
  """Every page, the API pages, the notebook and the measurement log
  included (not the highlighted sources): no raw LaTeX, no formula written
  as inline code."""
  pages = [p for p in site.rglob('*.html')
           if '_modules' not in p.parts and '<article' in p.read_text()]
  assert len(pages) > 40
  defects = {p.name: formula_defects(p.read_text()) for p in pages}
  assert not {name: d for name, d in defects.items() if d}
  # The check sees both kinds of defect.
  planted = ('<body><p>costs <code class="docutils literal notranslate">'
             '<span class="pre">d²</span></code> and \\(\\sqrt{v}\\) '
             'and $x^2$</p></body>')
  assert len(formula_defects(planted)) == 3, formula_defects(planted)


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
