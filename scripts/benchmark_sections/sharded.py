"""Section ``sharded``: SOAP's work divided over a mesh of 8 host devices.

A 4-layer transformer kept as separate layers and an 8-layer one scanned
(stacked along a layer axis), parameters FSDP-sharded over an (8,) mesh:
SOAP's refresh call and regular call with the work divided over the mesh
(``mesh=``) against the behaviour without it (every device refreshes every
factor), and the state bytes each device holds against the total. The
measurement runs in a subprocess (:func:`worker`) started with
``--xla_force_host_platform_device_count=8``; the 8 devices share the
machine's cores, so only the ratios measured in the same run mean anything.
"""

import json
import os
import subprocess
import time
from typing import Any

import common
import jax
import numpy as np

import soap_optax
from benchmark_sections import shared

TITLE = 'Divided over 8 host devices'

SHARDED_DEVICES = 8
WORKER_PREFIX = 'SHARDED '


def run(worker_command: list[str], quick: bool) -> dict:
  """Runs ``worker_command`` (a command line that prints :func:`worker`'s
  result after :data:`WORKER_PREFIX`) in a subprocess with 8 host CPU
  devices and returns its result."""
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1', JAX_PLATFORMS='cpu',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             f' --xla_force_host_platform_device_count={SHARDED_DEVICES}')
  command = list(worker_command) + (['--quick'] if quick else [])
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  lines = [l for l in result.stdout.splitlines()
           if l.startswith(WORKER_PREFIX)]
  if result.returncode or not lines:
    raise RuntimeError('sharded benchmark failed:\n' + result.stderr[-3000:])
  return json.loads(lines[-1][len(WORKER_PREFIX):])


def print_worker_result(quick: bool) -> None:
  """The subprocess's side: runs :func:`worker` and prints its result as one
  line of JSON after :data:`WORKER_PREFIX`."""
  print(WORKER_PREFIX + json.dumps(worker(quick)), flush=True)


def worker(quick: bool) -> dict:
  """Refresh and regular SOAP calls on an (8,) mesh, divided or not, for a
  4-layer transformer kept as separate layers and one with its 8 layers
  scanned (stacked along a layer axis)."""
  d, vocab, seq = (32, 64, 16) if quick else (128, 256, 64)
  mesh = jax.make_mesh((SHARDED_DEVICES,), ('data',))

  frequency, calls = 2, 6 if quick else 10
  out: dict[str, Any] = {'devices': SHARDED_DEVICES, 'frequency': frequency,
                         'models': {}}
  models = {
      '4 layers, separate': (common.transformer_shapes(d, 4, vocab, seq),
                             lambda params: None),
      '8 layers, scanned': (shared.scanned_transformer_shapes(d, 8, vocab, seq),
                            shared.layer_axis_numbers)}
  for model, (shapes, numbers) in models.items():
    # FSDP as the exchange takes it (soap_optax.parameter_shardings), for
    # both runs.
    layout = soap_optax.parameter_shardings(soap_optax.soap(
        dimension_numbers=numbers(shapes), mesh=mesh),
                                            shared.random_tree(shapes, 0))
    params = jax.tree.map(jax.device_put, shared.random_tree(shapes, 0),
                          layout)
    grads = jax.tree.map(jax.device_put, shared.random_tree(shapes, 1),
                         layout)
    rows = {}
    for label, kwargs in (('replicated', {}), ('divided', {'mesh': mesh})):
      tx = soap_optax.soap(precondition_frequency=frequency,
                           dimension_numbers=numbers(shapes), **kwargs)
      if kwargs:
        shardings = soap_optax.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        update = jax.jit(tx.update, out_shardings=(
            jax.tree.map(lambda x: x.sharding, params), shardings))
      else:
        state = tx.init(params)
        update = jax.jit(tx.update)
      tick = time.perf_counter()
      _, state = jax.block_until_ready(update(grads, state, params))
      first = time.perf_counter() - tick
      refresh, regular = [], []
      for _ in range(2 * calls + 2):
        count = int(state[0].eigenbasis.count)
        tick = time.perf_counter()
        _, state = jax.block_until_ready(update(grads, state, params))
        seconds = time.perf_counter() - tick
        if count > 2:  # after the warm-up of both branches
          (refresh if count % frequency == 0 else regular).append(seconds)
      per_device = soap_optax.state_nbytes_per_device(state)
      total = soap_optax.state_nbytes(state)
      plan = state[0].eigenbasis.plan
      rows[label] = dict(
          first_call_s=first, refresh_call_s=float(np.median(refresh)),
          regular_call_s=float(np.median(regular)), state_bytes=total,
          max_device_state_bytes=max(per_device.values()),
          compiles=update._cache_size(),  # pylint: disable=protected-access
          factors=sum(len(s.layout.factored_axes) * s.size
                      for s in plan.stacks),
          stack_sizes=[s.size for s in plan.stacks])
    out['models'][model] = rows
  return out


def table(section) -> str:
  rows = ['| model | | every device refreshes every factor (no `mesh`) | '
          'divided (`mesh=`) | divided / no `mesh` |', '|---|---|---|---|---|']
  for model, r in section['models'].items():
    rep, div = r['replicated'], r['divided']
    for key, label in (('refresh_call_s', 'refresh call (s)'),
                       ('regular_call_s', 'regular call (s)')):
      rows.append(f'| {model} | {label} | {rep[key]:.3f} | {div[key]:.3f} | '
                  f'{div[key] / rep[key]:.2f}× |')
    rep_work = rep['refresh_call_s'] - rep['regular_call_s']
    div_work = div['refresh_call_s'] - div['regular_call_s']
    rows.append(f'| {model} | refresh work (refresh − regular call, s) | '
                f'{rep_work:.3f} | {div_work:.3f} | {div_work / rep_work:.2f}× |')
    ideal = rep['state_bytes'] / section['devices']
    rows.append(
        f'| {model} | state bytes on the fullest device | '
        f'{rep["max_device_state_bytes"]:,} | {div["max_device_state_bytes"]:,}'
        f' | {div["max_device_state_bytes"] / rep["max_device_state_bytes"]:.2f}'
        f'× (1/{section["devices"]} of the unpadded state: {ideal:,.0f}) |')
    rows.append(f'| {model} | state bytes, all devices (padding included) | '
                f'{rep["state_bytes"]:,} | {div["state_bytes"]:,} | |')
    rows.append(f'| {model} | compiled versions of the step | '
                f'{rep["compiles"]} | {div["compiles"]} | |')
  models = ', '.join(f'{m}: {r["divided"]["factors"]} factors in stacks of '
                     f'{r["divided"]["stack_sizes"]} units'
                     for m, r in section['models'].items())
  return '\n'.join(rows) + (
      f'\n\n{section["devices"]} host devices sharing the machine\'s cores; '
      f'precondition_frequency {section["frequency"]}; {models}.')
