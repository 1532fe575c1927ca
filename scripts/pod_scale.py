"""Pod scale by simulation: SOAP's sharded update compiled for N fake devices.

Nothing is allocated. For every configuration, a subprocess started with
``--xla_force_host_platform_device_count=N`` builds Llama-style parameters
as ``jax.ShapeDtypeStruct``\\ s carrying FSDP ``NamedSharding``\\ s (each
divided over ``fsdp`` along the axis :func:`soap_optax.parameter_shardings`
names), the
optimizer state's shardings from :func:`soap_optax.state_shardings`, and
compiles ``jit(tx.update)`` ahead of time. It reports, per device:

* ``state``: optimizer-state bytes, against ``ideal`` = the unpadded
  (unsharded) state's bytes divided by the number of devices the state is
  divided over (the ``fsdp`` axis);
* ``temp``: the compiled update's temporary bytes (``memory_analysis``);
* the collectives of the compiled (partitioned, per-device) program by kind,
  their total result bytes (``moved``) and the largest one, against the
  per-device parameter bytes;
* ``refresh``: the refresh work of the most loaded device (``sum d^3`` over
  the factors of the units it holds) against the total divided evenly;
* compile seconds of the sharded update, of the same update unsharded (one
  device) and of AdamW under the same shardings.

Usage::

  python scripts/pod_scale.py --quick              # CI size: 16 devices
  python scripts/pod_scale.py --models 1b --devices 64 --out results/pod.json

Meshes: ``fsdp`` is ``(fsdp,)`` with every device; ``hsdp`` is
``(data, fsdp)`` = ``(4, N/4)``, parameters and optimizer state divided over
``fsdp`` only (replicated over ``data``).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

# Llama-style shape sets: width, depth, SwiGLU hidden width, vocabulary.
MODELS = {
    'quick': dict(d=512, layers=4, ffn=1408, vocab=8000),
    '1b': dict(d=2048, layers=16, ffn=5632, vocab=32000),
    '7b': dict(d=4096, layers=32, ffn=11008, vocab=32000),
}
COLLECTIVES = ('all-gather', 'all-to-all', 'collective-permute',
               'all-reduce', 'reduce-scatter')
DTYPE_BYTES = {'f32': 4, 'f64': 8, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
               'pred': 1, 's8': 1, 'u8': 1, 's64': 8, 'u64': 8}


def llama_shapes(d: int, layers: int, ffn: int, vocab: int, scanned: bool):
  """name -> shape: embedding, attention, SwiGLU MLP, RMS norms, untied
  head; with ``scanned`` the layers are stacked along a leading axis."""
  layer = {'attn_norm': (d,), 'wq': (d, d), 'wk': (d, d), 'wv': (d, d),
           'wo': (d, d), 'mlp_norm': (d,), 'w_gate': (d, ffn),
           'w_up': (d, ffn), 'w_down': (ffn, d)}
  shapes = {'embed': (vocab, d), 'final_norm': (d,), 'head': (d, vocab)}
  if scanned:
    shapes.update({f'layers/{k}': (layers,) + s for k, s in layer.items()})
  else:
    shapes.update({f'layer{i}/{k}': s for i in range(layers)
                   for k, s in layer.items()})
  return shapes


def result_bytes(text: str) -> int:
  """Bytes of an HLO result type (``f32[8,16]{1,0}`` or a tuple of them)."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', text):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * math.prod(
          int(n) for n in dims.split(',') if n)
  return total


