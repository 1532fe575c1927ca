"""The language model's configuration and its corpus, without JAX.

``Config`` holds everything that determines the losses of a run of the byte
-level language model (``lm.py``); the optimizer names, their default rates
and SOAP's tuned settings are the main job's choices (``train_lm.py``) and the
experiments' starting points. The corpus is read and split here too, so that
the main job reports bad arguments and bad text files before JAX starts.
"""

import dataclasses
import glob
import os
import pathlib
import sysconfig

import numpy as np

import optimizers
from common import UsageError

# The main job's optimizers (names of optimizers.OPTIMIZERS, in the order its
# help lists them, the library's best rule on the main job first): every one
# but the benchmark's 'soap_one_sided' (the main job's --one-sided makes its
# eigenbasis optimizers one-sided).
OPTIMIZERS = optimizers.check_names(
    ('soap_muon', 'adamw', 'muon', 'soap', 'soap_h', 'kl_soap_h', 'kl_soap',
     'muon_hyperball', 'muon_all_matrices', 'muon_shared_lr', 'shampoo',
     'factorized_soap', 'kl_shampoo',
     # For the numerics comparisons (BENCHMARKS.md section 7):
     'soap_no_floor', 'shampoo_ungrafted'))

# Learning rates used when none is given: 3e-3, SOAP's default, for every
# optimizer but Muon; for adamw, soap and muon_shared_lr it is also the best
# of the grid {1e-3, 3e-3, 1e-2, 3e-2} on the default model, and 3e-2 is
# muon's best of {3e-3, 1e-2, 3e-2, 1e-1} (docs/choosing_and_tuning.md).
# --lr-grid sweeps a grid instead.
DEFAULT_LEARNING_RATES = {
    'adamw': 3e-3,
    'muon': 1e-2,
    'muon_all_matrices': 3e-2,
    'muon_shared_lr': 3e-3,
    'kl_shampoo': 3e-3,
    'kl_soap': 3e-3,
    'soap': 3e-3,
    'shampoo': 3e-3,
    'factorized_soap': 3e-3,
    'soap_no_floor': 3e-3,
    'shampoo_ungrafted': 3e-3,
    # The best of seed 0's grid in `experiments.py --parts ahead_of_muon`
    # (Hyperball's rate is a step's length relative to the matrix's norm).
    'muon_hyperball': 1e-2,
    'soap_h': 1e-2,
    'kl_soap_h': 1e-2,
    'soap_muon': 3e-2,
}


# The rate of the Adam part of 'muon', and of the AdamW part of the
# eigenbasis optimizers under --soap-params matrices/hidden: the best of
# {3e-3, 1e-2} for muon and kl_shampoo, level for soap and kl_soap
# (`python scripts/experiments.py --parts kl_vs_muon`), a rung above AdamW's
# own best rate.
ADAM_PART_LEARNING_RATE = 1e-2

SCHEDULES = ('constant', 'cosine')
# Which parameters the eigenbasis optimizers (soap, factorized_soap, shampoo)
# handle; the others go to AdamW (optax.partition):
#   all      -- every parameter (vectors get the transforms' unrotated Adam);
#   matrices -- every weight matrix (or 3-D attention kernel), the vectors
#               (biases, norm scales) to AdamW;
#   hidden   -- the matrices of the transformer blocks only; the embedding,
#               the position table, the output head and the vectors to AdamW.
SOAP_PARAMS = ('all', 'matrices', 'hidden')
# The main job's defaults for the eigenbasis optimizers: the best SOAP
# configuration of `python scripts/experiments.py --parts soap_vs_muon` on
# this model (docs/choosing_and_tuning.md): a refresh every 2 steps,
# b2 = shampoo_beta = 0.9, SOAP on the blocks' matrices and AdamW on the
# rest, constant rate 3e-3. (Config's own defaults are the library's.)
TUNED_SOAP = dict(precondition_frequency=2, soap_b2=0.9, soap_params='hidden')
EIGENBASIS_OPTIMIZERS = tuple(name for name in OPTIMIZERS
                              if name in optimizers.EIGENBASIS)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines the losses of a run (resume checks it)."""

  optimizers: tuple[str, ...]
  learning_rates: tuple[float, ...]
  steps: int
  batch_size: int
  seq_len: int
  d_model: int
  num_layers: int
  num_heads: int
  eval_every: int
  eval_batches: int
  weight_decay: float
  precondition_frequency: int | str
  seed: int
  corpus: str
  # Learning-rate schedule of every optimizer: 'constant' (after a linear
  # warmup of warmup_steps from 0) or 'cosine' (the same warmup, then a
  # cosine decay to a tenth of the peak at the last step).
  schedule: str = 'constant'
  warmup_steps: int = 0
  # Decay of the second moment and of the Kronecker factors of the
  # eigenbasis optimizers (soap's b2 = shampoo_beta; shampoo's shampoo_beta).
  soap_b2: float = 0.95
  soap_params: str = 'all'
  one_sided: bool = False
  # The rate of Muon's Adam part and of the eigenbasis optimizers' AdamW part
  # (soap_params 'matrices'/'hidden').
  adam_lr: float = ADAM_PART_LEARNING_RATE


def default_warmup_steps(schedule: str, steps: int) -> int:
  """--warmup-steps when not given: 10% of the steps for 'cosine', none for
  'constant'."""
  return steps // 10 if schedule == 'cosine' else 0


def load_corpus(text_file: str | None) -> bytes:
  """The training bytes: ``text_file``, or the standard library's sources."""
  if text_file is None:
    stdlib = sysconfig.get_paths()['stdlib']
    files = sorted(glob.glob(os.path.join(stdlib, '*.py')))
    data = b''.join(pathlib.Path(f).read_bytes() for f in files)
    if not data:
      raise UsageError(f'no Python sources found under {stdlib}; '
                       'use --text-file')
    return data
  path = pathlib.Path(text_file)
  if not path.exists():
    raise UsageError(f'--text-file: {text_file} does not exist')
  if not path.is_file():
    raise UsageError(f'--text-file: {text_file} is not a file')
  try:
    data = path.read_bytes()
  except OSError as e:
    raise UsageError(f'--text-file: cannot read {text_file}: '
                     f'{e.strerror}') from None
  if not data:
    raise UsageError(f'--text-file: {text_file} is empty')
  return data


def split_corpus(data: bytes, seq_len: int):
  """90% / 10% train / validation split, as uint8 arrays."""
  tokens = np.frombuffer(data, dtype=np.uint8)
  split = int(0.9 * len(tokens))
  train, valid = tokens[:split], tokens[split:]
  if min(len(train), len(valid)) <= seq_len + 1:
    raise UsageError(
        f'the corpus ({len(tokens)} bytes) is too small for --seq-len '
        f'{seq_len}: each split needs more than {seq_len + 1} bytes')
  return train, valid


