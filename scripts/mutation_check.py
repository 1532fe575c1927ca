"""Plants small bugs in the library, one at a time, and runs the tests.

Every mutant must be *killed* (some test fails). Each mutant is one textual
replacement in one file of ``soap_optax/`` (the file is restored afterwards,
whatever happens); the tests run are the mutant's own first (the quickest
to fail), then the core files, stopping at the first failure. Run by hand,
not in CI (each mutant costs a test run):

  python scripts/mutation_check.py [--only NAME,...] [--json PATH]

Prints one line per mutant: killed (by which test) or SURVIVED.
"""

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ('tests/test_transforms.py', 'tests/test_engine.py',
        'tests/test_stacks.py', 'tests/test_kl_shampoo.py',
        'tests/test_refresh.py', 'tests/test_contract.py',
        'tests/test_grafting.py')


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  first: tuple[str, ...] = ()


MUTANTS = (
    Mutant('adam bias correction off by one step', 'soap_optax/_rotated_adam.py',
           'jnp.sqrt(1 - b2**t) / (1 - b1**t)',
           'jnp.sqrt(1 - b2**(t + 1)) / (1 - b1**(t + 1))',
           ('tests/test_transforms.py',)),
    Mutant('swapped betas in the first moment', 'soap_optax/_rotated_adam.py',
           'mu = b1 * state.mu.astype(rotated.dtype) + (1 - b1) * rotated',
           'mu = b2 * state.mu.astype(rotated.dtype) + (1 - b2) * rotated',
           ('tests/test_transforms.py',)),
    Mutant('eps inside the square root', 'soap_optax/_rotated_adam.py',
           'mu / (jnp.sqrt(second_moment) + self.eps)',
           'mu / jnp.sqrt(second_moment + self.eps)',
           ('tests/test_transforms.py',)),
    Mutant('factor EMA weights swapped', 'soap_optax/_estimators.py',
           'beta * old + (1 - jnp.asarray(beta, old.dtype)) * new',
           '(1 - jnp.asarray(beta, old.dtype)) * old + beta * new',
           ('tests/test_engine.py',)),
    Mutant('dropped permutation of the second moment',
           'soap_optax/_kronecker.py',
           '    x = jnp.take(x, order, axis=axis)\n', '    x = x\n',
           ('tests/test_transforms.py',)),
    Mutant('rotation with Q instead of Q^T', 'soap_optax/_kronecker.py',
           'def rotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:',
           'def rotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:'
           '\n  return unrotate(x, factors)',
           ('tests/test_engine.py',)),
    Mutant('Shampoo exponent halved', 'soap_optax/_shampoo.py',
           '_factored.inverse_power(v + shift, self.exponent)',
           '_factored.inverse_power(v + shift, self.exponent / 2)',
           ('tests/test_transforms.py',)),
    Mutant('rejection mask lets a non-finite unit through',
           'soap_optax/_skeleton.py',
           'jnp.isfinite(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))',
           'jnp.isfinite(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))'
           ' | True', ('tests/test_contract.py',)),
    Mutant('rounding floor off by a factor 10', 'soap_optax/_floors.py',
           'ROUNDING_FLOOR_ULPS = 1000.0', 'ROUNDING_FLOOR_ULPS = 10000.0',
           ('tests/test_numerics.py',)),
    # (Cutting the last full block off as a separate segment, divmod(length
    # - 1, ...), is an equivalent mutant: the same blocks in two pieces.)
    Mutant('every block boundary one row later', 'soap_optax/_stacks.py',
           'full, rest = divmod(length, block_size)',
           'block_size += 1; full, rest = divmod(length, block_size)',
           ('tests/test_stacks.py',)),
    Mutant('KL whitening exponent', 'soap_optax/_estimators.py',
           'x = x * _inverse_outer(values, axis, 0.5)',
           'x = x * _inverse_outer(values, axis, 0.25)',
           ('tests/test_kl_shampoo.py',)),
    Mutant('null-space threshold counts padded axes', 'soap_optax/_solvers.py',
           'd = jnp.maximum(live, 1).astype(values.dtype)',
           'd = jnp.asarray(values.shape[-1], values.dtype)',
           ('tests/test_stacks.py',)),
    Mutant('bucket inverse axis order', 'soap_optax/_exchange.py',
           'tuple(1 + axes.index(a)', 'tuple(1 + axes[a]',
           ('tests/test_stacks.py',)),
    Mutant('normalize_grads counts padding', 'soap_optax/_rotated_adam.py',
           '_kronecker.unit_mean(jnp.square(direction), view.extent)',
           '_kronecker.unit_mean(jnp.square(direction), None)',
           ('tests/test_stacks.py',)),
    Mutant('Adafactor total from the wrong axis', 'soap_optax/_factored.py',
           'total = jnp.sum(stats[0])', 'total = jnp.sum(stats[-1]) * 1.01',
           ('tests/test_transforms.py',)),
    Mutant('wrong owner in the exchange', 'soap_optax/_exchange.py',
           '    owners[s][u] = q\n', '    owners[s][u] = (q + 1) % num_shards\n',
           ('tests/test_sharding.py::'
            'test_every_unit_has_one_owner_and_each_shard_at_most_its_share',
            'tests/test_sharding.py::test_owners_balance_the_refresh_work')),
    Mutant('refresh one call late', 'soap_optax/_refresh.py',
           'scheduled = count % frequency == 0',
           'scheduled = count % frequency == 1',
           ('tests/test_refresh.py', 'tests/test_transforms.py')),
    Mutant('staggered phase one step late', 'soap_optax/_refresh.py',
           'scheduled = phases == count % plan.refresh_frequency',
           'scheduled = phases == (count - 1) % plan.refresh_frequency',
           ('tests/test_stacks.py',)),
    Mutant('grafting to the inverse norm ratio', 'soap_optax/_grafting.py',
           'm_norm / jnp.where(safe, d_norm, 1.0)',
           'd_norm / jnp.where(safe, m_norm, 1.0)',
           ('tests/test_grafting.py',)),
    # The skeleton's services to the rules (the smaller rule interface).
    Mutant('tracked quotients decay swapped', 'soap_optax/_skeleton.py',
           'beta * q + (1 - beta) * increments[axis]',
           '(1 - beta) * q + beta * increments[axis]',
           ('tests/test_refresh.py', 'tests/test_transforms.py')),
    Mutant('a moment-carrying rule steps on its initializing call',
           'soap_optax/_skeleton.py',
           'advanced = [ok & ~new for ok, new in zip(accepted, due.initializing)]',
           'advanced = [ok for ok, new in zip(accepted, due.initializing)]',
           ('tests/test_transforms.py',)),
    Mutant('moments not carried into the new bases',
           'soap_optax/_kronecker.py',
           "    dtype = self.old.stats[0].dtype\n",
           "    return x\n    dtype = self.old.stats[0].dtype\n",
           ('tests/test_transforms.py',)),
    Mutant('KL estimates not permuted at a refresh', 'soap_optax/_estimators.py',
           'return KLEstimates(change.per_axis(estimates.eigenvalues))',
           'return estimates', ('tests/test_kl_shampoo.py',)),
    Mutant('Shampoo Rayleigh floor from the frozen eigenvalues',
           'soap_optax/_shampoo.py',
           'floored, layout.interleave(view.quotients, diagonals)))',
           'floored, values))', ('tests/test_transforms.py',)),
    Mutant('null columns keep Householder\'s signs', 'soap_optax/_solvers.py',
           'sign = jnp.where(jnp.sum(orthonormal * reference, axis=0) < 0, -1, 1)',
           'sign = jnp.ones(d, jnp.int32)', ('tests/test_engine.py',)),
    Mutant('KL floor 1/c instead of 1/c^2', 'soap_optax/_estimators.py',
           'return 1.0 / float(min(max(d, low), high))**2',
           'return 1.0 / float(min(max(d, low), high))',
           ('tests/test_kl_shampoo.py',)),
    Mutant('solver padding before the factor not after',
           'soap_optax/_refresh.py',
           'widths = ((0, 0), (0, extra), (0, extra))',
           'widths = ((0, 0), (extra, 0), (extra, 0))',
           ('tests/test_refresh.py',)),
    Mutant('solver sizes: the worst cut within the bound',
           'soap_optax/_refresh.py',
           'least.append([min(((previous[i][0] + extra(i + 1, j),',
           'least.append([max(((previous[i][0] + extra(i + 1, j),',
           ('tests/test_refresh.py',)),
    Mutant('axes-only null space keeps the solver\'s null columns',
           'soap_optax/_solvers.py',
           '_axis_columns(on_axis, axes, basis.dtype), basis)',
           'basis, basis)', ('tests/test_engine.py', 'tests/test_refresh.py')),
    Mutant('opaque offsets: a loop that runs step times',
           'soap_optax/_stacks.py',
           'trips = jnp.minimum(jnp.asarray(step).astype(jnp.int32), 0)',
           'trips = jnp.asarray(step).astype(jnp.int32)',
           ('tests/test_stacks.py',)),
    Mutant('opaque offsets: a loop XLA folds away',
           'soap_optax/_stacks.py',
           'lambda _, v: v[1:] + v[:1], values)',
           'lambda _, v: v, values)', ('tests/test_stacks.py',)),
    Mutant('the update scatters at constant offsets',
           'soap_optax/_skeleton.py',
           '_stacks.scatter(directions, plan, count)',
           '_stacks.scatter(directions, plan)', ('tests/test_stacks.py',)),
    Mutant('the KL authors\' refresh sorts its columns',
           'soap_optax/_solvers.py',
           'return _power_qr(stat, old_basis, sort=False)',
           'return _power_qr(stat, old_basis, sort=True)',
           ('tests/test_kl_authors.py',)),
    Mutant('KL-SOAP bias-corrected by default', 'soap_optax/_estimators.py',
           "'kl': {'refresh': 'qr_unsorted', 'bias_correction': False}",
           "'kl': {'refresh': 'qr_unsorted', 'bias_correction': True}",
           ('tests/test_kl_authors.py',)),
    Mutant('KL-Shampoo refreshes sorted by default', 'soap_optax/_kl_shampoo.py',
           "refresh: str = 'qr_unsorted',", "refresh: str = 'qr',",
           ('tests/test_kl_authors.py',)),
    Mutant('bias_correction=False still corrects', 'soap_optax/_rotated_adam.py',
           't = view.count if self.bias_correction else jnp.inf',
           't = view.count', ('tests/test_kl_authors.py',)),
    Mutant('hyperball steps against the inner update',
           'soap_optax/_hyperball.py',
           'moved = w + eta * radius * u', 'moved = w - eta * radius * u',
           ('tests/test_hyperball.py',)),
    Mutant('hyperball step not scaled by the radius',
           'soap_optax/_hyperball.py',
           'moved = w + eta * radius * u', 'moved = w + eta * u',
           ('tests/test_hyperball.py',)),
    Mutant('hyperball schedule one call ahead', 'soap_optax/_hyperball.py',
           'eta = (learning_rate(state.count) if callable(learning_rate)',
           'eta = (learning_rate(state.count + 1) if callable(learning_rate)',
           ('tests/test_hyperball.py',)),
    Mutant('hyperball wraps 3-D leaves too', 'soap_optax/_hyperball.py',
           'matrix = tuple(range(ndim)) if ndim == 2 else ()',
           'matrix = tuple(range(ndim)) if ndim >= 2 else ()',
           ('tests/test_hyperball.py',)),
    Mutant('hyperball ignores batch axes (one sphere per stack)',
           'soap_optax/_hyperball.py',
           'matrix = tuple(a for a in range(ndim) if a not in batch)',
           'matrix = tuple(range(ndim))', ('tests/test_hyperball.py',)),
    Mutant('soap-muon without the Nesterov term', 'soap_optax/_soap_muon.py',
           'nesterov = (1 - self.b1) * rotated + self.b1 * mu',
           'nesterov = mu', ('tests/test_soap_muon.py',)),
    Mutant('soap-muon second moment of the raw gradient',
           'soap_optax/_soap_muon.py', 'jnp.square(nesterov)',
           'jnp.square(rotated)', ('tests/test_soap_muon.py',)),
    Mutant('soap-muon scaled by cols / rows', 'soap_optax/_soap_muon.py',
           'max(1.0, rows / cols)', 'max(1.0, cols / rows)',
           ('tests/test_soap_muon.py',)),
    Mutant('soap-muon second moment not permuted at a refresh',
           'soap_optax/_soap_muon.py', 'change.permuted(state.nu)',
           'state.nu', ('tests/test_soap_muon.py',)),
)


