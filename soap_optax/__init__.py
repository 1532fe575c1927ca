"""soap_optax: Shampoo-family optimizers as composable optax transformations."""

from soap_optax._adafactor import scale_by_adafactor_in_eigenbasis
from soap_optax._adafactor import ScaleByAdafactorInEigenbasisState
from soap_optax._aliases import factorized_soap
from soap_optax._aliases import kl_shampoo
from soap_optax._aliases import kl_soap_h
from soap_optax._aliases import shampoo
from soap_optax._aliases import soap
from soap_optax._aliases import soap_h
from soap_optax._aliases import soap_muon
from soap_optax._diagnostics import diagnostics
from soap_optax._diagnostics import stack_names
from soap_optax._diagnostics import state_nbytes
from soap_optax._diagnostics import state_nbytes_per_device
from soap_optax._diagnostics import state_size
from soap_optax._dimension_numbers import EigenbasisDimensionNumbers
from soap_optax._flax import dimension_numbers_from_axis_names
from soap_optax._grafting import AdamGraftState
from soap_optax._grafting import GraftingState
from soap_optax._grafting import scale_by_adam_graft
from soap_optax._grafting import scale_by_grafting
from soap_optax._hyperball import hyperball
from soap_optax._hyperball import HyperballState
from soap_optax._kl_shampoo import scale_by_kl_shampoo
from soap_optax._kl_shampoo import ScaleByKLShampooState
from soap_optax._refresh import AdaptiveRefresh
from soap_optax._refresh import FoamRefresh
from soap_optax._rotated_adam import scale_by_rotated_adam
from soap_optax._rotated_adam import ScaleByRotatedAdamKLState
from soap_optax._rotated_adam import ScaleByRotatedAdamState
from soap_optax._shampoo import scale_by_shampoo_eigenbasis
from soap_optax._shampoo import ScaleByShampooEigenbasisState
from soap_optax._soap_muon import scale_by_soap_muon
from soap_optax._soap_muon import ScaleBySoapMuonState
from soap_optax._sharding import parameter_shardings
from soap_optax._sharding import portable_state
from soap_optax._sharding import reshard_state
from soap_optax._sharding import state_shardings
from soap_optax._upgrade import upgrade_state

__all__ = (
    'AdamGraftState',
    'AdaptiveRefresh',
    'EigenbasisDimensionNumbers',
    'FoamRefresh',
    'GraftingState',
    'HyperballState',
    'ScaleByAdafactorInEigenbasisState',
    'ScaleByKLShampooState',
    'ScaleByRotatedAdamKLState',
    'ScaleByRotatedAdamState',
    'ScaleByShampooEigenbasisState',
    'ScaleBySoapMuonState',
    'diagnostics',
    'dimension_numbers_from_axis_names',
    'factorized_soap',
    'hyperball',
    'kl_shampoo',
    'kl_soap_h',
    'scale_by_adafactor_in_eigenbasis',
    'scale_by_adam_graft',
    'scale_by_grafting',
    'scale_by_kl_shampoo',
    'scale_by_rotated_adam',
    'scale_by_shampoo_eigenbasis',
    'scale_by_soap_muon',
    'parameter_shardings',
    'portable_state',
    'reshard_state',
    'shampoo',
    'soap',
    'soap_h',
    'soap_muon',
    'stack_names',
    'state_nbytes',
    'state_nbytes_per_device',
    'state_shardings',
    'state_size',
    'upgrade_state',
)

__version__ = '0.2.0'
