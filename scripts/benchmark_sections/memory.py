"""Section ``memory``: optimizer-state bytes, checked against closed forms.

For single matrices, the small transformer and GPT-2 small (the shapes of
:func:`common.transformer_shapes`, evaluated abstractly: nothing is
allocated), the state of every optimizer is counted and compared, number for
number, with formulas written here from the algorithms (not from the
library), and its bytes with AdamW's. Then GPT-2 small's layout variants
(``block_size``, ``mu_dtype``, one-sided, KL-Shampoo), the formulas applied
block by block. Writes ``memory.png``.
"""

import common
import jax

import soap_optax
from benchmark_sections import shared

TITLE = 'Optimizer-state memory'


def formula_numbers(name: str, shape) -> int:
  """State elements (counters aside) of one parameter, from the formulas.

  Written from the algorithms, not from the library: AdamW keeps m and v
  (``2 numel``); SOAP adds ``GG_i`` and ``Q_i`` (``2 d_i^2``) per rotated
  axis; factorized SOAP keeps m plus one vector per axis; Shampoo keeps
  ``GG_i``, ``Q_i`` per rotated axis, ``diag(GG)`` per other axis, the
  eigenvalues per axis (its Rayleigh floor reads the tracked quotients
  below), the Adam graft's v and the momentum (``2 numel``); KL-Shampoo keeps ``GG_i``, ``Q_i``, the momentum and one
  eigenvalue estimate per entry of every axis. Every eigenbasis optimizer
  also tracks ``diag(Q_i^T GG_i Q_i)`` (``d_i``) per rotated axis, for the
  staleness, and two counters per unit (the parameter here; each block with
  ``block_size``).
  """
  size = shared.numel(shape)
  axes = shape if shape else (1,)
  one_sided = name in ('soap_one_sided', 'factorized_soap_one_sided')
  rotated = shared.rotated_axes(shape, one_sided=one_sided)
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
    return factors + diagonals + sum(axes) + 2 * size + tracking
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


def run_variants(shapes) -> list[dict]:
  """State bytes of layout variants, numbers checked against the formulas
  (applied block by block for ``block_size``)."""
  params = shared.abstract_tree(shapes)
  rows, adamw_bytes = [], None
  for label, name, layout, formula_name in MEMORY_VARIANTS:
    state = jax.eval_shape(shared.make_optimizer(name, **layout).init, params)
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


def run(quick: bool) -> dict:
  """Every optimizer on every set, then GPT-2 small's layout variants."""
  sets = shared.single_matrix_sets(quick)
  sets['transformer'] = shared.small_transformer_shapes(quick)
  sets['gpt2-small'] = common.transformer_shapes(*shared.GPT2_SMALL)
  rows = []
  for set_name, shapes in sets.items():
    params = shared.abstract_tree(shapes)
    adamw_bytes = None
    for name in shared.OPTIMIZERS:
      state = jax.eval_shape(shared.make_optimizer(name).init, params)
      measured = soap_optax.state_size(state)
      formula = sum(formula_numbers(name, s) for s in shapes.values())
      nbytes = soap_optax.state_nbytes(state)
      if name == 'adamw':
        adamw_bytes = nbytes
      rows.append(dict(params=set_name, optimizer=name,
                       num_params=common.parameter_count(params),
                       state_numbers=measured, formula_numbers=formula,
                       exact=measured == formula, state_bytes=nbytes,
                       over_adamw=nbytes / adamw_bytes))
  variants = run_variants(sets['gpt2-small'])
  return dict(rows=rows, variants=variants)


def table(section) -> str:
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


def plot(section, out_dir):
  """Each optimizer's state over AdamW's, per parameter set: ``memory.png``."""
  plt = common.pyplot()
  rows = section['rows']
  sets = list(dict.fromkeys(r['params'] for r in rows))
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / len(shared.OPTIMIZERS)
  for j, name in enumerate(shared.OPTIMIZERS):
    mine = {r['params']: r for r in rows if r['optimizer'] == name}
    ax.bar([i + j * width for i in range(len(sets))],
           [mine[s]['over_adamw'] for s in sets], width, label=name)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
  ax.axhline(1.0, color='k', lw=0.8)
  ax.set_ylabel('optimizer state / AdamW state')
  ax.grid(alpha=0.3, axis='y')
  ax.legend(fontsize=8)
  return common.save_figure(fig, out_dir / 'memory.png')
