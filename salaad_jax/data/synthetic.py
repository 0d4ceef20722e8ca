"""A seeded Markov-chain language whose entropy rate is known in closed form.

The corpus is an order-``k`` Markov chain over an alphabet of ``A`` printable
ASCII symbols, emitted as byte ids (so :class:`ByteTokenizer` decodes it and
models use the byte vocabulary of 256). For every context
``c = (x_{t-k}, ..., x_{t-1})`` the next-symbol law is

    P(x | c) = (1 - eps) * sum_j w_{c,j} [x = s_{c,j}] + eps / A,

with ``branching`` distinct successors ``s_{c,j}`` drawn uniformly and
weights ``w_c ~ Dirichlet(concentration)``. The ``eps`` term makes the chain
irreducible and aperiodic, so the context chain has a unique stationary law
``pi`` (computed by power iteration to ``1e-14`` in l1). The entropy rate is

    H = sum_c pi(c) * H(P(. | c))          (nats per token),

the loss of the Bayes-optimal predictor that sees ``k`` tokens of context.
Each sampled sequence starts from ``pi`` and is therefore stationary; the
first ``k - 1`` predictions see less context and cost
``H(X_j | X_{<j}) = H(X_{0..j}) - H(X_{0..j-1})``; :meth:`loss_floor`
averages these exactly over a window.
"""

from __future__ import annotations

import string

import numpy as np

ALPHABET = (string.ascii_lowercase + ' ' + string.ascii_uppercase +
            string.digits + string.punctuation)
"""The 95 printable ASCII symbols; symbol ``i`` is the byte ``ALPHABET[i]``."""