def run_tests(files, timeout) -> tuple[bool, str]:
  """``(passed, the first failing test)``."""
  done = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-x', *files], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
      check=False)
  failed = [line.split()[1] for line in done.stdout.splitlines()
            if line.startswith(('FAILED ', 'ERROR '))]
  return done.returncode == 0, (failed[0] if failed else
                                done.stdout.strip().splitlines()[-1:])


def check(mutant: Mutant, timeout: int) -> dict:
  path = ROOT / mutant.path
  original = path.read_text()
  if original.count(mutant.old) != 1:
    return dict(name=mutant.name, status='not applicable: text not found once')
  tick = time.perf_counter()
  try:
    path.write_text(original.replace(mutant.old, mutant.new))
    for files in (mutant.first, tuple(f for f in CORE
                                      if f not in mutant.first)):
      if not files:
        continue
      passed, failure = run_tests(files, timeout)
      if not passed:
        return dict(name=mutant.name, status='killed', by=failure,
                    seconds=round(time.perf_counter() - tick))
    return dict(name=mutant.name, status='SURVIVED',
                seconds=round(time.perf_counter() - tick))
  finally:
    path.write_text(original)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default=None,
                      help='comma-separated mutant names (default: all)')
  parser.add_argument('--timeout', type=int, default=1800)
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  chosen = [m for m in MUTANTS if args.only is None
            or m.name in args.only.split(',')]
  rows = []
  for mutant in chosen:
    rows.append(check(mutant, args.timeout))
    print(json.dumps(rows[-1]), flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  survived = [r['name'] for r in rows if r['status'] != 'killed']
  print(f'{len(rows) - len(survived)} of {len(rows)} killed'
        + (f'; not killed: {survived}' if survived else ''))
  sys.exit(1 if survived else 0)


if __name__ == '__main__':
  main()
