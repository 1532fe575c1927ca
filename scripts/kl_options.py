"""The KL rules' named options against their authors' defaults.

KL-Shampoo and KL-SOAP run by default as Lin et al.'s code runs them (QR
refreshes without a sort, KL-SOAP without Adam's bias correction); the
library keeps SOAP's choices as options (``refresh="qr"``: columns sorted by
``diag(Q^T S Q)``; ``bias_correction=True``). This measures what each option
does on the Kronecker problem of ``scripts/experiment_parts/kronecker.py``
(8 x 16, condition 100 per factor, Kronecker-structured noise, 800 steps,
refresh every 10, weight decay 0), each variant at its best rate of the same
grid, averaged over noise seeds per problem seed; the target is AdamW's
final loss per seed. Then two measurements of where the library departs
from the authors' code on purpose (docs/pytorch_soap.md): on a 4 x 5 x 6
tensor, the library's joint factor updates against the authors' partly
sequential ones (their step transcribed in
``tests/oracle/kl_authors_numpy.py``), and the update sizes a 1-D parameter
gets against ``optax.scale_by_adam``. The numbers go to BENCHMARKS.md
section 13 and the docs.

  python scripts/kl_options.py [--quick] [--json PATH]
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent
                       / 'experiment_parts'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

import kronecker
import optimizers
from soap_optax import problems

# name -> (optimizer of the table, its options).
VARIANTS = {
    'adamw': (optimizers.ADAMW, {}),
    'kl_shampoo (authors: unsorted QR)': ('kl_shampoo', {}),
    'kl_shampoo refresh="qr" (sorted)': ('kl_shampoo', {'refresh': 'qr'}),
    'kl_soap (authors: unsorted QR, no bias correction)': ('kl_soap', {}),
    'kl_soap bias_correction=True': ('kl_soap', {'bias_correction': True}),
    'kl_soap refresh="qr" (sorted)': ('kl_soap', {'refresh': 'qr'}),
    'kl_soap sorted and bias-corrected (the previous default)':
        ('kl_soap', {'refresh': 'qr', 'bias_correction': True}),
}


def factory(name, options):
  if name == optimizers.ADAMW:
    return lambda learning_rate: optax.adamw(
        learning_rate, b1=0.9, b2=0.95, weight_decay=0.0)
  return lambda learning_rate: optimizers.make_eigenbasis_optimizer(
      name, learning_rate, weight_decay=0.0, precondition_frequency=10,
      **options)


def three_d_against_the_authors(calls=(2, 3, 10, 30, 100, 300)):
  """KL-Shampoo and KL-SOAP on a 4 x 5 x 6 tensor, the library (joint
  updates) against the authors' step (partly sequential), float64: per
  call in ``calls``, the relative difference of the updates, the ratio of
  their norms and their cosine (calls numbered from 1, the initializing
  one); and the authors' step against itself given the tensor with its
  axes permuted (median and largest relative difference over calls
  2..30)."""
  import soap_optax  # pylint: disable=g-import-not-at-top
  from tests.oracle import kl_authors_numpy  # pylint: disable=g-import-not-at-top
  shape, permutation = (4, 5, 6), (2, 0, 1)
  options = dict(b1=0.9, b2=0.95, shampoo_beta=0.95, eps=1e-8, frequency=5)
  rows = []
  with jax.enable_x64(True):
    for klsoap in (False, True):
      name = 'kl_soap' if klsoap else 'kl_shampoo'
      tx = (soap_optax.scale_by_rotated_adam(
          b1=0.9, b2=0.95, shampoo_beta=0.95, eps=1e-8,
          factor_estimator='kl', precondition_frequency=5) if klsoap else
            soap_optax.scale_by_kl_shampoo(
                b1=0.9, shampoo_beta=0.95, eps=1e-8, precondition_frequency=5))
      state = tx.init({'w': jax.numpy.zeros(shape)})
      update = jax.jit(tx.update)
      authors = kl_authors_numpy.AuthorsKLOpt(shape, klsoap=klsoap, **options)
      permuted = kl_authors_numpy.AuthorsKLOpt(
          tuple(shape[a] for a in permutation), klsoap=klsoap, **options)
      rng = np.random.default_rng(0)
      by_order = []
      for call in range(1, max(calls) + 1):  # Call 1 initializes.
        g = rng.normal(size=shape)
        ours, state = update({'w': jax.numpy.asarray(g)}, state)
        ours = np.asarray(ours['w']).ravel()
        theirs = authors.step(g).ravel()
        other = np.transpose(permuted.step(np.transpose(g, permutation)),
                             np.argsort(permutation)).ravel()
        norm = max(np.linalg.norm(theirs), 1e-300)
        if 2 <= call <= 30:
          by_order.append(np.linalg.norm(other - theirs) / norm)
        if call in calls:
          rows.append(dict(
              rule=name, call=call,
              relative_difference=float(np.linalg.norm(ours - theirs) / norm),
              norm_ratio=float(np.linalg.norm(ours) / norm),
              cosine=float(ours @ theirs / norm / max(
                  np.linalg.norm(ours), 1e-300))))
      rows.append(dict(rule=name, call='axes permuted (authors)',
                       median=float(np.median(by_order)),
                       largest=float(np.max(by_order))))
  return rows


def one_d_update_sizes(steps=(1, 2, 5, 10, 20, 50, 100, 200)):
  """The update RMS a 256-vector gets (normal gradients of size 1e-3 and
  1) from KL-Shampoo, KL-SOAP and SOAP against ``optax.scale_by_adam(b1 =
  b2 = 0.95)``, at each step in ``steps`` (the eigenbasis rules' first call
  initializes: their call ``k`` is Adam's step ``k``)."""
  import soap_optax  # pylint: disable=g-import-not-at-top
  transforms = {
      'kl_shampoo': soap_optax.scale_by_kl_shampoo(),
      'kl_soap': soap_optax.scale_by_rotated_adam(factor_estimator='kl'),
      'soap': soap_optax.scale_by_rotated_adam(),
      'adam': optax.scale_by_adam(b1=0.95, b2=0.95)}
  rng = np.random.default_rng(0)
  rows = []
  for scale in (1e-3, 1.0):
    grads = [scale * rng.normal(size=(256,)) for _ in range(max(steps) + 1)]
    sizes = {}
    for name, tx in transforms.items():
      state = tx.init({'b': jax.numpy.zeros(256)})
      update = jax.jit(tx.update)
      rms = []
      for g in grads:
        u, state = update({'b': jax.numpy.asarray(g, jax.numpy.float32)},
                          state)
        rms.append(float(jax.numpy.sqrt(jax.numpy.mean(u['b']**2))))
      sizes[name] = rms
    for k in steps:
      rows.append(dict(gradient_scale=scale, step=k,
                       **{name: sizes[name][k] if name != 'adam'
                          else sizes[name][k - 1] for name in sizes}))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--json', type=pathlib.Path)
  args = parser.parse_args()
  m, n = (4, 6) if args.quick else (8, 16)
  steps = 60 if args.quick else 800
  seeds, noise = (0, 1), (2 if args.quick else 4)
  grid = kronecker.KRONECKER_GRID
  curves = {}
  for label, (name, options) in VARIANTS.items():
    start = time.perf_counter()
    # Mapped, not vmapped: a vmapped refresh can deadlock on CPU.
    curves_of = kronecker.loss_curve_fn(factory(name, options), steps,
                                        mapped=True)
    per_seed = []
    for seed in seeds:
      problem = problems.kronecker_quadratic(
          jax.random.PRNGKey(seed), m=m, n=n, condition=100.0,
          noise_scale=1.0)
      keys = jax.random.split(jax.random.PRNGKey(1000 + seed), noise)
      c = np.asarray(curves_of(problem, jax.numpy.asarray(grid), keys))
      per_seed.append(c / float(problem.loss(problem.init)))
    curves[label] = np.stack(per_seed)
    print(f'{label}: {time.perf_counter() - start:.1f} s', flush=True)

  def best(c):
    finals = np.array([[kronecker.tail_mean(c[s, i])
                        for i in range(c.shape[1])] for s in range(len(seeds))])
    finals = np.where(np.isfinite(finals), finals, np.inf)
    index = int(np.argmin(finals.mean(axis=0)))
    return index, finals[:, index]

  adamw_index, _ = best(curves['adamw'])
  targets = [kronecker.tail_mean(curves['adamw'][s, adamw_index])
             for s in range(len(seeds))]
  rows = []
  print(f'\nKronecker {m}x{n}, {steps} steps, problem seeds {seeds}, '
        f'{noise} noise seeds each, frequency 10, jax {jax.__version__}')
  print('| variant | best lr | final loss / initial (per seed) | '
        'steps to AdamW\'s final (per seed) |')
  print('| --- | --- | --- | --- |')
  for label, c in curves.items():
    index, finals = best(c)
    reached = [problems.steps_to_reach(c[s, index], targets[s])
               for s in range(len(seeds))]
    rows.append(dict(variant=label, best_lr=grid[index],
                     final_loss=finals.tolist(), steps_to_adamw=reached))
    print(f'| {label} | {grid[index]:g} | '
          f'{", ".join(f"{f:.4f}" for f in finals)} | '
          f'{", ".join("never" if r is None else str(r) for r in reached)} |')
  three_d = three_d_against_the_authors()
  print('\n3-D (4 x 5 x 6): the library (joint) against the authors '
        '(partly sequential)')
  for row in three_d:
    print(row)
  one_d = one_d_update_sizes()
  print('\n1-D (256): update RMS')
  for row in one_d:
    print(row)
  if args.json:
    args.json.write_text(json.dumps(dict(
        m=m, n=n, steps=steps, rows=rows, targets=targets, three_d=three_d,
        one_d=one_d), indent=1))


if __name__ == '__main__':
  main()
