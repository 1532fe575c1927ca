"""Section ``compile``: how long the jitted ``update`` takes to build.

Trace+lower and XLA compile seconds of ``jit(update)`` on abstract shapes (no
arrays are allocated and no refresh runs), for 1, 12 and 24 transformer
layers kept as separate parameters and as scanned stacks (a leading layer
axis named in ``dimension_numbers``). Then the compile goals at GPT-2-small
sizes, on the main job's byte-level ``ByteTransformer`` (``scripts/lm.py``;
d 768, 12 layers, 12 heads, sequence 1024, as built by
:mod:`benchmark_sections.train_step`): its update and one 768 x 3072 matrix
against AdamW and ``optax.contrib.muon``, and its whole training step
(forward, backward, update) against AdamW's, all in this one process.
Last (not with ``--quick``), compile time against the number of distinct
shapes (:func:`run_distinct_shapes`).
"""

import time

import common
import jax
import jax.numpy as jnp
import optimizers
import soap_optax
from soap_optax import _refresh

from benchmark_sections import shared
from benchmark_sections import train_step

TITLE = 'Compile time of the jitted update'

QUICK_COMPILE_OPTIMIZERS = optimizers.check_names(('adamw', 'soap'))
# The GPT-2-sized update's optimizers ('muon': optax's, its default routing),
# and those of its whole training step.
GPT2_UPDATE_OPTIMIZERS = optimizers.check_names(('adamw', 'muon', 'soap'))
GPT2_STEP_OPTIMIZERS = optimizers.check_names(('adamw', 'soap'))


def aot_seconds(fn, *args) -> tuple[float, float]:
  """Trace+lower and compile seconds of ``jit(fn)`` on abstract arguments."""
  tick = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lower_s = time.perf_counter() - tick
  tick = time.perf_counter()
  lowered.compile()
  return lower_s, time.perf_counter() - tick


def run(quick: bool) -> dict:
  """Separate and scanned layers at each depth, every optimizer (AdamW and
  SOAP with ``quick``), then :func:`run_gpt2`."""
  d = 32 if quick else 256
  rows = []
  for layers in ((1, 2) if quick else (1, 12, 24)):
    for layout in ('separate', 'scanned'):
      shapes = (common.transformer_shapes if layout == 'separate' else
                shared.scanned_transformer_shapes)(d, layers, 256, 256)
      params = shared.abstract_tree(shapes)
      numbers = shared.layer_axis_numbers if layout == 'scanned' else None
      for name in QUICK_COMPILE_OPTIMIZERS if quick else shared.OPTIMIZERS:
        print(f'  compile: {layers} layers ({layout}) {name}', flush=True)
        tx = shared.make_optimizer(name, **(
            {} if name == 'adamw' else dict(dimension_numbers=numbers)))
        state = jax.eval_shape(tx.init, params)
        lower_s, compile_s = aot_seconds(tx.update, params, state, params)
        rows.append(dict(layers=layers, layout=layout, d_model=d,
                         num_leaves=len(shapes), optimizer=name,
                         lower_s=lower_s, compile_s=compile_s))
  return dict(rows=rows, gpt2=run_gpt2(quick),
              shapes=None if quick else run_distinct_shapes())


# Two models of 4,718,592 parameters: 2 distinct matrix shapes, and 12
# (widths 592, 624, ..., 944: the same sum of widths).
DISTINCT_SHAPES_MODELS = {
    2: [(512, 512)] * 6 + [(512, 1024)] * 6,
    12: [(512, 592 + 32 * k) for k in range(12)],
}


def run_distinct_shapes(paddings=(None, 0.1, 0.25)) -> list[dict]:
  """``scale_by_rotated_adam``'s update on the two models of
  :data:`DISTINCT_SHAPES_MODELS` at each ``bucket_padding``: its stacks
  (per-unit programs), solver sizes and compile seconds."""
  rows = []
  for padding in paddings:
    for distinct, shapes in DISTINCT_SHAPES_MODELS.items():
      print(f'  compile: {distinct} distinct shapes, bucket_padding='
            f'{padding}', flush=True)
      params = {f'w{i:02d}': jax.ShapeDtypeStruct(shape, jnp.float32)
                for i, shape in enumerate(shapes)}
      tx = soap_optax.scale_by_rotated_adam(bucket_padding=padding)
      state = jax.eval_shape(tx.init, params)
      plan = state.eigenbasis.plan
      factors = [jax.ShapeDtypeStruct((s.size, d, d), jnp.float32)
                 for s in plan.stacks for d in s.layout.factor_sizes]
      lower_s, compile_s = aot_seconds(tx.update, params, state, params)
      rows.append(dict(
          distinct_shapes=distinct, bucket_padding=padding,
          parameters=sum(a * b for a, b in shapes), stacks=len(plan.stacks),
          solver_sizes=len(set(_refresh.solver_sizes(
              factors, padding).values())),
          lower_s=lower_s, compile_s=compile_s))
  return rows


