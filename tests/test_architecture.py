"""The package's structure: one skeleton, a file per rule, no import cycle
and no import inside a function; a rule interface of five members and rules
small enough to read in a minute."""

import ast
import io
import pathlib
import tokenize

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'soap_optax'
RULES = ('_rotated_adam', '_shampoo', '_adafactor', '_kl_shampoo',
         '_soap_muon')


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


def _code_lines(source, first=1, last=None):
  """The lines of ``source`` (between ``first`` and ``last``) that hold code:
  no blank line, comment or docstring."""
  tree = ast.parse(source)
  docstrings = set()
  for node in ast.walk(tree):
    body = getattr(node, 'body', None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and body and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
  lines = set()
  skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
             tokenize.DEDENT, tokenize.ENDMARKER)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in skipped:
      lines.update(range(token.start[0], token.end[0] + 1))
  last = last or len(source.splitlines())
  return sorted(line for line in lines - docstrings if first <= line <= last)


def _rule_classes(tree):
  return [node for node in tree.body if isinstance(node, ast.ClassDef)
          and any(ast.unparse(base) == '_skeleton.Rule' for base in node.bases)]


def test_rule_interface_has_five_members():
  tree = _modules()['_skeleton']
  rule, = [node for node in tree.body
           if isinstance(node, ast.ClassDef) and node.name == 'Rule']
  members = []
  for node in rule.body:
    if isinstance(node, ast.FunctionDef):
      members.append(node.name)
    elif isinstance(node, ast.AnnAssign):
      members.append(node.target.id)
    elif isinstance(node, ast.Assign):
      members.extend(target.id for target in node.targets)
  assert members == ['State', 'carries_moments', 'init_stack', 'step',
                     'on_refresh']


def test_rules_are_small_and_delete_nothing_they_are_handed():
  for name in RULES:
    source = (PACKAGE / f'{name}.py').read_text()
    assert len(_code_lines(source)) <= 100, name
    classes = _rule_classes(ast.parse(source))
    assert len(classes) == 1, name
    deletes = [node for node in ast.walk(classes[0])
               if isinstance(node, ast.Delete)]
    assert not deletes, f'{name} deletes arguments it was handed'
    # Only the interface's methods: a rule's arithmetic is its step.
    methods = {node.name for node in classes[0].body
               if isinstance(node, ast.FunctionDef)}
    assert methods <= {'init_stack', 'step', 'on_refresh'}, (name, methods)


def test_soap_step_reads_like_optax_scale_by_adam():
  source = (PACKAGE / '_rotated_adam.py').read_text()
  rule, = _rule_classes(ast.parse(source))
  step, = [node for node in rule.body
           if isinstance(node, ast.FunctionDef) and node.name == 'step']
  assert len(_code_lines(source, step.lineno, step.end_lineno)) <= 25
