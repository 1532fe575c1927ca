"""Benchmarks: optimizer-step cost against the machine's limits, refresh cost,
compile time, memory, and a full training step.

Every number is measured in the same run, on the same machine, so the ratios
(achieved against attainable) do not depend on a datasheet:

* ``step``: median jitted ``update`` time of ``optax.adamw``, ``soap``,
  ``shampoo``, ``factorized_soap`` and one-sided SOAP, regular calls and
  refresh calls (frequency 10) reported apart. SOAP-family FLOP/s are counted
  as ``6 * numel * sum(rotated axis lengths)`` (``6 m n (m + n)`` for an m x n
  matrix: four rotations and two factor products) and compared with the
  FLOP/s of the same products written as plain ``jnp.dot`` calls on the same
  shapes. AdamW's bandwidth (28 bytes per parameter: read g, p, m, v; write m,
  v, the update) is compared with a measured read+write stream (``x + 1``,
  in place, over the same number of bytes).
* ``refresh``: one factor's ``eigh`` refresh against the power-iteration + QR
  refresh per size, and 8 same-size factors batched (one call, as the engine
  does) against one call per factor.
* ``compile``: trace+lower and XLA compile time of the jitted ``update`` for
  1, 12 and 24 transformer layers, kept as separate parameters and as scanned
  stacks (a leading layer axis named in ``dimension_numbers``).
* ``memory``: optimizer-state bytes of every variant against closed-form
  formulas written here and against AdamW, and GPT-2 small's layout variants
  (``block_size``, ``mu_dtype``, one-sided).
* ``train_step``: a whole training step (GPT-style model, forward + backward +
  update) with AdamW and with SOAP at frequency 10; GPT-2-small shapes and
  262,144 tokens per step on a GPU, a small model on a CPU.
* ``sharded``: on 8 host devices (a subprocess with
  ``--xla_force_host_platform_device_count=8``), a 4-layer transformer whose
  parameters are FSDP-sharded: SOAP's refresh call and regular call with the
  work divided over the mesh (``mesh=``) against today's behaviour without
  it (every device refreshes every factor), and the state bytes each device
  holds against the total. The 8 devices share the machine's cores, so only
  the ratios measured in the same run mean anything.
* ``versus_torch``: soap_optax (default, ``block_size``,
  ``staggered_refresh``) side by side with the PyTorch SOAPs that are
  installed (the optional ``torch-bench`` extra: pytorch-optimizer,
  HeavyBall; ``--torch-soap-file`` for the authors' ``soap.py``) on the
  layouts issue's transformer-like set: mean step, median step, refresh spike.

Examples::

  python scripts/benchmark.py                   # everything (~20 min on 2 CPU cores)
  python scripts/benchmark.py --quick           # small sizes, under a minute (CI)
  python scripts/benchmark.py --sections step,memory --device gpu

Outputs under ``--out``: ``results.json`` (every measurement), ``tables.md``
(the tables of BENCHMARKS.md) and ``step_cost.png``, ``refresh_cost.png``,
``memory.png``.
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable

SECTIONS = ('step', 'refresh', 'compile', 'memory', 'train_step', 'versus_torch',
            'sharded')
SHARDED_DEVICES = 8
OPTIMIZERS = ('adamw', 'soap', 'shampoo', 'factorized_soap', 'soap_one_sided')
FULL_SHAPES = ((256, 1024), (512, 512), (1024, 1024), (1024, 4096))
QUICK_SHAPES = ((32, 64),)
QUICK_COMPILE_OPTIMIZERS = ('adamw', 'soap')
MAX_PRECOND_DIM = 10000  # the aliases' default
FREQUENCY = 10
ADAMW_BYTES_PER_PARAM = 28


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='small sizes and few repeats (proves the script '
                      'works; the numbers mean little)')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated subset of {",".join(SECTIONS)}')
  parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'gpu'),
                      help='auto: the GPU when JAX sees one, else the CPU')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed update calls per optimizer and shape after '
                      'the first (refresh calls are every 10th; default 60, '
                      '20 with --quick)')
  parser.add_argument('--out', default=None,
                      help='output folder (default runs/benchmark-<time>)')
  parser.add_argument('--torch-soap-file', default=None,
                      help='versus_torch: a copy of the SOAP authors\' '
                      'PyTorch soap.py (class SOAP) to time as well; it is '
                      'not shipped here')
  args = parser.parse_args(argv)
  if args.torch_soap_file and not os.path.isfile(args.torch_soap_file):
    raise UsageError(f'--torch-soap-file: no such file: '
                     f'{args.torch_soap_file}')
  args.sections = comma_list('--sections', args.sections, SECTIONS)
  if args.steps is None:
    args.steps = 20 if args.quick else 60
  if args.steps < FREQUENCY:
    raise UsageError(f'--steps must be >= {FREQUENCY} (one refresh call), '
                     f'got {args.steps}')
  return args


def comma_list(flag: str, text: str, choices: tuple[str, ...]):
  """``"a,b"`` -> ``("a", "b")``; UsageError unless a non-empty subset of
  ``choices``."""
  items = tuple(s.strip() for s in text.split(',') if s.strip())
  unknown = [s for s in items if s not in choices]
  if not items or unknown:
    raise UsageError(f'{flag}: unknown {", ".join(unknown) or "(empty)"}; '
                     f'choose from {", ".join(choices)}')
  return items


def select_device(choice: str):
  """Imports JAX on the requested platform; returns the jax module."""
  if choice == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if choice == 'gpu':
    try:
      jax.devices('gpu')
    except RuntimeError:
      raise UsageError('--device gpu: JAX sees no GPU on this machine '
                       f'(devices: {jax.devices()})') from None
    jax.config.update('jax_default_device', jax.devices('gpu')[0])
  return jax


# ------------------------------------------------------------------------------
# Timing and counting.


def median(values):
  values = sorted(values)
  middle = len(values) // 2
  if len(values) % 2:
    return values[middle]
  return 0.5 * (values[middle - 1] + values[middle])


def time_calls(jax, fn: Callable[..., Any], args, repeats: int,
               budget_s: float = float('inf')) -> list[float]:
  """Seconds of ``repeats`` calls (after one warm-up), each waited for.

  Stops early once ``budget_s`` is spent, keeping at least 3 calls.
  """
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < repeats:
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tick)
    if len(times) >= 3 and sum(times) > budget_s:
      break
  return times


def rotated_axes(shape, one_sided: bool) -> tuple[int, ...]:
  """Lengths of the axes SOAP rotates (the aliases' defaults: max_precond_dim
  10000, no precondition_1d, no merge_dims)."""
  if len(shape) < 2:
    return ()
  axes = tuple(n for n in shape if n <= MAX_PRECOND_DIM)
  if one_sided and len(axes) > 1:
    axes = (min(axes),)
  return axes


def numel(shape) -> int:
  total = 1
  for n in shape:
    total *= n
  return total


def step_flops(shapes, one_sided: bool = False) -> int:
  """Matrix-product flops of one regular step: ``6 * numel * sum(d_i)``.

  Per rotated axis of length ``d``: rotating in, rotating out and the factor
  product each cost ``2 * numel * d``.
  """
  return sum(6 * numel(s) * sum(rotated_axes(s, one_sided)) for s in shapes)


# ------------------------------------------------------------------------------
# Parameter sets and optimizers.


def transformer_shapes(d: int, layers: int, vocab: int, seq: int):
  """A GPT-style parameter set: name -> shape (fused qkv, 4x MLP, tied head)."""
  shapes = {'wte': (vocab, d), 'wpe': (seq, d), 'ln_f/scale': (d,),
            'ln_f/bias': (d,)}
  for i in range(layers):
    shapes.update({
        f'h{i}/ln1/scale': (d,), f'h{i}/ln1/bias': (d,),
        f'h{i}/qkv/kernel': (d, 3 * d), f'h{i}/qkv/bias': (3 * d,),
        f'h{i}/proj/kernel': (d, d), f'h{i}/proj/bias': (d,),
        f'h{i}/ln2/scale': (d,), f'h{i}/ln2/bias': (d,),
        f'h{i}/fc/kernel': (d, 4 * d), f'h{i}/fc/bias': (4 * d,),
        f'h{i}/out/kernel': (4 * d, d), f'h{i}/out/bias': (d,),
    })
  return shapes


def scanned_transformer_shapes(d: int, layers: int, vocab: int, seq: int):
  """:func:`transformer_shapes` with the layers stacked: ``h/...`` leaves get a
  leading ``layers`` axis, as ``nnx.scan``/``nn.scan`` keep them."""
  shapes = {k: s for k, s in transformer_shapes(d, 0, vocab, seq).items()}
  for name, shape in transformer_shapes(d, 1, vocab, seq).items():
    if name.startswith('h0/'):
      shapes['h/' + name[3:]] = (layers,) + shape
  return shapes


def layer_axis_numbers(params):
  """``dimension_numbers`` for :func:`scanned_transformer_shapes`."""
  import soap_optax  # pylint: disable=g-import-not-at-top
  return {name: soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
          if name.startswith('h/') else None for name in params}


def make_optimizer(name: str, frequency: int = FREQUENCY,
                   learning_rate: float = 1e-3, **layout):
  """Each optimizer with its library defaults (shampoo: eigh refresh, Adam
  grafting, momentum). ``layout`` (``dimension_numbers``, ``block_size``,
  ``mu_dtype``) goes to the eigenbasis optimizers."""
  import optax  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  if name == 'adamw':
    return optax.adamw(learning_rate, mu_dtype=layout.get('mu_dtype'))
  if name == 'shampoo':
    layout.pop('mu_dtype', None)
  factories = {
      'soap': lambda: soap_optax.soap(
          learning_rate, precondition_frequency=frequency, **layout),
      'shampoo': lambda: soap_optax.shampoo(
          learning_rate, precondition_frequency=frequency, **layout),
      'factorized_soap': lambda: soap_optax.factorized_soap(
          learning_rate, precondition_frequency=frequency, **layout),
      'soap_one_sided': lambda: soap_optax.soap(
          learning_rate, precondition_frequency=frequency, one_sided=True,
          **layout),
      'kl_shampoo': lambda: soap_optax.kl_shampoo(
          learning_rate, precondition_frequency=frequency, **layout),
  }
  return factories[name]()


def random_tree(jax, shapes: dict, seed: int, scale: float = 1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {name: scale * jax.random.normal(k, shape)
          for k, (name, shape) in zip(keys, shapes.items())}


# ------------------------------------------------------------------------------
# Section 1: step cost.


def measure_reference_rates(jax, shapes: dict, repeats: int):
  """Plain ``jnp.dot`` FLOP/s on the products a regular step makes.

  For every matrix ``G`` (m x n) of the set, each product shape is timed on
  its own: ``(m x m)(m x n)`` and ``(m x n)(n x n)`` (rotating in and out: two
  of each), ``(m x n)(n x m)`` and ``(n x m)(m x n)`` (the factors). The rate
  is ``6 m n (m + n)`` summed over the matrices, over the summed medians.
  """
  jnp = jax.numpy
  hi = jax.lax.Precision.HIGHEST
  dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
  key = jax.random.PRNGKey(1)
  matrices = [s for s in shapes.values() if len(rotated_axes(s, False)) == 2]
  timings: dict[tuple[int, int, int], float] = {}
  seconds = 0.0
  for m, n in matrices:
    for (rows, inner, cols), times in (((m, m, n), 2), ((m, n, n), 2),
                                       ((m, n, m), 1), ((n, m, n), 1)):
      if (rows, inner, cols) not in timings:
        a = jax.random.normal(key, (rows, inner))
        b = jax.random.normal(key, (inner, cols))
        timings[(rows, inner, cols)] = median(
            time_calls(jax, dot, (a, b), repeats, budget_s=10.0))
      seconds += times * timings[(rows, inner, cols)]
  return step_flops(matrices) / seconds


def measure_stream_bandwidth(jax, num_floats: int, repeats: int) -> float:
  """Bytes/s of ``x <- x + 1`` on ``num_floats`` float32 (read + write, the
  buffer donated so that no call allocates)."""
  add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = jax.block_until_ready(
      add_one(jax.numpy.zeros((num_floats,), jax.numpy.float32)))
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    x = jax.block_until_ready(add_one(x))
    times.append(time.perf_counter() - tick)
  return 8 * num_floats / median(times)


def time_optimizer(jax, name: str, shapes: dict, steps: int):
  """Times ``steps`` jitted update calls after the first one.

  Returns a dict with the median regular-call and refresh-call seconds (a
  call with index ``k % FREQUENCY == 0`` refreshes the bases, for every
  eigenbasis optimizer here), their counts, the mean over all calls, and the
  compile time.
  """
  tx = make_optimizer(name)
  params = random_tree(jax, shapes, 0)
  grads = [random_tree(jax, shapes, 10 + i, scale=1e-2) for i in range(4)]
  state = tx.init(params)
  tick = time.perf_counter()
  update = jax.jit(tx.update).lower(grads[0], state, params).compile()
  compile_s = time.perf_counter() - tick
  tick = time.perf_counter()
  state = jax.block_until_ready(update(grads[0], state, params)[1])
  first_s = time.perf_counter() - tick
  regular, refresh = [], []
  for k in range(1, steps + 1):
    tick = time.perf_counter()
    updates, state = update(grads[k % len(grads)], state, params)
    jax.block_until_ready((updates, state))
    seconds = time.perf_counter() - tick
    is_refresh = name != 'adamw' and k % FREQUENCY == 0
    (refresh if is_refresh else regular).append(seconds)
  return dict(regular_s=median(regular), regular_n=len(regular),
              refresh_s=median(refresh) if refresh else None,
              refresh_n=len(refresh),
              mean_s=(sum(regular) + sum(refresh)) / steps,
              compile_s=compile_s, first_call_s=first_s)


def run_step_section(jax, args, quick: bool):
  sets = {f'{m}x{n}': {'w': (m, n)}
          for m, n in (QUICK_SHAPES if quick else FULL_SHAPES)}
  sets['transformer'] = (transformer_shapes(32, 1, 256, 32) if quick else
                         transformer_shapes(256, 4, 256, 256))
  repeats = 5 if quick else 30
  rows = []
  for set_name, shapes in sets.items():
    rate = measure_reference_rates(jax, shapes, repeats)
    num_params = sum(numel(s) for s in shapes.values())
    # The same number of bytes as AdamW moves: 28 per parameter.
    bandwidth = measure_stream_bandwidth(
        jax, ADAMW_BYTES_PER_PARAM * num_params // 8, repeats)
    for name in OPTIMIZERS:
      print(f'  step: {set_name} {name}', flush=True)
      timing = time_optimizer(jax, name, shapes, args.steps)
      row = dict(params=set_name, optimizer=name, num_params=num_params,
                 matmul_flops_per_s=rate, stream_bytes_per_s=bandwidth,
                 **timing)
      if name == 'adamw':
        achieved = ADAMW_BYTES_PER_PARAM * num_params / timing['regular_s']
        row.update(bytes_per_s=achieved, percent_of_stream=100 * achieved /
                   bandwidth)
      else:
        flops = step_flops(shapes.values(), one_sided=name == 'soap_one_sided')
        row.update(flops=flops, flops_per_s=flops / timing['regular_s'],
                   percent_of_matmul=100 * flops / timing['regular_s'] / rate)
      rows.append(row)
      print('  row ' + json.dumps(row), flush=True)
  return dict(rows=rows, frequency=FREQUENCY)


def step_table(section) -> str:
  lines = [
      '| params | optimizer | regular step ms (n) | refresh step ms (n) | '
      'mean ms at f=10 | achieved | of attainable |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    refresh = (f'{1e3 * r["refresh_s"]:.2f} ({r["refresh_n"]})'
               if r['refresh_s'] is not None else '–')
    if r['optimizer'] == 'adamw':
      achieved = f'{r["bytes_per_s"] / 1e9:.1f} GB/s'
      share = f'{r["percent_of_stream"]:.0f}% of copy bw'
    else:
      achieved = f'{r["flops_per_s"] / 1e9:.1f} GFLOP/s'
      share = f'{r["percent_of_matmul"]:.0f}% of matmul'
    lines.append(
        f'| {r["params"]} | {r["optimizer"]} | {1e3 * r["regular_s"]:.2f} '
        f'({r["regular_n"]}) | {refresh} | {1e3 * r["mean_s"]:.2f} | '
        f'{achieved} | {share} |')
  rates = {r['params']: (r['matmul_flops_per_s'], r['stream_bytes_per_s'])
           for r in section['rows']}
  lines.append('')
  lines.append('Reference rates measured in the same run (plain `jnp.dot` on '
               'the step\'s product shapes; `x + 1` over the bytes AdamW '
               'moves): ' + '; '.join(
                   f'{k}: {f / 1e9:.1f} GFLOP/s, {b / 1e9:.1f} GB/s'
                   for k, (f, b) in rates.items()) + '.')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Section 2: refresh cost and compile time.


def random_factor(jax, n: int, seed: int):
  """A symmetric PSD factor ``G G^T / 2n`` (G: n x 2n) and a random
  orthonormal warm-start basis."""
  jnp = jax.numpy
  key_g, key_q = jax.random.split(jax.random.PRNGKey(seed))
  g = jax.random.normal(key_g, (n, 2 * n))
  stat = jnp.dot(g, g.T, precision=jax.lax.Precision.HIGHEST) / (2 * n)
  basis = jnp.linalg.qr(jax.random.normal(key_q, (n, n)))[0]
  return stat, basis


def run_refresh_section(jax, quick: bool):
  from soap_optax import _engine  # pylint: disable=g-import-not-at-top
  sizes = (32, 64, 128) if quick else (256, 512, 1024, 2048, 4096)
  repeats = 3 if quick else 5
  budget = 5.0 if quick else 60.0
  single = []
  eigh_refresh = jax.jit(_engine.eigh_basis)
  qr_refresh = jax.jit(_engine.power_qr_basis)
  for n in sizes:
    print(f'  refresh: n={n}', flush=True)
    stat, basis = random_factor(jax, n, n)
    eigh_s = median(time_calls(jax, eigh_refresh, (stat, basis), repeats,
                               budget))
    qr_s = median(time_calls(jax, qr_refresh, (stat, basis), repeats, budget))
    single.append(dict(n=n, eigh_s=eigh_s, qr_s=qr_s, qr_over_eigh=qr_s / eigh_s,
                       eigh_flops_per_s=9 * n**3 / eigh_s,
                       qr_flops_per_s=(14 / 3) * n**3 / qr_s))
    print('  row ' + json.dumps(single[-1]), flush=True)

  batched = []
  count = 8
  for n in ((32, 64) if quick else (256, 512, 1024)):
    print(f'  refresh: {count} x n={n}, batched and one by one', flush=True)
    factors = [random_factor(jax, n, 100 + i) for i in range(count)]
    stats = [s for s, _ in factors]
    bases = [q for _, q in factors]
    for method, fn in (('eigh', _engine.eigh_basis),
                       ('qr', _engine.power_qr_basis)):
      # map_by_size takes stacks: here, 8 stacks of one factor each.
      together = jax.jit(lambda s, q, fn=fn: _engine.map_by_size(
          fn, [a[None] for a in s], [b[None] for b in q]))
      apart = jax.jit(
          lambda s, q, fn=fn: [fn(a, b) for a, b in zip(s, q)])
      together_s = median(time_calls(jax, together, (stats, bases), repeats,
                                     budget))
      apart_s = median(time_calls(jax, apart, (stats, bases), repeats, budget))
      batched.append(dict(n=n, count=count, method=method,
                          batched_s=together_s, per_factor_s=apart_s,
                          batched_over_per_factor=together_s / apart_s))
      print('  row ' + json.dumps(batched[-1]), flush=True)
  return dict(single=single, batched=batched,
              batch_mode='lax.map' if jax.default_backend() == 'cpu' else 'vmap')


def refresh_tables(section) -> str:
  lines = ['| n | eigh refresh ms | QR refresh ms | QR / eigh | eigh GFLOP/s '
           '(9n³) | QR GFLOP/s (14/3 n³) |', '| --- | --- | --- | --- | --- | --- |']
  for r in section['single']:
    lines.append(
        f'| {r["n"]} | {1e3 * r["eigh_s"]:.1f} | {1e3 * r["qr_s"]:.1f} | '
        f'{r["qr_over_eigh"]:.2f} | {r["eigh_flops_per_s"] / 1e9:.1f} | '
        f'{r["qr_flops_per_s"] / 1e9:.1f} |')
  lines += ['', f'Batched ({section["batch_mode"]}, one call) against one call '
            'per factor:', '',
            '| factors | method | batched ms | per factor ms | batched / per factor |',
            '| --- | --- | --- | --- | --- |']
  for r in section['batched']:
    lines.append(
        f'| {r["count"]} × {r["n"]}² | {r["method"]} | '
        f'{1e3 * r["batched_s"]:.1f} | {1e3 * r["per_factor_s"]:.1f} | '
        f'{r["batched_over_per_factor"]:.2f} |')
  return '\n'.join(lines)


def aot_seconds(jax, fn, *args) -> tuple[float, float]:
  """Trace+lower and compile seconds of ``jit(fn)`` on abstract arguments."""
  tick = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lower_s = time.perf_counter() - tick
  tick = time.perf_counter()
  lowered.compile()
  return lower_s, time.perf_counter() - tick


def abstract(jax, shapes: dict):
  return {k: jax.ShapeDtypeStruct(s, jax.numpy.float32)
          for k, s in shapes.items()}


def run_compile_section(jax, quick: bool):
  """Trace+lower and compile seconds of ``jit(update)``, on abstract shapes
  (no arrays are allocated and no refresh runs): layers kept as separate
  parameters and scanned (stacked) layers with a batch axis; then GPT-2
  small's update (148 leaves) and one of its 768 x 3072 matrices against
  AdamW and ``optax.contrib.muon``, and its whole training step (forward,
  backward, update) against AdamW's, all in this one process."""
  d = 32 if quick else 256
  rows = []
  for layers in ((1, 2) if quick else (1, 12, 24)):
    for layout in ('separate', 'scanned'):
      shapes = (transformer_shapes if layout == 'separate' else
                scanned_transformer_shapes)(d, layers, 256, 256)
      params = abstract(jax, shapes)
      numbers = layer_axis_numbers if layout == 'scanned' else None
      for name in QUICK_COMPILE_OPTIMIZERS if quick else OPTIMIZERS:
        print(f'  compile: {layers} layers ({layout}) {name}', flush=True)
        tx = make_optimizer(name, **(
            {} if name == 'adamw' else dict(dimension_numbers=numbers)))
        state = jax.eval_shape(tx.init, params)
        lower_s, compile_s = aot_seconds(jax, tx.update, params, state, params)
        rows.append(dict(layers=layers, layout=layout, d_model=d,
                         num_leaves=len(shapes), optimizer=name,
                         lower_s=lower_s, compile_s=compile_s))
  return dict(rows=rows, gpt2=run_gpt2_compile(jax, quick))


