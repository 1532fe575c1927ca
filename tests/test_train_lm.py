"""The main job, scripts/train_lm.py, in its reduced (--quick) size."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'scripts' / 'train_lm.py'


def run(*args, timeout=600):
  return subprocess.run([sys.executable, str(SCRIPT), *args],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _valid_losses(out_dir, name):
  record = json.loads((out_dir / f'record_{name}.json').read_text())
  return record['valid_loss'], record['batch_loss']


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  """One uninterrupted quick run of SOAP and AdamW, checkpointed every 5
  steps: read by the output checks and, as the straight run, by the
  resume check (SOAP's losses do not depend on which other optimizers run
  or on checkpointing)."""
  out = tmp_path_factory.mktemp('train_lm') / 'run'
  result = run('--quick', '--no-progress', '--optimizers', 'soap,adamw',
               '--checkpoint-every', '5', '--out', str(out))
  return result, out


def test_quick_run_writes_table_plot_and_json(quick_run):
  result, out = quick_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'steps to AdamW final' in result.stdout
  assert (out / 'losses.png').stat().st_size > 10_000
  results = json.loads((out / 'results.json').read_text())
  assert [row['optimizer'] for row in results['table']] == ['soap', 'adamw']
  for row in results['table']:
    assert row['final_valid_loss'] < 5.545  # below uniform bytes, ln(256).
    assert row['wall_clock_s'] > 0 and row['optimizer_step_share'] > 0
    assert (row['optimizer_step_share'] ==
            results['records'][row['optimizer']]['optimizer_step_share'])
  assert str(out / 'results.json') in result.stdout
  # The printed table: a step count or 'not reached' under 'steps to AdamW
  # final', never Python's None.
  table = [line.split(' | ') for line in result.stdout.splitlines()
           if line.startswith(('soap | ', 'adamw | '))]
  assert len(table) == 2 and 'None' not in result.stdout
  for cells, row in zip(table, results['table']):
    reached = row['steps_to_adamw_final']
    assert cells[4] == ('not reached' if reached is None else str(reached))
    assert cells[6] == f'{row["optimizer_step_share"]:.0%}'
  # soap_optax.diagnostics, logged every step and at every evaluation.
  soap = results['records']['soap']
  steps = results['config']['steps']
  assert len(soap['staleness']) == len(soap['decompositions']) == steps
  assert all(0 <= s <= 1 for s in soap['staleness'])
  assert soap['decompositions'] == sorted(soap['decompositions'])
  assert soap['decompositions'][0] > 0  # the first step decomposes.
  assert [d['step'] for d in soap['diagnostics']] == soap['steps'][1:]
  assert soap['diagnostics'][-1]['failed_refreshes'] == 0
  assert results['records']['adamw']['staleness'] == []
  assert (out / 'diagnostics.png').stat().st_size > 10_000


def test_interrupted_and_resumed_run_reproduces_the_losses_bitwise(
    tmp_path, quick_run):
  args = ('--quick', '--no-progress', '--optimizers', 'soap',
          '--checkpoint-every', '5')
  straight_result, straight = quick_run
  assert straight_result.returncode == 0, straight_result.stderr[-3000:]
  resumed = tmp_path / 'resumed'
  first = run(*args, '--out', str(resumed), '--stop-after', '10')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'stopped after step 10' in first.stdout
  assert not (resumed / 'record_soap.json').exists()
  second = run(*args, '--resume', str(resumed))
  assert second.returncode == 0, second.stderr[-3000:]
  assert _valid_losses(resumed, 'soap') == _valid_losses(straight, 'soap')


@pytest.mark.parametrize('args, message', [
    (['--text-file', '/nonexistent/corpus.txt'], 'does not exist'),
    (['--optimizers', 'soap,sgd'], 'unknown sgd'),
    (['--steps', '0'], '--steps must be a positive integer'),
    (['--batch-size', '-3'], '--batch-size must be a positive integer'),
    (['--lr', 'soap=fast'], 'is not a number'),
    (['--warmup-steps', '20'], '--warmup-steps must be >= 0 and below'),
    (['--soap-b2', '1.0'], '--soap-b2 must be in [0, 1)'),
    (['--one-sided', '--optimizers', 'shampoo'],
     '--one-sided: soap, factorized_soap'),
    (['--soap-params', 'embeddings'], 'invalid choice'),
])
def test_bad_input_gets_one_clear_line_and_exit_status_2(args, message):
  result = run('--quick', *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


def test_empty_or_unreadable_text_file_and_foreign_resume_dir(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_bytes(b'')
  result = run('--quick', '--text-file', str(empty))
  assert result.returncode == 2 and 'is empty' in result.stderr
  result = run('--quick', '--text-file', str(tmp_path))
  assert result.returncode == 2 and 'is not a file' in result.stderr
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('hello world, ' * 200)
  out = tmp_path / 'run'
  assert run('--quick', '--no-progress', '--optimizers', 'adamw',
             '--text-file', str(corpus), '--out', str(out)).returncode == 0
  result = run('--quick', '--optimizers', 'adamw', '--steps', '30',
               '--text-file', str(corpus), '--resume', str(out))
  assert result.returncode == 2
  assert 'different configuration' in result.stderr and 'steps' in result.stderr
  assert 'Traceback' not in result.stderr


# ------------------------------------------------------------------------------
# The tuning settings (--schedule, --warmup-steps, --soap-params, --soap-b2,
# --one-sided), checked in-process on the quick model.

sys.path.insert(0, str(SCRIPT.parent))
import lm  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_report  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_lm  # pylint: disable=g-import-not-at-top,wrong-import-position


def _build(*flags):
  return train_lm.build_config(train_lm.parse_args(['--quick', *flags]))


# The quick model's weight matrices (and 3-D attention kernels), by path.
BLOCK_MATRICES = {f'blocks/0/attention/{p}/kernel'
                  for p in ('query', 'key', 'value', 'out')} | {
                      'blocks/0/up/kernel', 'blocks/0/down/kernel'}
OUTER_MATRICES = {'embed/embedding', 'position', 'head/kernel'}


def _labels(config):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  params = nnx.state(lm.ByteTransformer(config, nnx.Rngs(0)), nnx.Param)
  labels = {}
  for path, label in jax.tree_util.tree_flatten_with_path(
      lm.soap_labels(config, params))[0]:
    keys = [str(k.key) for k in path  # not the Variables' '.value'.
            if not isinstance(k, jax.tree_util.GetAttrKey)]
    labels['/'.join(keys)] = label
  return labels


@pytest.mark.parametrize('soap_params, expected', [
    ('all', None), ('matrices', BLOCK_MATRICES | OUTER_MATRICES),
    ('hidden', BLOCK_MATRICES)])
def test_soap_params_selects_the_parameters_of_the_eigenbasis_part(
    soap_params, expected):
  labels = _labels(_build('--soap-params', soap_params))
  assert len(labels) == 22  # every parameter of the 1-layer model.
  eigenbasis = {p for p, label in labels.items() if label == 'eigenbasis'}
  assert eigenbasis == (set(labels) if expected is None else expected)
  assert set(labels.values()) <= {'eigenbasis', 'adamw'}


def test_the_adamw_part_is_optax_adamw_at_the_adam_part_rate():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  config = _build('--soap-params', 'hidden')
  params = nnx.state(lm.ByteTransformer(config, nnx.Rngs(0)), nnx.Param)
  params = jax.tree.map(lambda x: x, nnx.to_pure_dict(params))
  grads = jax.tree.map(lambda x: np.cos(3.0 * x) + 0.1, params)
  tx = lm.make_optimizer(config, 'soap', 1e-2)
  reference = optax.adamw(lm_config.ADAM_PART_LEARNING_RATE, b1=0.9, b2=0.95,
                          weight_decay=config.weight_decay)
  state, ref_state = tx.init(params), reference.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, ref_state = reference.update(grads, ref_state, params)
  for path in ('embed', 'position', 'head', 'norm'):
    for got, want in zip(jax.tree.leaves(updates[path]),
                         jax.tree.leaves(expected[path]), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  for got, want in zip(jax.tree.leaves(updates['blocks'][0]['norm1']),
                       jax.tree.leaves(expected['blocks'][0]['norm1'])):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # The blocks' kernels are SOAP's: not AdamW's.
  assert not np.allclose(updates['blocks'][0]['up']['kernel'],
                         expected['blocks'][0]['up']['kernel'])


def test_every_script_name_comes_from_the_one_table():
  import optimizers  # pylint: disable=g-import-not-at-top
  from benchmark_sections import shared  # pylint: disable=g-import-not-at-top
  from experiment_parts import kronecker  # pylint: disable=g-import-not-at-top
  assert set(lm_config.OPTIMIZERS) <= set(optimizers.OPTIMIZERS)
  assert set(lm_config.DEFAULT_LEARNING_RATES) == set(lm_config.OPTIMIZERS)
  assert set(lm_config.EIGENBASIS_OPTIMIZERS) <= set(optimizers.EIGENBASIS)
  assert set(shared.OPTIMIZERS) <= set(optimizers.OPTIMIZERS)
  assert set(kronecker.kronecker_factories(10)) <= set(optimizers.OPTIMIZERS)
  config = _build()
  for name in optimizers.OPTIMIZERS:  # each builds with the main job's config.
    lm.make_optimizer(config, name, 1e-3)
  with pytest.raises(ValueError, match='unknown optimizer'):
    optimizers.check_names(('soap', 'sgd'))


def test_the_table_names_an_alias_and_its_keywords():
  import optimizers  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  assert optimizers.eigenbasis_alias('kl_soap') is soap_optax.soap
  assert optimizers.EIGENBASIS['kl_soap'].keywords == dict(
      factor_estimator='kl')
  assert optimizers.second_moment_keyword('soap') == 'b2'
  assert optimizers.second_moment_keyword('kl_shampoo') == 'shampoo_beta'
  with pytest.raises(ValueError, match='one_sided: shampoo'):
    optimizers.make_eigenbasis_optimizer('shampoo', 1e-3, one_sided=True)
  with pytest.raises(ValueError, match='factor_estimator'):
    optimizers.make_eigenbasis_optimizer('kl_soap', 1e-3,
                                         factor_estimator='frobenius')


@pytest.mark.parametrize('schedule, warmup', [('constant', 0),
                                              ('constant', 5),
                                              ('cosine', None)])
def test_learning_rate_schedule_against_its_formula(schedule, warmup):
  flags = ['--schedule', schedule]
  if warmup is not None:
    flags += ['--warmup-steps', str(warmup)]
  config = _build(*flags)
  total, w = config.steps, config.warmup_steps
  assert w == (total // 10 if warmup is None else warmup)
  rate = lm.learning_rate_schedule(config, 0.3)
  for t in range(total + 3):
    if t < w:
      expected = 0.3 * t / w
    elif schedule == 'constant':
      expected = 0.3
    else:
      progress = min(1.0, (t - w) / (total - w))
      expected = 0.03 + 0.27 * 0.5 * (1 + math.cos(math.pi * progress))
    got = rate(t) if callable(rate) else rate
    assert abs(float(got) - expected) < 1e-6 * 0.3, (t, got, expected)


# ------------------------------------------------------------------------------
# The report, in-process on made-up records.


def _record(name, valid_loss, staleness=(), decompositions=()):
  steps = [0, 10, 20]
  return dict(optimizer=name, learning_rate=3e-3, steps=steps,
              valid_loss=valid_loss, train_loss=valid_loss,
              wall_clock=[0.0, 1.0, 2.0], staleness=list(staleness),
              decompositions=list(decompositions), optimizer_step_share=0.4,
              tokens_per_second=1000.0)


def test_report_table_says_not_reached_and_na():
  config = _build('--optimizers', 'soap,adamw')
  records = {'soap': _record('soap', [5.5, 4.0, 3.5]),
             'adamw': _record('adamw', [5.5, 3.6, 3.0])}
  rows = lm_report.table_rows(config, records)
  assert [r['steps_to_adamw_final'] for r in rows] == [None, 20]
  table = lm_report.format_table(config, rows, has_adamw=True)
  soap_line, adamw_line = table.splitlines()[-2:]
  assert soap_line.split(' | ')[4] == 'not reached'
  assert adamw_line.split(' | ')[4] == '20'
  assert 'None' not in table
  # Without an AdamW run there is no target: 'n/a'.
  config = _build('--optimizers', 'soap')
  rows = lm_report.table_rows(config, {'soap': records['soap']})
  table = lm_report.format_table(config, rows, has_adamw=False)
  assert table.splitlines()[-1].split(' | ')[4] == 'n/a'


def test_diagnostics_plot_has_integer_steps():
  config = _build('--optimizers', 'soap,adamw')
  steps = 20  # the --quick run: matplotlib's own ticks are 2.5, 5, 7.5, ...
  records = {'soap': _record('soap', [5.5, 4.0, 3.5], [0.1] * steps,
                             [2.0 * (1 + s // 2) for s in range(steps)]),
             'adamw': _record('adamw', [5.5, 3.6, 3.0])}
  fig = lm_report.diagnostics_figure(config, records)
  fig.canvas.draw()
  (ax,) = fig.axes  # soap only: adamw has no eigenbasis.
  ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
  assert len(ticks) >= 2
  assert all(float(t).is_integer() for t in ticks), ticks
