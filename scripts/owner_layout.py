"""Where each unit lives: the owner layout of a small model, drawn.

Builds SOAP with ``mesh=`` over 4 devices and ``block_size=8`` for
a small model (an embedding, a scanned stack of 3 layers, a head) on 4 CPU
devices, reads the
owners the plan gave its units and the rows each device holds of each
parameter (``soap_optax.parameter_shardings``), and draws every parameter:
each block (a unit) filled with its owner's colour, and the devices' row
shards as dashed lines. Nothing is computed on the devices; the figure is
``docs/images/owner_layout.png``.

Usage::

  python scripts/owner_layout.py [--out PATH]
"""

import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import soap_optax

DEVICES = 4
SHAPES = {'embed': (40, 16), 'layers': (3, 16, 24), 'head': (16, 40)}
COLOURS = ('#4477aa', '#ee6677', '#228833', '#ccbb44')


def layout():
  """The plan of the small model: ``(plan, parameter shardings)``."""
  mesh = jax.make_mesh((DEVICES,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  numbers = {'embed': None, 'head': None,
             'layers': soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))}
  tx = soap_optax.soap(1e-3, block_size=8, dimension_numbers=numbers,
                       mesh=mesh)
  state = jax.eval_shape(tx.init, params)
  return state[0].eigenbasis.plan, soap_optax.parameter_shardings(tx, params)


def owner_grids(plan):
  """Per parameter (in leaf order): per slice, a grid of block owners
  ``(slices, blocks_0, blocks_1)`` and the block edges along each axis."""
  grids = []
  for placement in plan.placements:
    edges = [sorted({0} | {b for p in placement.pieces
                           for a, stop in [p.region[i]]
                           for b in range(a, stop + 1,
                                          (stop - a) // p.blocks[i])})
             for i in range(len(placement.grouped_shape))]
    owners = np.zeros((placement.num_slices,) + tuple(
        len(e) - 1 for e in edges), np.int64)
    for piece in placement.pieces:
      shard = plan.sharding.shard_of_units(piece.stack)
      grid = (placement.num_slices,) + piece.blocks
      for index in range(math.prod(grid)):
        position = np.unravel_index(index, grid)
        cell = [position[0]]
        for i, (start, _) in enumerate(piece.region):
          cell.append(edges[i].index(start) + int(position[1 + i]))
        owners[tuple(cell)] = shard[piece.offset + index]
    grids.append((owners, edges))
  return grids


def draw(out: pathlib.Path) -> dict:
  """Draws the figure; returns the number of units of each owner."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plan, shardings = layout()
  names = sorted(SHAPES)  # the leaves' order
  grids = owner_grids(plan)
  panels = sum(owners.shape[0] for owners, _ in grids)
  fig, axes = plt.subplots(1, panels, figsize=(2.3 * panels, 3.4))
  counts = {q: 0 for q in range(DEVICES)}
  k = 0
  for name, (owners, edges) in zip(names, grids):
    spec = shardings[name].spec
    divided = [i for i, entry in enumerate(spec) if entry is not None]
    for layer in range(owners.shape[0]):
      ax = axes[k]
      k += 1
      for i in range(len(edges[0]) - 1):
        for j in range(len(edges[1]) - 1):
          q = int(owners[layer, i, j])
          counts[q] += 1
          ax.add_patch(plt.Rectangle(
              (edges[1][j], edges[0][i]), edges[1][j + 1] - edges[1][j],
              edges[0][i + 1] - edges[0][i], facecolor=COLOURS[q],
              edgecolor='white', linewidth=2))
          ax.text((edges[1][j] + edges[1][j + 1]) / 2,
                  (edges[0][i] + edges[0][i + 1]) / 2, f'd{q}',
                  ha='center', va='center', color='white', fontsize=9)
      rows, cols = SHAPES[name][-2:]
      # The devices' shards of the parameter (FSDP): dashed lines.
      for axis in divided:
        matrix_axis = axis - (len(SHAPES[name]) - 2)
        length = (rows, cols)[matrix_axis]
        for cut in range(1, DEVICES):
          at = cut * length / DEVICES
          if matrix_axis == 0:
            ax.axhline(at, color='black', linestyle='--', linewidth=1)
          else:
            ax.axvline(at, color='black', linestyle='--', linewidth=1)
      ax.set_xlim(0, cols)
      ax.set_ylim(rows, 0)
      ax.set_aspect('equal')
      ax.set_xticks([])
      ax.set_yticks([])
      title = name if owners.shape[0] == 1 else f'{name}[{layer}]'
      ax.set_title(f'{title} {SHAPES[name][-2:]}', fontsize=9)
  fig.suptitle('Units (blocks of 8) coloured by owner device d0-d3; dashed: '
               'the rows each device holds', fontsize=10)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(
      pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'images' /
      'owner_layout.png'))
  args = parser.parse_args(argv)
  jax.config.update('jax_num_cpu_devices', DEVICES)  # before any device
  counts = draw(pathlib.Path(args.out))
  print('units per device:', json.dumps(counts))


if __name__ == '__main__':
  main()
