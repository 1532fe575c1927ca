"""scripts/experiments.py's 'ahead_of_muon' comparison.

Its decisions (each configuration's grid extended while its best rate is at
an edge, the best refresh interval and rate of each optimizer on seed 0, the
best on every seed, the best Muon variant, the leader, the one-sided Welch
test) are checked against a synthetic trainer whose curves are a known
function of the settings, so the answers are computed here independently;
then the part runs end to end at --quick size.
"""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / 'scripts'
sys.path.insert(0, str(SCRIPTS))

from experiment_parts import ahead_of_muon  # pylint: disable=wrong-import-position

STEPS = 300
# Final loss = FLOOR + 0.1 (decades from BEST_LR)^2 - the refresh's bonus +
# a per-seed offset of each optimizer (so steps differ from seed to seed).
FLOOR = {'adamw': 2.0, 'muon': 1.80, 'muon_hyperball': 1.78, 'soap': 1.82,
         'kl_soap': 1.83, 'soap_h': 1.70, 'kl_soap_h': 1.74,
         'soap_muon': 1.79}
BEST_LR = {'adamw': 3e-3, 'muon': 1e-2, 'muon_hyperball': 3e-1,
           'soap': 3e-3, 'kl_soap': 3e-3, 'soap_h': 3e-2, 'kl_soap_h': 3e-2,
           'soap_muon': 1e-2}
REFRESH_BONUS = {('soap', 2): 0.02, ('soap_h', 1): 0.03,
                 ('kl_soap_h', 2): 0.02}
SEED_OFFSET = {'adamw': (0.0, 0.01, -0.01, 0.005),
               'muon': (0.0, 0.02, 0.0, 0.01),
               'muon_hyperball': (0.0, -0.01, 0.02, 0.0),
               'soap_h': (0.0, 0.01, 0.0, -0.01)}


def final_loss(name, lr, seed, refresh, adam_lr):
  final = (FLOOR[name] + 0.1 * math.log10(lr / BEST_LR[name]) ** 2
           - REFRESH_BONUS.get((name, refresh), 0.0)
           + SEED_OFFSET.get(name, (0.0, 0.005, 0.01, 0.015))[seed])
  if name in ('muon', 'muon_hyperball') and adam_lr != 1e-2:
    final += 0.05  # Muon's Adam part is best at 1e-2.
  return final


def curve(final, fast=False):
  """Decreases to exactly ``final`` at the last step; ``fast``: much
  sooner (a rate above the best: early progress, a higher final loss)."""
  steps = list(range(0, STEPS + 1, 10))
  power = 6 if fast else 2
  values = [final + (5.5 - final) * (1 - t / STEPS) ** power for t in steps]
  values[-1] = final
  return steps, values


def synthetic_run(name, learning_rate, seed, sizes, out_dir,
                  precondition_frequency=10, **options):
  del sizes, out_dir
  steps, values = curve(final_loss(name, learning_rate, seed,
                                   precondition_frequency,
                                   options.get('adam_lr', 3e-3)),
                        fast=learning_rate > BEST_LR[name])
  return dict(optimizer=name, learning_rate=learning_rate, steps=steps,
              valid_loss=values, train_loss=values, batch_loss=[],
              wall_clock=[0.2 * t for t in steps], decompositions=[],
              staleness=[], diagnostics=[], finished=True,
              optimizer_step_share=0.5)


def steps_to(final, target):
  """The first evaluated step of ``final``'s curve at or below ``target``."""
  steps, values = curve(final)
  return next((s for s, v in zip(steps, values) if v <= target), None)


EXPECTED = {  # name: (refresh or Adam part, rate)
    'muon': (1e-2, 1e-2), 'muon_hyperball': (1e-2, 3e-1),
    'soap': (2, 3e-3), 'kl_soap': (1, 3e-3), 'soap_h': (1, 3e-2),
    'kl_soap_h': (2, 3e-2), 'soap_muon': (1, 1e-2)}


@pytest.fixture(scope='module')
def comparison(tmp_path_factory):
  calls = []
  def train(*args, **kwargs):
    calls.append((args, kwargs))
    return synthetic_run(*args, **kwargs)
  out = tmp_path_factory.mktemp('ahead')
  section = ahead_of_muon.run(False, out, train=train,
                              cost=lambda sizes, quick: [])
  return section, calls, out


