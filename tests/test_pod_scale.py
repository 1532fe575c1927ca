"""scripts/pod_scale.py at its --quick size: the compiled sharded update.

One subprocess with 16 fake CPU devices compiles SOAP's sharded update for a
small scanned Llama-style model (without blocks and with ``block_size=512``)
ahead of time, its parameters laid out by ``soap_optax.parameter_shardings``;
nothing is allocated. The tests read the partitioned program: which
collectives it holds and how large they are, its temporary memory, the state
and refresh work per device. Goals that the layout does not reach at this
size stay expected failures (``raises=AssertionError``), with the measured
value in the reason (and in BENCHMARKS.md section 12).
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'scripts' / (
    'pod_scale.py')


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
  out = tmp_path_factory.mktemp('pod') / 'rows.json'
  result = subprocess.run(
      [sys.executable, str(SCRIPT), '--quick', '--out', str(out)],
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert '| model | devices |' in result.stdout
  return {row['block_size']: row for row in json.loads(out.read_text())}


def _quick_params():
  sys.path.insert(0, str(SCRIPT.parent))
  try:
    import pod_scale  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return pod_scale.llama_shapes(**pod_scale.MODELS['quick'], scanned=True)


def test_adamw_state_counted_independently(rows):
  """AdamW's state from its definition: mu and nu, float32, every quick
  parameter divided over 16 devices, and a replicated int32 count (the
  script reads it from the shardings; here it is computed from the
  shapes)."""
  shapes = _quick_params()
  total = sum(math.prod(s) for s in shapes.values())
  assert all(any(n % 16 == 0 for n in s) for s in shapes.values())
  for row in rows.values():
    assert row['adamw']['state'] == 2 * 4 * total / 16 + 4


@pytest.mark.parametrize('block_size', [None, 512])
def test_the_update_moves_gradients_by_all_to_all_only(rows, block_size):
  """The compiled update holds one all-to-all in and one out (every
  stack's parts travel in one buffer), all-reduces of a few scalars, and no
  all-gather, collective-permute or reduce-scatter: no parameter or
  gradient is gathered."""
  soap = rows[block_size]['soap']
  found = soap['collectives']
  assert found['all-gather']['count'] == 0, found
  assert found['collective-permute']['count'] == 0, found
  assert found['reduce-scatter']['count'] == 0, found
  assert found['all-to-all']['count'] == 2, found
  assert found['all-reduce']['largest'] <= 64, found


def test_blocks_bound_the_collectives_and_the_refresh_work(rows):
  """With blocks (the goal configuration): no collective larger than 2x a
  device's parameter bytes and the busiest device's refresh work within
  1.15x of its even share."""
  row = rows[512]
  soap = row['soap']
  assert soap['largest_collective'] <= 2 * row['param_bytes_per_device']
  assert soap['refresh_device'] <= 1.15 * soap['refresh_ideal']


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    'issue 29 goal (2.2x) not met on this model with size buckets: 2.29x '
    '(2.19x with bucket_padding=None). Its (512, 384) and (384, 512) blocks '
    'share one stack of 12 units, one slot a device, so two devices must '
    'also hold five 512 x 512 blocks (at most 5 a device) and the widest '
    'pair of the exchange grows by 4096 entries; the 1 B goal '
    'configurations move the same bytes with and without buckets '
    '(BENCHMARKS.md, section 12)'))
def test_bytes_moved_are_at_most_twice_and_a_tenth_the_parameters(rows):
  row = rows[512]
  assert row['soap']['moved'] <= 2.2 * row['param_bytes_per_device']


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    'issue 29 goal not met: a stack whose units are not a multiple of the '
    'devices costs every device a full slot (measured with size buckets '
    '1.28x with blocks, 6.24x without; 1.57x and 12.41x before them)'))
@pytest.mark.parametrize('block_size, bound', [(512, 1.10), (None, 1.5)])
def test_state_per_device_is_close_to_an_even_share(rows, block_size, bound):
  soap = rows[block_size]['soap']
  assert soap['state'] <= bound * soap['ideal']


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    'issue 29 goal not met: the update\'s temporaries (the exchange\'s '
    'buffers, the rule\'s rotated gradients and moments) measured 1.40x '
    'the state with blocks and buckets (54 MiB; 63 MiB, 1.33x, before '
    'buckets shrank the state; the unsharded update needs 1.25x its own)'))
def test_temporary_memory_is_at_most_the_state(rows):
  soap = rows[512]['soap']
  assert soap['temp'] <= soap['state']
