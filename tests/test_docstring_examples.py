"""The ``Examples:`` sections of the public docstrings run, as written.

Every public name of ``soap_optax`` (``soap_optax.__all__``) and of
``soap_optax.problems`` (its functions and classes) is collected with
``doctest.DocTestFinder`` (the object and its own methods; nothing it
imports) and run with ``doctest.DocTestRunner``. Each example imports what it
uses, as a reader pasting it would: the examples run with empty globals, not
in their module's namespace. They run with ``jax_enable_x64`` off (the
documented outputs are float32), all of them once in a fresh Python process,
so that nothing an example does to JAX's global state reaches the test
worker.

Which names must have an example: every public function and class, except
the ``NamedTuple`` records (the transforms' states, and the problems'
``KroneckerQuadratic`` and ``DeadFeatureRun``): those are made by the
function that returns them, whose example shows them (each has a short
example of its own too today, run here like the rest). A new public name
without an ``Examples:`` section fails
``test_every_public_name_has_an_example``.
"""

import doctest
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import soap_optax
from soap_optax import problems

OPTIONFLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _public_objects() -> dict[str, object]:
  """``name -> object`` for every public name: ``soap_optax.__all__`` and
  the functions and classes defined in ``soap_optax.problems``."""
  objects = {name: getattr(soap_optax, name) for name in soap_optax.__all__}
  for name, obj in vars(problems).items():
    if (not name.startswith('_')
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == problems.__name__):
      objects[f'problems.{name}'] = obj
  return objects


PUBLIC = _public_objects()


def _is_record(obj: object) -> bool:
  """A ``NamedTuple`` class: a state or a result record."""
  return (inspect.isclass(obj) and issubclass(obj, tuple)
          and hasattr(obj, '_fields'))


def _doctests(name: str) -> list[doctest.DocTest]:
  """The examples of ``name``'s docstring and of its own methods'."""
  obj = PUBLIC[name]
  finder = doctest.DocTestFinder(exclude_empty=True)
  tests, seen = [], set()
  for test in finder.find(obj, name, module=inspect.getmodule(obj),
                          globs={}):
    key = (test.filename, test.lineno, test.docstring)
    if test.examples and key not in seen:
      seen.add(key)
      tests.append(test)
  return sorted(tests, key=lambda t: t.name)


def test_the_public_names_are_found():
  assert set(soap_optax.__all__) <= set(PUBLIC)
  for name in ('kronecker_quadratic', 'run_optimizer', 'steps_to_reach',
               'dead_feature_regression', 'dead_weight_movement',
               'KroneckerQuadratic'):
    assert f'problems.{name}' in PUBLIC, name


def run_examples(names) -> dict[str, tuple[int, int, str]]:
  """``name -> (attempted, failed, report)`` for the examples of ``names``,
  run with ``jax_enable_x64`` off."""
  results = {}
  with jax.enable_x64(False):
    for name in names:
      report = []
      runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS, verbose=False)
      attempted = failed = 0
      for test in _doctests(name):
        result = runner.run(test, out=report.append, clear_globs=True)
        failed += result.failed
        attempted += result.attempted
      results[name] = (attempted, failed, ''.join(report))
  return results


@pytest.fixture(scope='module')
def example_results():
  """Every example, run once in a fresh Python process: whatever an example
  does to JAX's global state (its config, its compilation cache, a mesh)
  stays out of the test worker, which goes on to other files."""
  code = ('import json, sys; sys.path.insert(0, sys.argv[1]); '
          'import test_docstring_examples as t; '
          'print(json.dumps(t.run_examples(sorted(t.PUBLIC))))')
  # Without the suite's persistent compilation cache: the examples compile
  # the same small programs as other test files, and two processes writing
  # and reading one cache entry at once crashed a worker inside JAX (a
  # segmentation fault in the cache's write, then in its read).
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE='false')
  result = subprocess.run(
      [sys.executable, '-c', code, str(pathlib.Path(__file__).parent)],
      capture_output=True, text=True, timeout=600, check=False, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('name', sorted(PUBLIC))
def test_examples_run(name, example_results):
  if not _doctests(name):
    pytest.skip(f'{name} has no examples')
  attempted, failed, report = example_results[name]
  assert attempted > 0, name
  assert failed == 0, (
      f'{failed} of the {attempted} examples of {name} failed:\n' + report)


def test_every_public_name_has_an_example():
  missing = []
  for name, obj in sorted(PUBLIC.items()):
    if _is_record(obj):
      continue
    doc = inspect.getdoc(obj) or ''
    has_section = re.search(r'^Examples:\s*$', doc, re.MULTILINE)
    if not has_section or not _doctests(name):
      missing.append(name)
  assert not missing, (
      'these public names have no "Examples:" section with >>> lines in '
      f'their docstrings: {missing}')