def run_gpt2(quick: bool) -> dict:
  """The compile goals: the GPT-2-small-sized model's update (and one MLP
  matrix) with AdamW, Muon and SOAP, and its training step with AdamW and
  SOAP."""
  config = train_step.compile_config(quick)
  params = train_step.abstract_params(config)
  num_leaves = len(jax.tree.leaves(params))
  d = config['d']
  matrix = shared.abstract_tree({'fc': (d, 4 * d)})
  rows = []
  for what, tree in (('update', params), ('one matrix', matrix)):
    for name in GPT2_UPDATE_OPTIMIZERS:
      print(f'  compile: GPT-2 {what} {name}', flush=True)
      tx = shared.make_optimizer(name)
      state = jax.eval_shape(tx.init, tree)
      lower_s, compile_s = aot_seconds(tx.update, tree, state, tree)
      rows.append(dict(what=what, optimizer=name,
                       num_leaves=len(jax.tree.leaves(tree)),
                       lower_s=lower_s, compile_s=compile_s))
  batch = train_step.abstract_batch(config)
  for name in GPT2_STEP_OPTIMIZERS:
    print(f'  compile: GPT-2 training step {name}', flush=True)
    tx = shared.make_optimizer(name)
    lower_s, compile_s = aot_seconds(
        train_step.make_train_step(config, tx), params,
        jax.eval_shape(tx.init, params), batch)
    rows.append(dict(what='training step', optimizer=name,
                     num_leaves=num_leaves, lower_s=lower_s,
                     compile_s=compile_s))
  return dict(config=config, rows=rows)


def table(section) -> str:
  lines = ['| layers (leaves) | layout | optimizer | trace+lower s | compile s | '
           'total s | × 1 layer |', '| --- | --- | --- | --- | --- | --- | --- |']
  first = {}
  for r in section['rows']:
    total = r['lower_s'] + r['compile_s']
    first.setdefault((r['layout'], r['optimizer']), total)
    lines.append(f'| {r["layers"]} ({r["num_leaves"]}) | {r["layout"]} | '
                 f'{r["optimizer"]} | {r["lower_s"]:.2f} | '
                 f'{r["compile_s"]:.2f} | {total:.2f} | '
                 f'{total / first[(r["layout"], r["optimizer"])]:.2f} |')
  if 'gpt2' in section:
    c = section['gpt2']['config']
    lines += ['', f'GPT-2 (d {c["d"]}, {c["layers"]} layers, vocabulary '
              f'{c["vocab"]}, sequence {c["seq"]}; training step: '
              f'{c["accumulation"]} x {c["micro_batch"]} sequences):', '',
              '| program | optimizer | trace+lower s | compile s | total s | '
              '× AdamW | × Muon |', '| --- | --- | --- | --- | --- | --- | --- |']
    totals = {(r['what'], r['optimizer']): r['lower_s'] + r['compile_s']
              for r in section['gpt2']['rows']}
    for r in section['gpt2']['rows']:
      total = totals[r['what'], r['optimizer']]
      muon = totals.get((r['what'], 'muon'))
      lines.append(
          f'| {r["what"]} ({r["num_leaves"]} leaves) | {r["optimizer"]} | '
          f'{r["lower_s"]:.2f} | {r["compile_s"]:.2f} | {total:.2f} | '
          f'{total / totals[r["what"], "adamw"]:.2f} | '
          + (f'{total / muon:.2f} |' if muon else '– |'))
  if section.get('shapes'):
    lines += ['', 'Against the number of distinct shapes '
              '(`scale_by_rotated_adam`, 4.7 M parameters each):', '',
              '| distinct shapes | bucket_padding | stacks | solver sizes | '
              'total s | × 2 shapes |', '| --- | --- | --- | --- | --- | --- |']
    two = {r['bucket_padding']: r['lower_s'] + r['compile_s']
           for r in section['shapes'] if r['distinct_shapes'] == 2}
    for r in section['shapes']:
      total = r['lower_s'] + r['compile_s']
      lines.append(
          f'| {r["distinct_shapes"]} | {r["bucket_padding"]} | '
          f'{r["stacks"]} | {r["solver_sizes"]} | {total:.2f} | '
          f'{total / two[r["bucket_padding"]]:.2f} |')
  return '\n'.join(lines)
