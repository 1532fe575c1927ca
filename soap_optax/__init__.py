"""soap_optax: Shampoo-family optimizers as composable optax transformations."""

from soap_optax._aliases import factorized_soap
from soap_optax._aliases import AdamGraftState
from soap_optax._aliases import GraftingState
from soap_optax._aliases import scale_by_adam_graft
from soap_optax._aliases import scale_by_grafting
from soap_optax._aliases import shampoo
from soap_optax._aliases import soap
from soap_optax._diagnostics import diagnostics
from soap_optax._diagnostics import stack_names
from soap_optax._diagnostics import state_nbytes
from soap_optax._diagnostics import state_nbytes_per_device
from soap_optax._diagnostics import state_size
from soap_optax._refresh_policy import AdaptiveRefresh
from soap_optax._refresh_policy import FoamRefresh
from soap_optax._flax import dimension_numbers_from_axis_names
from soap_optax._sharding import state_shardings
from soap_optax._stacks import EigenbasisDimensionNumbers
from soap_optax._transforms import scale_by_adafactor_in_eigenbasis
from soap_optax._transforms import scale_by_rotated_adam
from soap_optax._transforms import scale_by_shampoo_eigenbasis
from soap_optax._transforms import ScaleByAdafactorInEigenbasisState
from soap_optax._transforms import ScaleByRotatedAdamState
from soap_optax._transforms import ScaleByShampooEigenbasisState

__all__ = (
    'AdaptiveRefresh',
    'EigenbasisDimensionNumbers',
    'FoamRefresh',
    'GraftingState',
    'ScaleByAdafactorInEigenbasisState',
    'ScaleByRotatedAdamState',
    'ScaleByShampooEigenbasisState',
    'diagnostics',
    'dimension_numbers_from_axis_names',
    'factorized_soap',
    'scale_by_adafactor_in_eigenbasis',
    'scale_by_grafting',
    'scale_by_rotated_adam',
    'scale_by_shampoo_eigenbasis',
    'shampoo',
    'soap',
    'stack_names',
    'state_nbytes',
    'state_nbytes_per_device',
    'state_shardings',
    'state_size',
)

__version__ = '0.1.0'