def run_gpt2_compile(jax, quick: bool):
  """The compile goals: GPT-2 small's update and training step."""
  import optax  # pylint: disable=g-import-not-at-top
  config = (dict(d=32, layers=2, heads=2, vocab=256, seq=32) if quick else
            dict(d=768, layers=12, heads=12, vocab=50257, seq=1024))
  config.update(micro_batch=4, accumulation=2, remat=False)
  shapes = transformer_shapes(config['d'], config['layers'], config['vocab'],
                              config['seq'])
  matrix = {'fc': (config['d'], 4 * config['d'])}
  factories = {'adamw': lambda: make_optimizer('adamw'),
               'muon': lambda: optax.contrib.muon(1e-3),
               'soap': lambda: make_optimizer('soap')}
  updates = []
  for what, tree in (('update', shapes), ('one matrix', matrix)):
    params = abstract(jax, tree)
    for name, factory in factories.items():
      print(f'  compile: GPT-2 {what} {name}', flush=True)
      tx = factory()
      state = jax.eval_shape(tx.init, params)
      lower_s, compile_s = aot_seconds(jax, tx.update, params, state, params)
      updates.append(dict(what=what, optimizer=name, num_leaves=len(tree),
                          lower_s=lower_s, compile_s=compile_s))
  loss_fn = gpt_loss_fn(jax, config)
  batch = jax.ShapeDtypeStruct(
      (config['accumulation'], config['micro_batch'], config['seq'] + 1),
      jax.numpy.int32)
  params = abstract(jax, shapes)
  for name in ('adamw', 'soap'):
    print(f'  compile: GPT-2 training step {name}', flush=True)
    tx = make_optimizer(name)
    lower_s, compile_s = aot_seconds(
        jax, functools.partial(train_step, jax, loss_fn, tx), params,
        jax.eval_shape(tx.init, params), batch)
    updates.append(dict(what='training step', optimizer=name,
                        num_leaves=len(shapes), lower_s=lower_s,
                        compile_s=compile_s))
  return dict(config=config, rows=updates)


