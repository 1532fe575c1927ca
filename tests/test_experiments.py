"""scripts/experiments.py's 'soap_vs_muon' sweep.

The sweep's decisions (grids extended until the best rate is interior, one
winner per SOAP setting, their combination, the best of each optimizer on more
seeds and at a larger batch) are checked against a synthetic trainer whose
losses are a known function of the settings, so the right answer is known in
advance; then the part runs end to end at --quick size.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / 'scripts'
sys.path.insert(0, str(SCRIPTS))

from experiment_parts import soap_vs_muon  # pylint: disable=g-import-not-at-top,wrong-import-position

# The synthetic landscape: final loss = FLOOR[name] + 0.1 * (decades from the
# best rate)^2 - the bonus of each setting. SOAP's best rate is 3e-3 (1e-2
# with warmup+cosine); Muon's 0.1 sits on the edge of its grid.
FLOOR = {'adamw': 2.0, 'muon': 1.8, 'soap': 1.85, 'factorized_soap': 1.86,
         'shampoo': 1.84}
BEST_LR = {'adamw': 3e-3, 'muon': 1e-1, 'soap': 3e-3, 'factorized_soap': 3e-3,
           'shampoo': 1e-2}
BONUS = {('precondition_frequency', 2): 0.06,
         ('precondition_frequency', 1): 0.04,
         ('precondition_frequency', 5): 0.01,
         ('soap_b2', 0.99): -0.05, ('soap_b2', 0.9): -0.01,
         ('soap_params', 'hidden'): 0.03, ('soap_params', 'matrices'): 0.01,
         ('one_sided', True): -0.02, ('schedule', 'cosine'): 0.02}
STEPS = 300


def synthetic_run(name, learning_rate, seed, sizes, out_dir,
                  precondition_frequency=10, **options):
  del out_dir
  options = dict(options, precondition_frequency=precondition_frequency)
  best = BEST_LR[name]
  if options['schedule'] == 'cosine':
    best *= 10 ** 0.5  # warmup and decay move the best rate one rung up.
  final = (FLOOR[name] + 0.1 * math.log10(learning_rate / best) ** 2
           + 0.01 * seed - (0.05 if sizes['batch_size'] > 32 else 0.0))
  if name != 'adamw' and name != 'muon':
    final -= sum(BONUS.get(item, 0.0) for item in options.items())
  steps = list(range(0, STEPS + 1, 10))
  # Decreases to exactly `final` at the last step.
  curve = [final + (5.5 - final) * (1 - t / STEPS) ** 2 for t in steps]
  curve[-1] = final
  frequency = options['precondition_frequency']
  return dict(optimizer=name, learning_rate=learning_rate, steps=steps,
              valid_loss=curve, train_loss=curve, batch_loss=[],
              wall_clock=[0.2 * t for t in steps],
              decompositions=([float(STEPS // frequency)]
                              if name == 'soap' else []),
              staleness=[], diagnostics=[], finished=True,
              optimizer_step_share=0.5)


def _recording(calls):
  """synthetic_run, each call's arguments appended to ``calls``."""
  def fake(*args, **kwargs):
    calls.append((args, kwargs))
    return synthetic_run(*args, **kwargs)
  return fake


@pytest.fixture
def sweep(tmp_path):
  calls = []
  return (soap_vs_muon.run(False, tmp_path, train=_recording(calls)), calls,
          tmp_path)


def test_target_is_adamws_best_over_grid_and_schedules(sweep):
  result, _, _ = sweep
  # Constant: exactly FLOOR at 3e-3. Cosine: its optimum 9.5e-3 is off the
  # ladder, so its best rung, 1e-2, ends a little above FLOOR.
  assert result['target'] == FLOOR['adamw']
  adamw = {r['options']['schedule']: r for r in result['adamw']}
  assert adamw['constant']['lr'] == 3e-3 and adamw['cosine']['lr'] == 1e-2
  assert adamw['cosine']['final_valid_loss'] > FLOOR['adamw']


def test_grids_are_extended_until_the_best_rate_is_interior(sweep):
  result, _, _ = sweep
  muon = {r['options']['schedule']: r for r in result['muon']}
  constant = muon['constant']
  assert constant['lr'] == 0.1 and constant['interior']
  assert set(constant['grid_final_losses']) == {'0.003', '0.01', '0.03',
                                                '0.1', '0.3'}
  for rows in (result['adamw'], result['muon'], [result['soap_base_row'],
                                                 result['soap_combined']]):
    assert all(r['interior'] for r in rows)


