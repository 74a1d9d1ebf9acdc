"""Steering methods, registered by name. Importing this package registers them, in the order in
which a row that combines several (``"tita+fisao"``) applies them."""

from decoding.methods.base import (REGISTRY, Resources, SteeringFailed, SteeringMethod, register, resolve, strength_of,
                                   usable_methods)
from decoding.methods import tita, fisao, vcd  # noqa: F401,E402  (registration order = application order)

__all__ = ["REGISTRY", "Resources", "SteeringFailed", "SteeringMethod", "register", "resolve", "strength_of",
           "usable_methods"]