def train_step(jax, loss_fn, tx, params, state, batch):
  """Forward + backward (gradients accumulated over micro-batches) +
  update."""
  import optax  # pylint: disable=g-import-not-at-top
  def accumulate(total, micro):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro)
    return jax.tree.map(jax.numpy.add, total, (loss, grads)), None
  zeros = jax.tree.map(jax.numpy.zeros_like, (jax.numpy.zeros([]), params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch)
  grads = jax.tree.map(lambda g: g / batch.shape[0], grads)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss / batch.shape[0]


def compile_table(section) -> str:
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
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Section 3: memory.


def formula_numbers(name: str, shape) -> int:
  """State elements (counters aside) of one parameter, from the formulas.

  Written from the algorithms, not from the library: AdamW keeps m and v
  (``2 numel``); SOAP adds ``GG_i`` and ``Q_i`` (``2 d_i^2``) per rotated
  axis; factorized SOAP keeps m plus one vector per axis; Shampoo keeps
  ``GG_i``, ``Q_i`` per rotated axis, ``diag(GG)`` per other axis, eigenvalues
  and Rayleigh quotients per axis, the Adam graft's v and the momentum
  (``2 numel``); KL-Shampoo keeps ``GG_i``, ``Q_i``, the momentum and one
  eigenvalue estimate per entry of every axis. Every eigenbasis optimizer
  also tracks ``diag(Q_i^T GG_i
  Q_i)`` (``d_i``) per rotated axis, for the staleness, and two counters
  per unit (the parameter here; each block with ``block_size``).
  """
  size = numel(shape)
  axes = shape if shape else (1,)
  one_sided = name in ('soap_one_sided', 'factorized_soap_one_sided')
  rotated = rotated_axes(shape, one_sided=one_sided)
  factors = sum(2 * d * d for d in rotated)
  tracking = sum(rotated) + 2
  if name == 'adamw':
    return 2 * size
  if name in ('soap', 'soap_one_sided'):
    return factors + 2 * size + tracking
  if name in ('factorized_soap', 'factorized_soap_one_sided'):
    return factors + size + sum(axes) + tracking
  if name == 'kl_shampoo':  # m and one eigenvalue estimate per axis entry.
    return factors + size + sum(axes) + tracking
  if name == 'shampoo':
    unrotated = len(axes) - len(rotated)
    diagonals = sum(axes) - sum(rotated) if unrotated else 0
    return factors + diagonals + 2 * sum(axes) + 2 * size + tracking
  raise ValueError(name)


def block_shapes(shape, block_size):
  """The shapes of the blocks of a parameter cut every ``block_size``."""
  per_axis = [[min(block_size, n - start) for start in range(0, n, block_size)]
              or [0] for n in shape]
  blocks = [()]
  for lengths in per_axis:
    blocks = [b + (n,) for b in blocks for n in lengths]
  return blocks


# GPT-2 small's layout variants: (label, optimizer, layout keywords, formula).
MEMORY_VARIANTS = (
    ('adamw', 'adamw', {}, 'adamw'),
    ('soap', 'soap', {}, 'soap'),
    ('soap block_size=1024', 'soap', dict(block_size=1024), 'soap'),
    ('soap mu_dtype=bfloat16', 'soap', dict(mu_dtype='bfloat16'), 'soap'),
    ('soap one-sided', 'soap_one_sided', {}, 'soap_one_sided'),
    ('soap one-sided, block_size=1024', 'soap_one_sided',
     dict(block_size=1024), 'soap_one_sided'),
    ('factorized_soap one-sided', 'factorized_soap', dict(one_sided=True),
     'factorized_soap_one_sided'),
    ('kl_shampoo', 'kl_shampoo', {}, 'kl_shampoo'),
    ('kl_shampoo block_size=1024', 'kl_shampoo', dict(block_size=1024),
     'kl_shampoo'),
)


def run_memory_variants(jax, shapes):
  """State bytes of layout variants, numbers checked against the formulas
  (applied block by block for ``block_size``)."""
  import soap_optax  # pylint: disable=g-import-not-at-top
  params = {k: jax.ShapeDtypeStruct(s, jax.numpy.float32)
            for k, s in shapes.items()}
  rows, adamw_bytes = [], None
  for label, name, layout, formula_name in MEMORY_VARIANTS:
    state = jax.eval_shape(make_optimizer(name, **layout).init, params)
    block = layout.get('block_size')
    formula = sum(formula_numbers(formula_name, b)
                  for shape in shapes.values()
                  for b in (block_shapes(shape, block) if block else [shape]))
    nbytes = soap_optax.state_nbytes(state)
    adamw_bytes = adamw_bytes or nbytes
    rows.append(dict(variant=label, state_numbers=soap_optax.state_size(state),
                     formula_numbers=formula,
                     exact=soap_optax.state_size(state) == formula,
                     state_bytes=nbytes, over_adamw=nbytes / adamw_bytes))
  return rows


def run_memory_section(jax, quick: bool):
  import soap_optax  # pylint: disable=g-import-not-at-top
  sets = {f'{m}x{n}': {'w': (m, n)}
          for m, n in (QUICK_SHAPES if quick else FULL_SHAPES)}
  sets['transformer'] = transformer_shapes(*((32, 1, 256, 32) if quick else
                                             (256, 4, 256, 256)))
  sets['gpt2-small'] = transformer_shapes(768, 12, 50257, 1024)
  rows = []
  for set_name, shapes in sets.items():
    params = {k: jax.ShapeDtypeStruct(s, jax.numpy.float32)
              for k, s in shapes.items()}
    adamw_bytes = None
    for name in OPTIMIZERS:
      state = jax.eval_shape(make_optimizer(name).init, params)
      measured = soap_optax.state_size(state)
      formula = sum(formula_numbers(name, s) for s in shapes.values())
      nbytes = soap_optax.state_nbytes(state)
      if name == 'adamw':
        adamw_bytes = nbytes
      rows.append(dict(params=set_name, optimizer=name,
                       num_params=sum(numel(s) for s in shapes.values()),
                       state_numbers=measured, formula_numbers=formula,
                       exact=measured == formula, state_bytes=nbytes,
                       over_adamw=nbytes / adamw_bytes))
  variants = run_memory_variants(jax, sets['gpt2-small'])
  return dict(rows=rows, variants=variants)


def memory_table(section) -> str:
  lines = ['| params | optimizer | state MiB | × AdamW | state numbers | '
           'formula | exact |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    lines.append(
        f'| {r["params"]} | {r["optimizer"]} | {r["state_bytes"] / 2**20:.2f} | '
        f'{r["over_adamw"]:.2f} | {r["state_numbers"]:,} | '
        f'{r["formula_numbers"]:,} | {"yes" if r["exact"] else "**NO**"} |')
  lines += ['', 'GPT-2 small (124 M parameters), layout variants:', '',
            '| variant | state MiB | × AdamW | state numbers | formula | exact |',
            '| --- | --- | --- | --- | --- | --- |']
  for r in section['variants']:
    lines.append(
        f'| {r["variant"]} | {r["state_bytes"] / 2**20:.1f} | '
        f'{r["over_adamw"]:.2f} | {r["state_numbers"]:,} | '
        f'{r["formula_numbers"]:,} | {"yes" if r["exact"] else "**NO**"} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Section 4b: side by side with PyTorch implementations of SOAP.

# The transformer-like set of the layouts issue: an embedding, attention and
# MLP matrices of one layer, two vectors.
VERSUS_TORCH_SHAPES = {
    'embedding': (2048, 256), 'q': (256, 256), 'k': (256, 256),
    'v': (256, 256), 'o': (256, 256), 'up': (256, 1024), 'down': (1024, 256),
    'scale': (256,), 'bias': (256,)}
VERSUS_TORCH_JAX = (
    ('soap_optax', {}),
    ('soap_optax staggered_refresh', dict(staggered_refresh=True)),
    ('soap_optax block_size=1024', dict(block_size=1024)),
    ('soap_optax block_size=1024, staggered', dict(
        block_size=1024, staggered_refresh=True)),
    ('soap_optax block_size=512', dict(block_size=512)),
    ('soap_optax block_size=512, staggered', dict(
        block_size=512, staggered_refresh=True)),
)


def window_stats(seconds, window: int = FREQUENCY):
  """Mean step, median step, and the median over windows of ``window`` steps
  of each window's slowest step (the refresh spike, whichever step of the
  window an implementation refreshes on)."""
  windows = [seconds[i:i + window]
             for i in range(0, len(seconds) - window + 1, window)]
  return dict(mean_s=sum(seconds) / len(seconds), median_s=median(seconds),
              spike_s=median([max(w) for w in windows]),
              spike_over_median=median([max(w) for w in windows]) /
              median(seconds))


def time_jax_soap(jax, shapes, steps, layout):
  import optax  # pylint: disable=g-import-not-at-top
  tx = make_optimizer('soap', learning_rate=3e-3, **layout)
  params = random_tree(jax, shapes, 0)
  grads = [random_tree(jax, shapes, 10 + i, scale=1e-2) for i in range(4)]

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for k in range(FREQUENCY):  # compile, initialize, one refresh: warm-up.
    params, state = jax.block_until_ready(step(params, state, grads[k % 4]))
  seconds = []
  for k in range(steps):
    tick = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads[k % 4]))
    seconds.append(time.perf_counter() - tick)
  return seconds


