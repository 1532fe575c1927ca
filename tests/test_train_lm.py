"""The main job, scripts/train_lm.py, in its reduced (--quick) size."""

import json
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


def test_quick_run_writes_table_plot_and_json(tmp_path):
  out = tmp_path / 'run'
  result = run('--quick', '--no-progress', '--optimizers', 'soap,adamw',
               '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'steps to AdamW final' in result.stdout
  assert (out / 'losses.png').stat().st_size > 10_000
  results = json.loads((out / 'results.json').read_text())
  assert [row['optimizer'] for row in results['table']] == ['soap', 'adamw']
  for row in results['table']:
    assert row['final_valid_loss'] < 5.545  # below uniform bytes, ln(256).
    assert row['wall_clock_s'] > 0 and row['optimizer_step_share'] > 0
  assert str(out / 'results.json') in result.stdout
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


def test_interrupted_and_resumed_run_reproduces_the_losses_bitwise(tmp_path):
  args = ('--quick', '--no-progress', '--optimizers', 'soap',
          '--checkpoint-every', '5')
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  assert run(*args, '--out', str(straight)).returncode == 0
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