def expected_steps(name, setting, rate):
  refresh = setting if name not in ('muon', 'muon_hyperball') else 10
  adam_lr = setting if name in ('muon', 'muon_hyperball') else 1e-2
  targets = [final_loss('adamw', 3e-3, seed, 10, 3e-3) for seed in range(4)]
  return [steps_to(final_loss(name, rate, seed, refresh, adam_lr),
                   targets[seed]) for seed in range(4)]


def test_each_optimizer_is_judged_at_its_best_configuration(comparison):
  section, _, _ = comparison
  for name, (setting, rate) in EXPECTED.items():
    best = section['best'][name]
    assert best['lr'] == pytest.approx(rate), name
    if name in ('muon', 'muon_hyperball'):
      assert best['options']['adam_lr'] == setting, name
    else:
      assert best['options']['precondition_frequency'] == setting, name
    assert best['steps'] == expected_steps(name, setting, rate), name
    assert len(best['finals']) == 4


def test_a_rate_that_is_early_but_ends_higher_is_not_chosen(comparison):
  """SOAP-H at 0.1 reaches AdamW's final loss first but ends 0.027 above
  its best rate's run: not within FINAL_LOSS_SLACK, so 0.03 is chosen."""
  section, _, _ = comparison
  rows = {r['lr']: r for r in section['grid_rows']
          if r['configuration'] == 'soap_h f=1'}
  assert rows[0.1]['steps_to_target'] < rows[0.03]['steps_to_target']
  assert rows[0.1]['final_valid_loss'] > (
      rows[0.03]['final_valid_loss'] + ahead_of_muon.FINAL_LOSS_SLACK)
  assert section['best']['soap_h']['lr'] == pytest.approx(0.03)


def test_an_edge_grid_is_extended_once(comparison):
  section, _, _ = comparison
  rates = sorted(r['lr'] for r in section['grid_rows']
                 if r['configuration'] == 'muon_hyperball adam=0.01')
  assert rates == pytest.approx([1e-2, 3e-2, 1e-1, 3e-1])


@pytest.mark.filterwarnings('ignore:Precision loss:RuntimeWarning')
def test_the_best_muon_the_leader_and_the_welch_test(comparison):
  section, _, _ = comparison
  means = {n: np.mean(expected_steps(n, *EXPECTED[n])) for n in EXPECTED}
  assert section['best_muon'] == min(('muon', 'muon_hyperball'),
                                     key=means.get)
  assert section['leader'] == 'soap_h'
  leader = expected_steps('soap_h', *EXPECTED['soap_h'])
  muon = expected_steps(section['best_muon'],
                        *EXPECTED[section['best_muon']])
  against = section['best']['soap_h']['against_best_muon']
  assert against['steps_ratio'] == pytest.approx(
      np.mean(leader) / np.mean(muon))
  assert against['p_steps'] == pytest.approx(stats.ttest_ind(
      leader, muon, equal_var=False, alternative='less').pvalue)
  assert against['significant'] == (against['p_steps'] < 0.05)
  assert section['best']['soap_h']['steps_se'] == pytest.approx(
      np.std(leader, ddof=1) / 2)
  assert 'soap_h f=1' in ahead_of_muon.tables(section)


def test_a_rerun_reads_the_kept_runs(comparison):
  section, _, out = comparison
  calls = []
  def train(*args, **kwargs):
    calls.append(args)
    return synthetic_run(*args, **kwargs)
  again = ahead_of_muon.run(False, out, train=train,
                            cost=lambda sizes, quick: [])
  assert not calls
  assert again['best'].keys() == section['best'].keys()


def test_quick_part_runs_end_to_end(tmp_path):
  """At --quick size: every optimizer of the comparison builds and trains on
  seed 0, the best Muon and the leader on seed 1 too, and the step cost is
  measured."""
  result = subprocess.run(
      [sys.executable, str(SCRIPTS / 'experiments.py'), '--quick', '--parts',
       'ahead_of_muon', '--out', str(tmp_path)],
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  section = json.loads((tmp_path / 'results.json').read_text())[
      'ahead_of_muon']
  assert set(section['best']) == {'adamw', *ahead_of_muon.GRIDS}
  for name, summary in section['best'].items():
    assert all(math.isfinite(f) and f < 5.6 for f in summary['finals']), name
  judged = {n for n, s in section['best'].items() if len(s['finals']) == 2}
  assert judged == {'adamw', section['best_muon'], section['leader']}
  assert [(r['optimizer'], r['refresh']) for r in section['step_cost']] == [
      ('soap', refresh) for refresh in ahead_of_muon.COST_REFRESHES]
  assert 'Ahead of Muon' in (tmp_path / 'tables.md').read_text()