def torch_optimizers(soap_file):
  """``name -> factory(params)`` for the PyTorch SOAPs that are installed,
  with the settings of ``soap_optax.soap`` (frequency 10, max_precond_dim
  10000, no merge_dims, betas 0.95/0.95, eps 1e-8, weight decay 0.01)."""
  factories = {}
  settings = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, eps=1e-8,
                  precondition_frequency=FREQUENCY)
  try:
    import pytorch_optimizer  # pylint: disable=g-import-not-at-top
    factories['pytorch-optimizer SOAP'] = lambda p: pytorch_optimizer.SOAP(
        p, max_precondition_dim=MAX_PRECOND_DIM, **settings)
  except ImportError:
    pass
  try:
    import heavyball  # pylint: disable=g-import-not-at-top
    factories['HeavyBall SOAP (torch.compile)'] = lambda p: heavyball.SOAP(
        p, max_precond_dim=MAX_PRECOND_DIM, merge_dims=False,
        use_precond_schedule=False, **settings)
  except ImportError:
    pass
  if soap_file:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location('authors_soap', soap_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factories['authors\' SOAP (PyTorch, eager)'] = lambda p: module.SOAP(
        p, max_precond_dim=MAX_PRECOND_DIM, **settings)
  return factories


def time_torch_soap(factory, shapes, steps):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes.values()]
  grads = [[1e-2 * torch.randn(*s) for s in shapes.values()] for _ in range(4)]
  optimizer = factory(params)

  def step(k):
    for p, g in zip(params, grads[k % 4]):
      p.grad = g.clone()
    optimizer.step()

  for k in range(2 * FREQUENCY):  # compile (HeavyBall), first refreshes.
    step(k)
  seconds = []
  for k in range(steps):
    tick = time.perf_counter()
    step(k)
    seconds.append(time.perf_counter() - tick)
  return seconds