def test_each_axis_winner_and_their_combination(sweep):
  result, _, _ = sweep
  assert result['winners'] == dict(
      soap_b2=0.95, precondition_frequency=2, schedule='cosine',
      soap_params='hidden', one_sided=False)
  combined = result['soap_combined']
  assert combined['label'] == 'soap f=2 hidden only warmup+cosine'
  assert combined['options']['warmup_steps'] == STEPS // 10
  # Its grid starts around the cosine variant's best rate, 1e-2.
  assert combined['lr'] == 1e-2 and combined['interior']
  assert set(combined['grid_final_losses']) == {'0.003', '0.01', '0.03'}
  expected = (FLOOR['soap'] - 0.06 - 0.03 - 0.02 + 0.1 * math.log10(
      combined['lr'] / (3e-3 * 10 ** 0.5)) ** 2)
  assert combined['final_valid_loss'] == pytest.approx(expected)
  assert result['best']['soap']['label'] == combined['label']
  # Leave-one-out rows: each change dropped once, all worse than all three.
  ablations = {r['label']: r for r in result['soap_ablations']}
  assert set(ablations) == {'soap hidden only warmup+cosine',
                            'soap f=2 warmup+cosine', 'soap f=2 hidden only'}
  assert all(r['final_valid_loss'] > combined['final_valid_loss']
             for r in ablations.values())
  # Without the schedule: the constant schedule's best rate, 3e-3.
  assert ablations['soap f=2 hidden only']['lr'] == 3e-3
  # The relatives with the combination's settings (Shampoo has no one-sided
  # variant), at its rate 1e-2 and one rung above.
  relatives = {r['optimizer']: r for r in result['relatives']}
  assert relatives['shampoo']['label'] == (
      'shampoo f=2 hidden only warmup+cosine')
  assert set(relatives['shampoo']['grid_final_losses']) == {
      '0.01', '0.03', '0.1'}  # extended: 3e-2 was on the edge.
  assert relatives['shampoo']['lr'] == 3e-2  # its optimum, 3.2e-2 here.
  assert relatives['shampoo']['interior']
  assert relatives['factorized_soap']['lr'] == 1e-2
  # Steps to the target first: the combination gets there soonest.
  steps = [r['steps_to_target'] for r in result['soap_axes']]
  assert combined['steps_to_target'] <= min(steps) < STEPS


def test_finalists_on_two_seeds_and_at_a_larger_batch(sweep):
  result, _, _ = sweep
  assert result['seeds'] == [0, 1]
  by_seed = {(r['label'], r['seed']) for r in result['seed_rows']}
  labels = {result['best'][n]['label'] for n in ('adamw', 'muon', 'soap')}
  labels.add('shampoo f=2 hidden only warmup+cosine')  # the best relative.
  assert by_seed == {(label, s) for label in labels for s in (0, 1)}
  # Each seed's target is AdamW's run on that seed: it reaches it at the end.
  for r in result['seed_rows']:
    if r['optimizer'] == 'adamw':
      assert r['steps_to_target'] == STEPS
  assert result['large_batch'] == soap_vs_muon.LARGE_BATCH
  large = {r['optimizer']: r for r in result['large_rows']}
  assert set(large) == {'adamw', 'muon', 'soap'}
  assert result['large_target'] == pytest.approx(FLOOR['adamw'] - 0.05)
  assert len(large['soap']['grid_final_losses']) == 2  # its rate, one above.


def test_tables_and_a_rerun_reads_the_kept_runs(sweep):
  result, calls, tmp_path = sweep
  tables = soap_vs_muon.tables(result)
  assert 'soap f=2 hidden only warmup+cosine' in tables
  assert f'{result["target"]:.4f}' in tables
  kept = list((tmp_path / 'soap_vs_muon').glob('*.json'))
  assert len(kept) == len(calls)  # one file per distinct run.
  calls.clear()
  again = soap_vs_muon.run(False, tmp_path, train=_recording(calls))
  assert not calls
  assert json.dumps(again) == json.dumps(result)


def test_quick_part_runs_end_to_end(tmp_path):
  result = subprocess.run(
      [sys.executable, str(SCRIPTS / 'experiments.py'), '--quick', '--parts',
       'soap_vs_muon', '--out', str(tmp_path)],
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  section = json.loads((tmp_path / 'results.json').read_text())['soap_vs_muon']
  assert (tmp_path / 'soap_vs_muon.png').stat().st_size > 5_000
  assert {r['optimizer'] for r in section['best'].values()} == {
      'adamw', 'muon', 'soap'}
  for r in section['seed_rows'] + section['large_rows']:
    assert math.isfinite(r['final_valid_loss']) and r['final_valid_loss'] < 5.6
  assert section['soap_axes'][0]['options']['soap_params'] == 'hidden'
  assert 'SOAP against Muon, tuned' in (tmp_path / 'tables.md').read_text()
