"""What size buckets do to a model: stacks, compiled programs, padding.

For each model (the main job's GPT-2-small-sized ``ByteTransformer``, and
the Llama-style 1 B shape set of ``scripts/pod_scale.py``, separate and
scanned, with and without ``block_size``), builds SOAP's plan on abstract
parameters with ``bucket_padding`` off, at its default and at a larger
bound, and reports:

* ``stacks``: distinct unit shapes (one per-unit program each),
  ``factor sizes``, and ``solver sizes`` (one solver program each: factor
  sizes padded to shared sizes, :func:`soap_optax._refresh.solver_sizes`);
* ``extra work``: the padded units' work over their own (refresh ``sum d^3``
  plus a step's ``n (1 + sum d)``, :attr:`FactorLayout.unit_cost`), in %;
* ``extra state``: the padded units' optimizer state over their own
  (moments ``2 n`` and factors and bases ``2 sum d^2``), in %;
* ``extra refresh``: what solving factors at their solver size adds to the
  refresh's work (``sum D^3`` over ``sum d^3``), in %, and ``solver bytes``:
  what it adds to the solvers' inputs (``sum D^2`` over ``sum d^2``; the
  temporaries of a batched solve on an accelerator scale with it, a
  ``lax.map`` holds one factor's at a time; no state is padded), in %.

Nothing is compiled or allocated: seconds on any machine.

Usage::

  python scripts/buckets.py [--json PATH]
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp

import soap_optax
from soap_optax import _kronecker
from soap_optax import _refresh

import pod_scale
from benchmark_sections import train_step

SETTINGS = (None, 0.1, 0.25)


def _own_work_and_state(stack, extent):
  """A unit's work (:attr:`FactorLayout.unit_cost`) and state entries at
  its own lengths ``extent`` (the stack's factored axes)."""
  own = _kronecker.FactorLayout(extent, extent, stack.layout.factored_axes)
  return (own.unit_cost, 2 * max(1, math.prod(extent))
          + 2 * sum(d * d for d in own.factor_sizes))


def report(params, **soap_kwargs) -> list[dict]:
  """One row per bucket setting for SOAP on ``params`` (abstract)."""
  rows = []
  for padding in SETTINGS:
    tx = soap_optax.scale_by_rotated_adam(bucket_padding=padding,
                                          **soap_kwargs)
    plan = jax.eval_shape(tx.init, params).eigenbasis.plan
    own_work = own_state = work = state = 0
    for s, stack in enumerate(plan.stacks):
      extents = plan.unit_extents(s)
      padded_work, padded_state = _own_work_and_state(stack,
                                                      stack.unit_shape)
      work += stack.size * padded_work
      state += stack.size * padded_state
      if extents is None:
        own_work += stack.size * padded_work
        own_state += stack.size * padded_state
        continue
      for extent in extents:
        w, m = _own_work_and_state(stack, tuple(int(e) for e in extent))
        own_work, own_state = own_work + w, own_state + m
    factors = [jax.ShapeDtypeStruct((s.size, d, d), jnp.float32)
               for s in plan.stacks for d in s.layout.factor_sizes]
    solver = _refresh.solver_sizes(factors, padding)
    solved = [solver[(f.shape[-1], f.dtype)] for f in factors]
    rows.append(dict(
        bucket_padding=padding, stacks=len(plan.stacks),
        factor_sizes=len({f.shape[-1] for f in factors}),
        solver_sizes=sorted(set(solved)),
        extra_refresh_pct=100 * (sum(f.shape[0] * D**3 for f, D in zip(
            factors, solved)) / max(1, sum(f.shape[0] * f.shape[-1]**3
                                          for f in factors)) - 1),
        extra_solver_bytes_pct=100 * (sum(f.shape[0] * D**2 for f, D in zip(
            factors, solved)) / max(1, sum(f.shape[0] * f.shape[-1]**2
                                          for f in factors)) - 1),
        extra_work_pct=100 * (work / own_work - 1),
        extra_state_pct=100 * (state / own_state - 1)))
  return rows


def models():
  """name -> (abstract params, SOAP keywords)."""
  config = train_step.compile_config(False)
  gpt2 = train_step.abstract_params(config)
  out = {'GPT-2 small (main job, 198 leaves)': (gpt2, {})}
  for scanned in (False, True):
    shapes = pod_scale.llama_shapes(**pod_scale.MODELS['1b'],
                                    scanned=scanned)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32)
              for k, s in shapes.items()}
    numbers = ({k: soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
                if k.startswith('layers/') else None for k in shapes}
               if scanned else None)
    layout = 'scanned' if scanned else 'separate'
    for block_size in (None, 1024):
      out[f'1B {layout}, block_size={block_size}'] = (params, dict(
          dimension_numbers=numbers, block_size=block_size))
  return out


def markdown(results: dict) -> str:
  lines = ['| model | bucket_padding | stacks | factor sizes | solver sizes '
           '| extra work | extra state | extra refresh | solver bytes |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for name, rows in results.items():
    for r in rows:
      sizes = ', '.join(map(str, r['solver_sizes']))
      lines.append(
          f"| {name} | {r['bucket_padding']} | {r['stacks']} | "
          f"{r['factor_sizes']} | {len(r['solver_sizes'])} ({sizes}) | "
          f"{r['extra_work_pct']:.1f}% | {r['extra_state_pct']:.1f}% | "
          f"{r['extra_refresh_pct']:.1f}% | "
          f"{r['extra_solver_bytes_pct']:.1f}% |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='also write the rows here')
  args = parser.parse_args(argv)
  results = {name: report(params, **kwargs)
             for name, (params, kwargs) in models().items()}
  print(markdown(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