def run_versus_torch_section(jax, args, quick: bool):
  """soap_optax against the PyTorch SOAPs that are installed (the optional
  ``torch-bench`` extra: torch, pytorch-optimizer, heavyball), float32, on the
  CPU, the same shapes and settings; ``--quick`` times soap_optax alone on a
  small set."""
  shapes = ({'embedding': (256, 32), 'w': (32, 32), 'up': (32, 128),
             'bias': (32,)} if quick else VERSUS_TORCH_SHAPES)
  steps = 2 * FREQUENCY if quick else 4 * FREQUENCY
  rows = []
  for label, layout in VERSUS_TORCH_JAX[:1] if quick else VERSUS_TORCH_JAX:
    print(f'  versus_torch: {label}', flush=True)
    rows.append(dict(implementation=label, **window_stats(
        time_jax_soap(jax, shapes, steps, layout))))
  if not quick:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(os.cpu_count() or 1)
      torch_version = torch.__version__
    except ImportError:
      torch_version = None
    if torch_version:
      for label, factory in torch_optimizers(args.torch_soap_file).items():
        print(f'  versus_torch: {label}', flush=True)
        try:
          rows.append(dict(implementation=label, **window_stats(
              time_torch_soap(factory, shapes, steps))))
        except Exception as error:  # pylint: disable=broad-except
          rows.append(dict(implementation=label, error=repr(error)[:200]))
  base = rows[0]['mean_s']
  for r in rows:
    if 'mean_s' in r:
      r['mean_over_soap_optax'] = r['mean_s'] / base
  return dict(rows=rows, shapes={k: list(v) for k, v in shapes.items()},
              torch=None if quick else torch_version)


