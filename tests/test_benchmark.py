"""scripts/benchmark.py, scripts/experiments.py and scripts/numerics.py in
their --quick sizes, every section and part.

These prove that the scripts run end to end and write what BENCHMARKS.md is
built from. They assert no timing: the numbers of a quick run mean little.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / 'scripts'


def run(script, *args, timeout=900):
  return subprocess.run([sys.executable, str(SCRIPTS / script), *args],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_quick_benchmark_writes_every_section(tmp_path):
  result = run('benchmark.py', '--quick', '--device', 'cpu', '--sections',
               'step,refresh,compile,memory,train_step,versus_torch,sharded',
               '--out', str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  tables = (tmp_path / 'tables.md').read_text()
  for title in ('Optimizer step', 'Refresh cost', 'Compile time',
                'Optimizer-state memory', 'Whole training step'):
    assert title in tables
  for name in ('step_cost.png', 'refresh_cost.png', 'memory.png'):
    assert (tmp_path / name).stat().st_size > 5_000

  step_rows = results['step']['rows']
  assert {r['optimizer'] for r in step_rows} == {
      'adamw', 'soap', 'shampoo', 'factorized_soap', 'soap_one_sided'}
  for r in step_rows:
    assert r['regular_s'] > 0 and r['regular_n'] >= 9
    if r['optimizer'] != 'adamw':
      assert r['refresh_n'] >= 1 and r['percent_of_matmul'] > 0

  # The state sizes of every variant equal the closed forms written in the
  # script, for single matrices, the small transformer and GPT-2 small.
  memory = results['memory']['rows'] + results['memory']['variants']
  assert memory and all(r['exact'] for r in memory), [
      r for r in memory if not r['exact']]
  assert {'kl_shampoo', 'kl_shampoo block_size=1024'} <= {
      r['variant'] for r in results['memory']['variants']}

  refresh = results['refresh']
  assert {r['method'] for r in refresh['batched']} == {'eigh', 'qr'}
  assert all(r['eigh_s'] > 0 and r['qr_s'] > 0 for r in refresh['single'])

  train = results['train_step']['rows']
  assert [r['optimizer'] for r in train] == ['soap', 'adamw']
  for r in train:  # a few steps of training lower the loss below uniform.
    assert math.isfinite(r['final_loss']) and r['final_loss'] < math.log(256)

  # 8 host devices: the divided state is the replicated one laid out over
  # the devices (the same factors and stacks, one compiled program, the
  # busiest device holding at most a quarter of the replicated bytes).
  sharded = results['sharded']
  assert sharded['devices'] == 8 and sharded['models']
  for name, model in sharded['models'].items():
    replicated, divided = model['replicated'], model['divided']
    assert divided['factors'] == replicated['factors'], name
    assert divided['stack_sizes'] == replicated['stack_sizes'], name
    assert divided['compiles'] == 1, name
    assert (4 * divided['max_device_state_bytes']
            <= replicated['max_device_state_bytes']), name


def test_benchmark_rejects_bad_arguments():
  result = run('benchmark.py', '--sections', 'step,speed')
  assert result.returncode == 2
  assert '--sections' in result.stderr and 'speed' in result.stderr
  result = run('benchmark.py', '--steps', '3')
  assert result.returncode == 2 and '--steps' in result.stderr


def test_benchmark_asks_for_a_gpu_it_cannot_find():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('JAX sees an accelerator here (never so in CI)')
  result = run('benchmark.py', '--device', 'gpu', '--sections', 'memory')
  assert result.returncode == 2 and 'no GPU' in result.stderr


def test_quick_experiments_write_tables_and_plots(tmp_path):
  # 'soap_vs_muon' runs in tests/test_experiments.py (another xdist file).
  result = run('experiments.py', '--quick', '--parts',
               'kronecker,lm,muon,refresh,kl_vs_muon,chinchilla',
               '--out', str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  for name in ('kronecker.png', 'frequency.png', 'lm.png', 'muon.png',
               'refresh.png'):
    assert (tmp_path / name).stat().st_size > 5_000
  muon = {r['optimizer']: r for r in results['muon']['rows']}
  assert {'adamw', 'soap (every 10)', 'muon'} == set(muon)
  assert muon['adamw']['steps_to_adamw_best'] is not None
  refresh = results['refresh']
  for r in refresh['kronecker']['rows'] + refresh['lm']['rows']:
    assert r['decompositions'] > 0
  assert {r['schedule'] for r in refresh['lm']['rows']} == {
      'every 10', 'adaptive'}
  kronecker = {(r['optimizer'], r['frequency']): r
               for r in results['kronecker']['rows']}
  assert {('soap', 1), ('shampoo', 1), ('soap', 10), ('shampoo', 10),
          ('adamw', 10), ('soap_one_sided', 10),
          ('factorized_soap', 10)} <= set(kronecker)
  # AdamW reaches its own final loss by definition.
  assert all(s is not None
             for s in kronecker[('adamw', 10)]['steps_to_adamw_final'])
  lm = {r['optimizer']: r for r in results['lm']['rows']}
  assert set(lm) == {'adamw', 'soap'}  # the others only at full size.
  for r in lm.values():
    assert all(math.isfinite(v) for v in r['final_valid_loss'])

  # The README's main table and BENCHMARKS.md section 13.
  kl = results['kl_vs_muon']
  assert {r['optimizer'] for r in kl['rows']} == {
      'muon', 'soap', 'kl_shampoo', 'kl_soap'}
  assert set(kl['best']) >= {'muon', 'soap', 'kl_shampoo', 'kl_soap'}
  assert all(math.isfinite(r['final_valid_loss']) for r in kl['rows'])
  state = kl['gpt2_state']
  # AdamW's two float32 moments of GPT-2 small's 124,439,808 parameters (the
  # published count, tied embeddings) and its int32 step count.
  assert state['adamw'] == 2 * 4 * 124_439_808 + 4
  # KL-Shampoo keeps no second moment of the rotated gradient; one-sided
  # layouts and blocks hold smaller factors.
  assert state['kl_shampoo'] < state['soap']
  assert state['soap one-sided'] < state['soap block_size=1024'] < state['soap']
  chinchilla = results['chinchilla']
  assert (tmp_path / 'chinchilla.png').stat().st_size > 5_000
  assert chinchilla['rows'] and chinchilla['ratios']
  for r in chinchilla['rows']:  # each row is the best rate of its grid.
    assert math.isfinite(r['final_valid_loss']), r
    assert r['final_valid_loss'] == min(r['grid'].values()), r
    assert r['grid'][str(r['lr'])] == r['final_valid_loss'], r
  for ratio in chinchilla['ratios']:
    assert sorted(chinchilla['ranking'][str(ratio)]) == sorted(
        {r['optimizer'] for r in chinchilla['rows']})


def test_quick_numerics_show_what_each_safeguard_changes(tmp_path):
  """scripts/numerics.py (docs/numerics.md, BENCHMARKS.md): in float32 the
  rounding floor keeps dead and out-of-span coordinates still (against
  full-size updates without it), changes nothing where the factors have
  full rank, and brings eager and jitted runs together."""
  result = run('numerics.py', '--quick', '--out', str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  dead = results['dead']
  assert dead['float32_floor_True'] < 1e-2 < 0.1 < dead['float32_floor_False']
  assert dead['float64'] < 1e-6
  for rank, runs in results['span'].items():
    assert max(runs['True']) < 0.05 and min(runs['False']) > 0.5, rank
  eager = results['eager']
  assert 10 * eager['True'] < eager['False']
  full = results['full_rank']
  for with_floor, without in zip(full['True'], full['False']):
    assert abs(with_floor - without) <= 1e-4 * abs(without)
  # Ungrafted Shampoo between refreshes: the Rayleigh floor keeps the update
  # at the gradients' scale; without it frozen near-zero eigenvalues blow
  # it up by orders of magnitude.
  rms = results['shampoo']['rms']
  assert 1000 * max(rms['True']) < max(rms['False'])
  assert all(math.isfinite(x) for x in results['shampoo']['kronecker_ungrafted'])
  assert (tmp_path / 'tables.md').read_text().strip()


def test_experiments_reject_unknown_parts():
  result = run('experiments.py', '--parts', 'kronecker,vision')
  assert result.returncode == 2 and 'vision' in result.stderr


def test_owner_layout_figure_draws_every_unit_once(tmp_path):
  """scripts/owner_layout.py (the sharding guide's figure): every one of
  the small model's 38 units (embedding and head 5 x 2 blocks each, three
  layers of 2 x 3) is drawn once, each device owns its share of them
  (within one unit of each stack per device: at most 3 stacks here)."""
  out = tmp_path / 'owner_layout.png'
  result = run('owner_layout.py', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.stat().st_size > 5_000
  line = [l for l in result.stdout.splitlines()
          if l.startswith('units per device:')][-1]
  counts = json.loads(line.split(':', 1)[1])
  assert sum(counts.values()) == 38
  assert max(counts.values()) - min(counts.values()) <= 3


def test_bucket_report_keeps_padding_within_its_bound(tmp_path):
  """scripts/buckets.py: at the default bound the GPT-2-sized main job's
  padding adds at most 10% work (the issue's goal) and buckets never add
  stacks; every row's extra work, and the extra refresh work of its solver
  sizes, is within its bucket_padding."""
  out = tmp_path / 'buckets.json'
  result = run('buckets.py', '--json', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  gpt2 = results['GPT-2 small (main job, 198 leaves)']
  default = next(r for r in gpt2 if r['bucket_padding'] == 0.1)
  assert default['extra_work_pct'] <= 10.0
  for rows in results.values():
    off = next(r for r in rows if r['bucket_padding'] is None)
    assert off['extra_work_pct'] == 0.0 and off['extra_state_pct'] == 0.0
    for r in rows:
      assert r['stacks'] <= off['stacks']
      assert len(r['solver_sizes']) <= off['factor_sizes']
      if r['bucket_padding']:
        assert r['extra_work_pct'] <= 100 * r['bucket_padding'] + 1e-9
        assert r['extra_refresh_pct'] <= 100 * r['bucket_padding'] + 1e-9
      else:
        assert r['extra_refresh_pct'] == 0.0
  # The solver sizes (issue 29's padding goal: at most 10% more work on
  # GPT-2-small shapes at the default): 6 factor sizes, 3 solver programs.
  assert default['factor_sizes'] == 6 and len(default['solver_sizes']) == 3
  assert default['extra_refresh_pct'] <= 10.0
