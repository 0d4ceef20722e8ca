r"""What a call of ``models.generate`` costs, compiled (as it now runs) against
the same computation run uncompiled (as it ran before: the prompt's forward
dispatched op by op, the decoding loop traced again on every call).

    python -m benchmarks.generate_time --models=tiny,small --new_tokens=48 --repeats=5

For each model (random init weights, float32, a batch of 2 prompts of 16
tokens, greedy): the first call (compilation included) and the median of
``--repeats`` later calls with another key each, for both paths, the ratio
uncompiled / compiled measured in the same run, and whether both give the
same tokens.
"""

from __future__ import annotations

import statistics

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax.models import Llama, generate, get_config, init_params
from salaad_jax.models import llama, timing

_MODELS = flags.DEFINE_list("models", ["tiny", "small"], "model presets")
_NEW = flags.DEFINE_integer("new_tokens", 48, "tokens generated per call")
_PROMPT = flags.DEFINE_integer("prompt", 16, "prompt tokens")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls after the first")


def _time(run) -> tuple[float, float, np.ndarray]:
  """(first call s, median later call s, tokens of a call with key 0)."""
  first = timing.time_call(lambda: run(0))
  later = [timing.time_call(lambda k=k: run(k)) for k in range(1, _REPEATS.value + 1)]
  return first, statistics.median(later), np.asarray(run(0))


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{_PROMPT.value}-token prompts x 2, {_NEW.value} new tokens, greedy, "
        f"median of {_REPEATS.value} later calls")
  print("| model | uncompiled first (s) | compiled first (s) | uncompiled later (s) | "
        "compiled later (s) | later: uncompiled / compiled | same tokens |")
  print("|---|---:|---:|---:|---:|---:|---|")
  jax.block_until_ready(jnp.ones(2) + 1)  # the process's first dispatch, timed by neither path
  for name in _MODELS.value:
    cfg = get_config(name, max_len=_PROMPT.value + _NEW.value, dtype="float32")
    model, params = Llama(cfg), init_params(cfg, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (2, _PROMPT.value), 0, cfg.vocab_size,
                                dtype=jnp.int32)
    call = lambda fn: lambda k: fn(model, params, prompt, _NEW.value, jax.random.key(k), 0.0)
    eager, compiled = _time(call(llama._generate)), _time(call(generate))
    same = bool(np.array_equal(eager[2], compiled[2]))
    print(f"| {name} | {eager[0]:.2f} | {compiled[0]:.2f} | {eager[1]:.3f} | "
          f"{compiled[1]:.3f} | {eager[1] / compiled[1]:.0f}x | {'yes' if same else 'NO'} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
