"""soap_optax: Shampoo-family optimizers as composable optax transformations."""

from soap_optax._aliases import soap
from soap_optax._transforms import scale_by_rotated_adam
from soap_optax._transforms import ScaleByRotatedAdamState

__all__ = (
    'ScaleByRotatedAdamState',
    'scale_by_rotated_adam',
    'soap',
)

__version__ = '0.1.0'