def versus_torch_table(section) -> str:
  lines = [f'PyTorch: {section["torch"] or "not installed"}.', '',
           '| implementation | mean step ms | median step ms | refresh spike ms '
           '| spike / median | mean / soap_optax |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    if 'error' in r:
      lines.append(f'| {r["implementation"]} | failed: {r["error"]} | | | | |')
      continue
    lines.append(
        f'| {r["implementation"]} | {1e3 * r["mean_s"]:.1f} | '
        f'{1e3 * r["median_s"]:.1f} | {1e3 * r["spike_s"]:.1f} | '
        f'{r["spike_over_median"]:.2f} | {r["mean_over_soap_optax"]:.2f} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Section 5: a whole training step.


def gpt_loss_fn(jax, config):
  """Cross-entropy of a pre-LayerNorm GPT (bfloat16 compute on GPU)."""
  jnp = jax.numpy
  compute = jnp.bfloat16 if jax.default_backend() == 'gpu' else jnp.float32
  heads = config['heads']

  def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

  def loss_fn(params, tokens):
    p = jax.tree.map(lambda x: x.astype(compute), params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, seq = inputs.shape
    x = p['wte'][inputs] + p['wpe'][:seq]
    for i in range(config['layers']):
      h = layer_norm(x, p[f'h{i}/ln1/scale'], p[f'h{i}/ln1/bias'])
      qkv = h @ p[f'h{i}/qkv/kernel'] + p[f'h{i}/qkv/bias']
      q, k, v = jnp.split(qkv.reshape(batch, seq, 3 * heads, -1), 3, axis=2)
      attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      x = x + attended.reshape(batch, seq, -1) @ p[f'h{i}/proj/kernel'] + p[
          f'h{i}/proj/bias']
      h = layer_norm(x, p[f'h{i}/ln2/scale'], p[f'h{i}/ln2/bias'])
      h = jax.nn.gelu(h @ p[f'h{i}/fc/kernel'] + p[f'h{i}/fc/bias'])
      x = x + h @ p[f'h{i}/out/kernel'] + p[f'h{i}/out/bias']
    logits = layer_norm(x, p['ln_f/scale'], p['ln_f/bias']) @ p['wte'].T
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) -
                    jnp.take_along_axis(logits.astype(jnp.float32),
                                        targets[..., None], -1)[..., 0])

  return jax.checkpoint(loss_fn) if config['remat'] else loss_fn


def init_gpt(jax, config):
  jnp = jax.numpy
  shapes = transformer_shapes(config['d'], config['layers'], config['vocab'],
                              config['seq'])
  params = {}
  for i, (name, shape) in enumerate(shapes.items()):
    if name.endswith('scale'):
      params[name] = jnp.ones(shape)
    elif len(shape) == 1:
      params[name] = jnp.zeros(shape)
    else:
      params[name] = 0.02 * jax.random.normal(jax.random.PRNGKey(i), shape)
  return params


def run_train_step_section(jax, args, quick: bool):
  """Forward + backward (gradient accumulation over micro-batches) + update.

  The first call is timed in three parts, before anything else runs: trace
  and lower, compile, and the compiled program's first run."""
  on_gpu = jax.default_backend() == 'gpu'
  if quick:
    config = dict(d=32, layers=2, heads=2, vocab=256, seq=32, micro_batch=4,
                  accumulation=2, remat=False)
  elif on_gpu:  # GPT-2 small, 256 x 1024 = 262,144 tokens per step.
    config = dict(d=768, layers=12, heads=12, vocab=50257, seq=1024,
                  micro_batch=32, accumulation=8, remat=True)
  else:
    config = dict(d=256, layers=4, heads=4, vocab=256, seq=256, micro_batch=16,
                  accumulation=2, remat=False)
  loss_fn = gpt_loss_fn(jax, config)
  tokens_per_step = config['micro_batch'] * config['accumulation'] * config['seq']
  batch = jax.random.randint(
      jax.random.PRNGKey(0),
      (config['accumulation'], config['micro_batch'], config['seq'] + 1), 0,
      config['vocab'])
  # On a CPU a step of the small model takes seconds: 30 calls (3 refreshes).
  steps = FREQUENCY if quick else (args.steps if on_gpu else 3 * FREQUENCY)
  rows = []
  for name in ('soap', 'adamw'):  # SOAP's compile first (the GPU question).
    print(f'  train step: {name}', flush=True)
    tx = make_optimizer(name)

    params = init_gpt(jax, config)
    state = tx.init(params)
    tick = time.perf_counter()
    lowered = jax.jit(functools.partial(train_step, jax, loss_fn, tx),
                      donate_argnums=(0, 1)).lower(params, state, batch)
    lower_s = time.perf_counter() - tick
    print(f'  trace + lower {lower_s:.1f} s', flush=True)
    tick = time.perf_counter()
    step = lowered.compile()
    compile_s = time.perf_counter() - tick
    print(f'  compile {compile_s:.1f} s', flush=True)
    tick = time.perf_counter()
    params, state, loss = jax.block_until_ready(step(params, state, batch))
    first_run_s = time.perf_counter() - tick
    first_s = lower_s + compile_s + first_run_s
    print(f'  first run {first_run_s:.1f} s', flush=True)
    regular, refresh = [], []
    for k in range(1, steps + 1):
      tick = time.perf_counter()
      params, state, loss = jax.block_until_ready(step(params, state, batch))
      seconds = time.perf_counter() - tick
      (refresh if name != 'adamw' and k % FREQUENCY == 0 else regular).append(
          seconds)
      print(f'  step {k}: {1e3 * seconds:.1f} ms', flush=True)
    rows.append(dict(optimizer=name, regular_s=median(regular),
                     regular_n=len(regular),
                     refresh_s=median(refresh) if refresh else None,
                     refresh_n=len(refresh),
                     mean_s=(sum(regular) + sum(refresh)) / steps,
                     first_call_s=first_s, lower_s=lower_s,
                     compile_s=compile_s, first_run_s=first_run_s,
                     final_loss=float(loss),
                     tokens_per_s=tokens_per_step / median(regular)))
  adamw = next(r for r in rows if r['optimizer'] == 'adamw')
  for r in rows:
    r['regular_over_adamw'] = r['regular_s'] / adamw['regular_s']
    r['mean_over_adamw'] = r['mean_s'] / adamw['mean_s']
    r['refresh_over_regular'] = (r['refresh_s'] / r['regular_s']
                                 if r['refresh_s'] else None)
  num_params = sum(numel(s) for s in transformer_shapes(
      config['d'], config['layers'], config['vocab'], config['seq']).values())
  return dict(config=config, tokens_per_step=tokens_per_step,
              num_params=num_params, rows=rows)


def train_step_table(section) -> str:
  c = section['config']
  lines = [f'Model: d={c["d"]}, {c["layers"]} layers, vocab {c["vocab"]}, '
           f'sequence {c["seq"]}, {section["num_params"] / 1e6:.1f} M '
           f'parameters, {section["tokens_per_step"]:,} tokens per step '
           f'({c["accumulation"]} micro-batches of {c["micro_batch"]}).', '',
           '| optimizer | lower s | compile s | first run s | '
           'regular step ms (n) | refresh step ms (n) | '
           'mean ms at f=10 | mean / AdamW | refresh / regular | tokens/s |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    refresh = (f'{1e3 * r["refresh_s"]:.1f} ({r["refresh_n"]})'
               if r['refresh_s'] else '–')
    spike = (f'{r["refresh_over_regular"]:.2f}'
             if r['refresh_over_regular'] else '–')
    lines.append(
        f'| {r["optimizer"]} | {r["lower_s"]:.1f} | {r["compile_s"]:.1f} | '
        f'{r["first_run_s"]:.1f} | {1e3 * r["regular_s"]:.1f} ({r["regular_n"]}) '
        f'| {refresh} | {1e3 * r["mean_s"]:.1f} | {r["mean_over_adamw"]:.3f} '
        f'| {spike} | {r["tokens_per_s"]:,.0f} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Plots and main.


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
  """Writes a matplotlib figure as a PNG, closes it and returns the path."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot(results, out_dir: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  if 'step' in results:
    rows = results['step']['rows']
    sets = list(dict.fromkeys(r['params'] for r in rows))
    fig, (times, shares) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(OPTIMIZERS)
    for j, name in enumerate(OPTIMIZERS):
      mine = {r['params']: r for r in rows if r['optimizer'] == name}
      xs = [i + j * width for i in range(len(sets))]
      times.bar(xs, [1e3 * mine[s]['regular_s'] for s in sets], width,
                label=name)
      if name != 'adamw':
        shares.bar(xs, [mine[s]['percent_of_matmul'] for s in sets], width,
                   label=name, color=f'C{j}')
    for ax in (times, shares):
      ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
      ax.grid(alpha=0.3, axis='y')
      ax.legend(fontsize=8)
    times.set_yscale('log')
    times.set_ylabel('regular update step (ms, median)')
    shares.axhline(50, color='k', lw=0.8, ls='--')
    shares.set_ylabel('% of measured matmul FLOP/s')
    paths.append(save_figure(fig, out_dir / 'step_cost.png'))
  if 'refresh' in results:
    rows = results['refresh']['single']
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r['n'] for r in rows]
    ax.loglog(ns, [1e3 * r['eigh_s'] for r in rows], 'o-', label='eigh')
    ax.loglog(ns, [1e3 * r['qr_s'] for r in rows], 's-',
              label='power iteration + QR')
    ax.set_xlabel('factor size n')
    ax.set_ylabel('refresh of one factor (ms)')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
    paths.append(save_figure(fig, out_dir / 'refresh_cost.png'))
  if 'memory' in results:
    rows = results['memory']['rows']
    sets = list(dict.fromkeys(r['params'] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(OPTIMIZERS)
    for j, name in enumerate(OPTIMIZERS):
      mine = {r['params']: r for r in rows if r['optimizer'] == name}
      ax.bar([i + j * width for i in range(len(sets))],
             [mine[s]['over_adamw'] for s in sets], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_ylabel('optimizer state / AdamW state')
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / 'memory.png'))
  return paths


def run_sharded_section(quick: bool) -> dict:
  """Runs :func:`sharded_worker` in a subprocess with 8 host devices."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1', JAX_PLATFORMS='cpu',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             f' --xla_force_host_platform_device_count={SHARDED_DEVICES}')
  command = [sys.executable, __file__, '--sharded-worker'] + (
      ['--quick'] if quick else [])
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('SHARDED ')]
  if result.returncode or not lines:
    raise RuntimeError('sharded benchmark failed:\n' + result.stderr[-3000:])
  return json.loads(lines[-1][len('SHARDED '):])


def sharded_worker(quick: bool) -> dict:
  """Refresh and regular SOAP calls on an (8,) mesh, divided or not, for a
  4-layer transformer kept as separate layers and one with its 8 layers
  scanned (stacked along a layer axis)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  d, vocab, seq = (32, 64, 16) if quick else (128, 256, 64)
  mesh = jax.make_mesh((SHARDED_DEVICES,), ('data',))

  def fsdp(shape):
    spec = ('data',) if shape[0] % SHARDED_DEVICES == 0 else ()
    return NamedSharding(mesh, PartitionSpec(*spec))

  frequency, calls = 2, 6 if quick else 10
  out: dict[str, Any] = {'devices': SHARDED_DEVICES, 'frequency': frequency,
                         'models': {}}
  models = {'4 layers, separate': (transformer_shapes(d, 4, vocab, seq),
                                   lambda params: None),
            '8 layers, scanned': (scanned_transformer_shapes(
                d, 8, vocab, seq), layer_axis_numbers)}
  for model, (shapes, numbers) in models.items():
    params = {k: jax.device_put(v, fsdp(v.shape))
              for k, v in random_tree(jax, shapes, 0).items()}
    grads = {k: jax.device_put(v, fsdp(v.shape))
             for k, v in random_tree(jax, shapes, 1).items()}
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


def sharded_table(section) -> str:
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


def machine_info(jax) -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return dict(date=datetime.date.today().isoformat(), backend=jax.default_backend(),
              devices=[d.device_kind for d in jax.devices()], cpu=cpu,
              cpu_count=os.cpu_count(), python=sys.version.split()[0],
              jax=jax.__version__, jaxlib=jaxlib.__version__,
              optax=optax.__version__)


TABLES = {'step': ('Optimizer step against the machine', step_table),
          'refresh': ('Refresh cost', refresh_tables),
          'compile': ('Compile time of the jitted update', compile_table),
          'memory': ('Optimizer-state memory', memory_table),
          'train_step': ('Whole training step', train_step_table),
          'versus_torch': ('Side by side with PyTorch SOAPs',
                           versus_torch_table),
          'sharded': ('Divided over 8 host devices', sharded_table)}


def main(argv: list[str]) -> int:
  if argv and argv[0] == '--sharded-worker':
    print('SHARDED ' + json.dumps(sharded_worker('--quick' in argv)),
          flush=True)
    return 0
  args = parse_args(argv)
  jax = select_device(args.device)
  out_dir = pathlib.Path(args.out or os.path.join(
      'runs', 'benchmark-' + datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
  out_dir.mkdir(parents=True, exist_ok=True)
  info = machine_info(jax)
  print(f'backend {info["backend"]} ({", ".join(info["devices"])}), jax '
        f'{info["jax"]}', flush=True)
  runners = {
      'step': lambda: run_step_section(jax, args, args.quick),
      'refresh': lambda: run_refresh_section(jax, args.quick),
      'compile': lambda: run_compile_section(jax, args.quick),
      'memory': lambda: run_memory_section(jax, args.quick),
      'train_step': lambda: run_train_step_section(jax, args, args.quick),
      'versus_torch': lambda: run_versus_torch_section(jax, args, args.quick),
      'sharded': lambda: run_sharded_section(args.quick),
  }
  results: dict[str, Any] = dict(machine=info, quick=args.quick)
  started = time.perf_counter()
  for section in args.sections:
    print(f'{section}:', flush=True)
    tick = time.perf_counter()
    results[section] = runners[section]()
    results[section]['seconds'] = time.perf_counter() - tick
  results['total_seconds'] = time.perf_counter() - started
  header = (f'{info["date"]}, {info["backend"]}: {", ".join(info["devices"])} '
            f'({info["cpu"]}, {info["cpu_count"]} cores), Python '
            f'{info["python"]}, jax {info["jax"]}, jaxlib {info["jaxlib"]}, '
            f'optax {info["optax"]}' + (' — QUICK sizes' if args.quick else ''))
  text = [header]
  for section in args.sections:
    title, table = TABLES[section]
    text += ['', f'### {title}', '', table(results[section])]
  (out_dir / 'tables.md').write_text('\n'.join(text) + '\n')
  (out_dir / 'results.json').write_text(json.dumps(results, indent=1))
  plots = plot(results, out_dir)
  print('\n'.join(text))
  print(f'\nresults: {out_dir / "results.json"}\ntables:  '
        f'{out_dir / "tables.md"}\nplots:   ' +
        ', '.join(str(p) for p in plots))
  return 0


if __name__ == '__main__':
  try:
    sys.exit(main(sys.argv[1:]))
  except UsageError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