_MAX_CONTEXTS = 1 << 20


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
  """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
  logp = np.log(np.where(p > 0, p, 1.0))
  return -(p * logp).sum(axis=axis)


class SyntheticMarkovCorpus:
  """An order-``k`` Markov chain over printable symbols, fully determined by
  its constructor arguments.

  Attributes:
    alphabet_size: number of symbols ``A`` (at most 95).
    order: context length ``k``.
    transition: float64 ``[A**k, A]``, row ``c`` is ``P(. | c)``; context index
      ``c = sum_i x_{t-k+i} A**(k-1-i)`` (most recent symbol least significant).
    stationary: float64 ``[A**k]``, the stationary law ``pi`` of contexts.
    entropy_rate: ``H`` in nats per token.
    token_ids: int32 ``[A]``, the byte id of each symbol.
  """

  def __init__(self, alphabet_size: int = 32, order: int = 2,
               branching: int = 4, concentration: float = 1.0,
               smoothing: float = 0.02, seed: int = 0):
    if not 2 <= alphabet_size <= len(ALPHABET):
      raise ValueError(
          f'alphabet_size must lie in [2, {len(ALPHABET)}], got {alphabet_size}')
    if order < 1 or alphabet_size ** order > _MAX_CONTEXTS:
      raise ValueError(
          f'order must be >= 1 with alphabet_size**order <= {_MAX_CONTEXTS}, '
          f'got order={order}, alphabet_size={alphabet_size}')
    if not 1 <= branching <= alphabet_size:
      raise ValueError(
          f'branching must lie in [1, alphabet_size={alphabet_size}], '
          f'got {branching}')
    if not 0 < smoothing <= 1:
      raise ValueError(f'smoothing must lie in (0, 1], got {smoothing}')
    if concentration <= 0:
      raise ValueError(f'concentration must be > 0, got {concentration}')
    self.alphabet_size = a = int(alphabet_size)
    self.order = k = int(order)
    self.branching = int(branching)
    self.concentration = float(concentration)
    self.smoothing = float(smoothing)
    self.seed = int(seed)
    self.num_contexts = n = a ** k

    rng = np.random.default_rng([self.seed, 0x5A1AAD])
    successors = np.argsort(rng.random((n, a)), axis=1)[:, :branching]
    weights = rng.dirichlet(np.full(branching, self.concentration), size=n)
    sparse = np.zeros((n, a))
    np.put_along_axis(sparse, successors, weights, axis=1)
    self.transition = (1.0 - smoothing) * sparse + smoothing / a
    self.transition /= self.transition.sum(axis=1, keepdims=True)
    self._cdf = np.cumsum(self.transition, axis=1)
    self._cdf[:, -1] = 1.0
    self._log_transition = np.log(self.transition)

    self.stationary = self._stationary()
    self._stationary_cdf = np.cumsum(self.stationary)
    self._stationary_cdf[-1] = 1.0
    self.entropy_rate = float(self.stationary @ _entropy(self.transition))
    # Entropies of the first j symbols, H(X_0..X_{j-1}), j = 0..k.
    self._prefix_entropy = [0.0] + [
        float(_entropy(self._prefix_marginal(j))) for j in range(1, k + 1)]
    self.token_ids = np.frombuffer(
        ALPHABET[:a].encode('ascii'), dtype=np.uint8).astype(np.int32)

  def _stationary(self, tol: float = 1e-14, max_iter: int = 200_000):
    """Power iteration pi <- pi T on the context chain."""
    a, n = self.alphabet_size, self.num_contexts
    p = self.transition.reshape(a, n // a, a)
    pi = np.full(n, 1.0 / n)
    for _ in range(max_iter):
      new = np.einsum('ar,arc->rc', pi.reshape(a, n // a), p).reshape(n)
      new /= new.sum()
      if np.abs(new - pi).sum() < tol:
        return new
      pi = new
    raise RuntimeError(  # Unreachable for smoothing > 0 in practice.
        f'stationary distribution did not converge in {max_iter} iterations')

  def _prefix_marginal(self, j: int) -> np.ndarray:
    """Law of the first ``j`` symbols (j <= order) of a stationary sequence."""
    a, k = self.alphabet_size, self.order
    return self.stationary.reshape(a ** j, a ** (k - j)).sum(axis=1)

  def conditional_entropies(self, length: int) -> np.ndarray:
    """``H(X_j | X_0..X_{j-1})`` for ``j = 0..length-1``, in nats."""
    k = self.order
    h = np.full(length, self.entropy_rate)
    for j in range(min(k, length)):
      h[j] = self._prefix_entropy[j + 1] - self._prefix_entropy[j]
    return h

  def loss_floor(self, seq_len: int) -> float:
    """Bayes-optimal mean next-token loss over a window of ``seq_len`` targets.

    Targets are ``x_1..x_T`` given ``x_0..x_{j-1}``; this is the average of
    :meth:`conditional_entropies` over ``j = 1..T``. It approaches
    ``entropy_rate`` as ``T`` grows (the gap is ``O(order / T)``).
    """
    return float(self.conditional_entropies(seq_len + 1)[1:].mean())

  def sample_from_uniforms(self, u: np.ndarray) -> np.ndarray:
    """Sequences driven by uniforms ``u`` in ``[0, 1)`` of shape ``[N, L]``.

    The first ``order`` symbols are drawn jointly from ``pi`` using
    ``u[:, 0]``; symbol ``j >= order`` is the inverse-CDF draw of ``u[:, j]``
    from ``P(. | context)``. Returns int32 byte ids ``[N, L]``.
    """
    u = np.asarray(u, dtype=np.float64)
    num, length = u.shape
    a, k, n = self.alphabet_size, self.order, self.num_contexts
    sym = np.empty((num, length), dtype=np.int64)
    ctx = np.minimum(
        np.searchsorted(self._stationary_cdf, u[:, 0], side='right'), n - 1)
    for j in range(min(k, length)):
      sym[:, j] = (ctx // a ** (k - 1 - j)) % a
    for j in range(k, length):
      x = (u[:, j, None] >= self._cdf[ctx]).sum(axis=1)
      sym[:, j] = x = np.minimum(x, a - 1)
      ctx = (ctx * a + x) % n
    return self.token_ids[sym]

  def sample(self, num_sequences: int, length: int, seed: int = 0):
    """``num_sequences`` stationary sequences of ``length`` byte ids."""
    rng = np.random.default_rng([self.seed, int(seed)])
    return self.sample_from_uniforms(rng.random((num_sequences, length)))

  def log_probs(self, tokens: np.ndarray) -> np.ndarray:
    """``log P(x_j | x_0..x_{j-1})`` under the true model, shape of ``tokens``.

    ``tokens`` are byte ids produced by this corpus, each row one sequence
    that starts in the stationary law.
    """
    tokens = np.asarray(tokens)
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[self.token_ids] = np.arange(self.alphabet_size)
    sym = lookup[tokens]
    if (sym < 0).any():
      raise ValueError('tokens contain ids outside this corpus alphabet')
    a, k, n = self.alphabet_size, self.order, self.num_contexts
    out = np.empty(sym.shape, dtype=np.float64)
    prefix = np.zeros(sym.shape[0], dtype=np.int64)
    prev = np.zeros(sym.shape[0])
    for j in range(min(k, sym.shape[1])):
      prefix = prefix * a + sym[:, j]
      logm = np.log(self._prefix_marginal(j + 1)[prefix])
      out[:, j] = logm - prev
      prev = logm
    ctx = prefix
    for j in range(k, sym.shape[1]):
      out[:, j] = self._log_transition[ctx, sym[:, j]]
      ctx = (ctx * a + sym[:, j]) % n
    return out

  def __repr__(self) -> str:
    return (f'SyntheticMarkovCorpus(alphabet_size={self.alphabet_size}, '
            f'order={self.order}, branching={self.branching}, '
            f'concentration={self.concentration}, smoothing={self.smoothing}, '
            f'seed={self.seed})')