def collectives(hlo: str) -> dict:
  """Per kind: count, total and largest result bytes, from compiled HLO."""
  found = {k: {'count': 0, 'bytes': 0, 'largest': 0} for k in COLLECTIVES}
  for line in hlo.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(', line)
    if not match:
      continue
    kind = match.group(2).removesuffix('-start')
    if kind in found:
      size = result_bytes(match.group(1))
      entry = found[kind]
      entry['count'] += 1
      entry['bytes'] += size
      entry['largest'] = max(entry['largest'], size)
  return found


def is_eigenbasis_state(x) -> bool:
  """Whether ``x`` is an eigenbasis transform's state: a NamedTuple whose
  ``eigenbasis`` field holds the factors and their plan (the protocol
  soap_optax.diagnostics and soap_optax.state_shardings follow)."""
  return hasattr(getattr(x, 'eigenbasis', None), 'plan')


def refresh_work(state) -> tuple[float, float]:
  """(most loaded device's ``sum d^3``, total / number of shards)."""
  import jax  # pylint: disable=g-import-not-at-top
  per_device, total, shards = None, 0.0, 1
  for node in jax.tree.leaves(state, is_leaf=is_eigenbasis_state):
    if not is_eigenbasis_state(node):
      continue
    plan = node.eigenbasis.plan
    layout = plan.sharding
    shards = layout.num_shards if layout else 1
    per_device = per_device or [0.0] * shards
    for s, stack in enumerate(plan.stacks):
      cost = float(sum(d**3 for d in stack.layout.factor_sizes))
      total += cost * stack.size
      counts = layout.units_per_shard[s] if layout else (stack.size,)
      for d, n in enumerate(counts):
        per_device[d] += n * cost
  return (max(per_device) if per_device else 0.0), total / shards


def run_config(model: str, devices: int, mesh_kind: str, scanned: bool,
               block_size, optimizers, bucket_padding=0.1) -> dict:
  """One configuration, in this process (whose device count is set)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top

  shape = (4, devices // 4) if mesh_kind == 'hsdp' else (devices,)
  names = ('data', 'fsdp') if mesh_kind == 'hsdp' else ('fsdp',)
  mesh = jax.make_mesh(shape, names, axis_types=(
      jax.sharding.AxisType.Auto,) * len(shape))
  fsdp = mesh.shape['fsdp']
  shapes = llama_shapes(**MODELS[model], scanned=scanned)
  plain = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  numbers = {k: soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
             if scanned and k.startswith('layers/') else None for k in shapes}
  # FSDP as the exchange takes it: each parameter divided over 'fsdp' along
  # the axis soap_optax.parameter_shardings names (replicated over 'data').
  layout = soap_optax.parameter_shardings(soap_optax.soap(
      1e-3, block_size=block_size, dimension_numbers=numbers, mesh=mesh,
      shard_axes='fsdp', bucket_padding=bucket_padding), plain)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=layout[k])
            for k, s in shapes.items()}
  param_bytes = sum(4 * math.prod(s) for s in shapes.values())
  row = dict(model=model, devices=devices, mesh=mesh_kind,
             layers='scanned' if scanned else 'separate',
             block_size=block_size, bucket_padding=bucket_padding,
             params=sum(math.prod(s)
                                               for s in shapes.values()),
             param_bytes_per_device=param_bytes / fsdp)

  def build(name, sharded):
    if name == 'adamw':
      return optax.adamw(1e-3)
    return soap_optax.soap(
        1e-3, block_size=block_size, dimension_numbers=numbers,
        mesh=mesh if sharded else None,
        shard_axes='fsdp' if sharded else None,
        bucket_padding=bucket_padding)

  def state_bytes(state, shardings):
    return sum(
        x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))

  for name in optimizers:
    tx = build(name, True)
    state = jax.eval_shape(tx.init, params)
    shardings = soap_optax.state_shardings(tx, params)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings)
    grad_shardings = {k: p.sharding for k, p in params.items()}
    update = jax.jit(tx.update, out_shardings=(grad_shardings, shardings))
    tick = time.perf_counter()
    lowered = update.lower(params, abstract_state, params)
    lower_s = time.perf_counter() - tick
    tick = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tick
    memory = compiled.memory_analysis()
    unsharded = jax.eval_shape(build(name, False).init, plain)
    ideal = soap_optax.state_nbytes(unsharded) / fsdp
    found = collectives(compiled.as_text())
    result = dict(
        state=state_bytes(state, shardings), ideal=ideal,
        temp=memory.temp_size_in_bytes, lower_s=lower_s,
        compile_s=compile_s, collectives=found,
        largest_collective=max(v['largest'] for v in found.values()),
        moved=sum(v['bytes'] for v in found.values()))
    if name != 'adamw':
      result['refresh_device'], result['refresh_ideal'] = refresh_work(state)
      result['stacks'] = sum(
          len(node.eigenbasis.plan.stacks)
          for node in jax.tree.leaves(state, is_leaf=is_eigenbasis_state)
          if is_eigenbasis_state(node))
      tick = time.perf_counter()
      jax.jit(build(name, False).update).lower(plain, unsharded,
                                               plain).compile()
      result['unsharded_compile_s'] = time.perf_counter() - tick
    row[name] = result
  return row


def child(args) -> None:
  """Runs the configurations of one device count; prints one JSON line each."""
  for config in json.loads(args.child):
    row = run_config(config['model'], args.devices, config['mesh'],
                     config['scanned'], config['block_size'],
                     config['optimizers'], config['bucket_padding'])
    print('ROW ' + json.dumps(row), flush=True)


def configurations(args):
  for model in args.models:
    for mesh in args.meshes:
      for layers in args.layers:
        for block in args.blocks:
          for buckets in args.buckets:
            yield dict(model=model, mesh=mesh, scanned=layers == 'scanned',
                       block_size=None if block == 'none' else int(block),
                       bucket_padding=(None if buckets == 'none'
                                       else float(buckets)),
                       optimizers=args.optimizers)


def run(args) -> list[dict]:
  """Every configuration, one subprocess per device count."""
  rows = []
  for devices in args.devices:
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1', JAX_PLATFORMS='cpu',
               XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={devices}'))
    command = [sys.executable, __file__, '--devices', str(devices),
               '--child', json.dumps(list(configurations(args)))]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
    for line in done.stdout.splitlines():
      if line.startswith('ROW '):
        rows.append(json.loads(line[4:]))
        print(format_row(rows[-1]), flush=True)
    if done.returncode:
      raise RuntimeError(f'{devices} devices failed:\n{done.stderr[-4000:]}')
  return rows


def mib(n: float) -> str:
  return f'{n / 2**20:,.1f}'


def format_row(row: dict) -> str:
  soap = row.get('soap', {})
  text = (f'{row["model"]} {row["devices"]} {row["mesh"]} {row["layers"]} '
          f'block={row["block_size"]} buckets={row.get("bucket_padding")}')
  if soap:
    text += (f' | state {mib(soap["state"])} MiB ({soap["state"] / soap["ideal"]:.2f}x)'
             f' temp {mib(soap["temp"])} MiB, largest collective '
             f'{mib(soap["largest_collective"])} MiB '
             f'({soap["largest_collective"] / row["param_bytes_per_device"]:.2f}x params)'
             f' moved {soap["moved"] / row["param_bytes_per_device"]:.2f}x params'
             f' refresh {soap["refresh_device"] / soap["refresh_ideal"]:.2f}x'
             f' compile {soap["compile_s"]:.1f}s (unsharded '
             f'{soap["unsharded_compile_s"]:.1f}s)')
  if 'adamw' in row:
    text += f' | adamw compile {row["adamw"]["compile_s"]:.1f}s'
  return text


def markdown(rows: list[dict]) -> str:
  """The BENCHMARKS.md table."""
  lines = [
      '| model | devices | mesh | layers | block | state MiB/dev (× ideal) '
      '| temp MiB/dev (× state) | largest collective (× params/dev) '
      '| moved × params/dev | all-gather / all-to-all / permute / all-reduce '
      '| refresh × ideal | compile s (unsharded) '
      '| AdamW state MiB/dev | AdamW compile s |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    s, c = row['soap'], row['soap']['collectives']
    lines.append(
        f'| {row["model"]} | {row["devices"]} | {row["mesh"]} | '
        f'{row["layers"]} | {row["block_size"] or "none"} | '
        f'{mib(s["state"])} ({s["state"] / s["ideal"]:.2f}) | '
        f'{mib(s["temp"])} ({s["temp"] / s["state"]:.2f}) | '
        f'{mib(s["largest_collective"])} '
        f'({s["largest_collective"] / row["param_bytes_per_device"]:.2f}) | '
        f'{s["moved"] / row["param_bytes_per_device"]:.2f} | '
        f'{c["all-gather"]["count"]} / {c["all-to-all"]["count"]} / '
        f'{c["collective-permute"]["count"]} / {c["all-reduce"]["count"]} | '
        f'{s["refresh_device"] / s["refresh_ideal"]:.2f} | '
        f'{s["compile_s"]:.1f} ({s["unsharded_compile_s"]:.1f}) | ' + (
            f'{mib(row["adamw"]["state"])} | {row["adamw"]["compile_s"]:.1f} |'
            if 'adamw' in row else '– | – |'))
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='the CI set: the small model on 16 devices')
  parser.add_argument('--models', default='1b,7b')
  parser.add_argument('--devices', default='64,256')
  parser.add_argument('--meshes', default='fsdp,hsdp')
  parser.add_argument('--layers', default='scanned')
  parser.add_argument('--blocks', default='1024')
  parser.add_argument('--optimizers', default='soap,adamw')
  parser.add_argument('--buckets', default='0.1',
                      help="SOAP's bucket_padding values ('none': off)")
  parser.add_argument('--out', default=None, help='write the rows as JSON')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.devices, args.meshes = 'quick', '16', 'fsdp'
    args.blocks = 'none,512'
  for name in ('models', 'meshes', 'layers', 'blocks', 'optimizers',
               'buckets'):
    setattr(args, name, getattr(args, name).split(','))
  args.devices = [int(n) for n in str(args.devices).split(',')]
  unknown = set(args.models) - set(MODELS)
  if unknown:
    parser.error(f'--models takes {sorted(MODELS)}, got {sorted(unknown)}')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child is not None:
    args.devices = args.devices[0]
    child(args)
    return
  rows = run(args)
  print(markdown(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
