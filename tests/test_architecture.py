"""The package's structure: one skeleton, a file per rule, no import cycle
and no import inside a function."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'soap_optax'
RULES = ('_rotated_adam', '_shampoo', '_adafactor', '_kl_shampoo')


def _modules():
  return {path.stem: ast.parse(path.read_text())
          for path in PACKAGE.glob('*.py')}


def _imports(tree):
  """The package modules a module imports at its top level."""
  found = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module == 'soap_optax':
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('soap_optax.')):
      found.add(node.module.split('.', 1)[1])
  return found


def test_no_import_cycle_and_no_import_inside_a_function():
  modules = _modules()
  graph = {name: _imports(tree) & set(modules)
           for name, tree in modules.items()}
  done, active = set(), []

  def visit(name):
    assert name not in active, f'import cycle: {active + [name]}'
    if name in done:
      return
    active.append(name)
    for other in graph[name]:
      visit(other)
    active.pop()
    done.add(name)

  for name in graph:
    visit(name)
  for name, tree in modules.items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inner = [n for n in ast.walk(node)
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not inner, f'{name}.{node.name} imports inside its body'


def test_rules_sit_on_the_skeleton_and_not_on_each_other():
  modules = _modules()
  for rule in RULES:
    imports = _imports(modules[rule])
    assert '_skeleton' in imports, rule
    assert not imports & (set(RULES) - {rule}), (rule, imports)
  # Only the skeleton drives the refresh and builds the state; the mesh
  # module knows nothing of the plan, state or rules above it.
  assert not _imports(modules['_mesh']) & set(modules)
  # The per-unit math knows nothing of the plan, state or rules either.
  for leaf in ('_kronecker', '_batching', '_staleness'):
    assert not _imports(modules[leaf]) & set(modules), leaf
  for module in ('_estimators', '_floors', '_solvers'):
    assert _imports(modules[module]) & set(modules) <= {
        '_kronecker', '_factored'}, module
