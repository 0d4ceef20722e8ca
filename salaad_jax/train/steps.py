"""Pure step functions: the training step (with gradient accumulation) and the
masked evaluation sums.  The executors jit or pmap them."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from salaad_jax.models import cross_entropy_loss
from salaad_jax.train.state import TrainState, join_constants, split_constants


def loss_fn(model, params, batch, constants=None):
  """Mean next-token cross-entropy over the masked targets, and the token count.

  ``params`` is a trainable params tree (then ``constants`` holds the
  model's constant collections, if any) or a ``TrainState.params`` variables
  dict holding both."""
  params, inner = split_constants(params)
  logits = model.apply({"params": params, **inner, **(constants or {})}, batch["inputs"])
  return cross_entropy_loss(logits, batch["targets"], batch["mask"])


def _grads(model, params, constants, batch, grad_accum: int):
  """(mean loss, grads w.r.t. the trainable ``params``): one pass, or the mean
  over ``grad_accum`` micro-batches (row i goes to micro-batch i mod
  grad_accum, so the batch sharding is kept)."""
  grad_fn = jax.value_and_grad(lambda p, b: loss_fn(model, p, b, constants)[0])
  if grad_accum == 1:
    return grad_fn(params, batch)

  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def body(carry, micro):
    loss_sum, grad_sum = carry
    loss, grads = grad_fn(params, micro)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                         jax.tree.map(split, batch))
  grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grad_sum, params)
  return loss_sum / grad_accum, grads


def train_step(model, tx: optax.GradientTransformation, state: TrainState, batch, *,
               grad_accum: int = 1, axis_name: Optional[str] = None):
  """One optimisation step.  Returns (new state, {'loss', 'grad_norm'}).

  A ``tx`` that takes extra arguments gets ``grad_fn``: params -> the
  gradients of this step's loss (same batch, accumulation and pmean) at
  other params; it costs a pass only when called (SALAAD's joint cut loss).

  With ``axis_name`` (pmap), loss and gradients are averaged over that axis.
  Constant collections in ``state.params`` pass through unchanged.
  """
  trainable, constants = split_constants(state.params)
  loss, grads = _grads(model, trainable, constants, batch, grad_accum)
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  extra = {}
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    def grad_fn(params):  # the gradients of this step's loss at other params
      g = _grads(model, params, constants, batch, grad_accum)[1]
      return g if axis_name is None else jax.lax.pmean(g, axis_name)
    extra["grad_fn"] = grad_fn
  updates, opt_state = tx.update(grads, state.opt_state, trainable, **extra)
  trainable = optax.apply_updates(trainable, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(state.step + 1, join_constants(trainable, constants), opt_state), metrics


def eval_sums(model, params, batch):
  """(sum of masked token losses, number of masked tokens), float32; ``params``
  as in :func:`loss_fn` (a variables dict carries its constants)."""
  loss, count = loss_fn(model, params, batch)
  return loss * count, count
