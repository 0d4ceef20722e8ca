"""The constructor contract shared by all structured projection layers.

`Llama(config, dense_cls=cls)` builds every attention/MLP projection as
`cls(features, use_bias=..., dtype=..., param_dtype=..., kernel_init=...,
name=...)` and calls it on x of shape (..., m); the layer returns
y = x W (+ bias) of shape (..., n) with W an (m, n) matrix that each method
parameterises differently.  Method hyperparameters are further dataclass
fields, bound with `functools.partial`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def symmetric_uniform(bound: float) -> Initializer:
  """Initializer drawing U(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def precomputed(value: jax.Array | None, shape: tuple[int, ...],
                dtype: Any) -> Initializer:
  """Initializer returning a value computed at init (shared by several
  params of a layer).  Outside init Flax still calls initializers to check
  shapes; there `value` is None and zeros of the right shape stand in."""

  def init(_):
    if value is None:
      return jnp.zeros(shape, dtype)
    return jnp.asarray(value, dtype).reshape(shape)

  return init


class Projection(nn.Module):
  """Fields of the `dense_cls` contract; subclasses add their own."""

  features: int
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def add_bias(self, y: jax.Array) -> jax.Array:
    """y + bias when use_bias (bias of shape (n,) in param_dtype)."""
    if not self.use_bias:
      return y
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype)
    y, bias = nn.dtypes.promote_dtype(y, bias, dtype=self.dtype)
    return y + bias

  def check_rank(self, rank: int, m: int) -> None:
    """Raises a clear error for a rank a (m, features) block cannot have."""
    if not 1 <= rank <= min(m, self.features):
      raise ValueError(
          f"rank={rank} is invalid for the ({m}, {self.features}) block "
          f"'{'/'.join(self.scope.path)}': it must lie in [1, "
          f"{min(m, self.features)}].")
