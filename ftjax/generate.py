"""Text generation for causal decoders: greedy or temperature/top-p sampling with a KV cache.

The whole generation is one jitted function: the prompt fills the cache in one pass (prefill),
then a `lax.while_loop` feeds one token per iteration through the same compiled decode step
until every sequence has emitted EOS or `max_new_tokens` are out. Prompts are left-padded to a
bucketed length, so a handful of compilations serve prompts of any length.

  model, report, directory = hub.load_model(checkpoint, task='causal_lm')
  texts = generate.complete(model, tokenizer, ['Once upon a time'], max_new_tokens=32)
"""

import functools
from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from ftjax import tasks
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import FtjaxError

_BUCKET = 16  # Prompt lengths round up to a multiple of this: one compilation per bucket.


def _sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float):
  """Greedy (temperature 0) or nucleus sampling from the last position's logits."""
  if temperature == 0.0:
    # The block search of `tasks.argmax`: XLA:CPU's argmax over a 32000-token vocabulary is a
    # variadic reduction it does not vectorise (the same first-maximum index).
    return tasks.argmax(logits_BxV).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    # Keep the smallest set of most likely tokens whose probability reaches top_p.
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BxV, cutoff_index, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'temperature',
                                             'top_p', 'eos_id', 'pad_id'))
def _generate(state, ids_BxP, mask_BxP, key, *, graphdef, max_new_tokens: int,
              temperature: float, top_p: float, eos_id: int, pad_id: int):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = ids_BxP.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  # A left-padded prompt's first real token is position 0, as transformers' generate counts.
  positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
  logits, cache = model(ids_BxP, mask_BxP, positions=positions_BxP, cache=cache)
  first = _sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
  out_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done_B = first == eos_id
  next_pos_B = positions_BxP[:, -1] + 1

  def cond(carry):
    step, _, _, done_B, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    step, token_B, cache, done_B, pos_B, out_BxN = carry
    logits, cache = model(token_B[:, None], jnp.ones((batch, 1), jnp.int32),
                          positions=pos_B[:, None], cache=cache)
    token_B = _sample(logits[:, -1], jax.random.fold_in(key, step), temperature, top_p)
    token_B = jnp.where(done_B, pad_id, token_B)  # Finished sequences emit padding.
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
    return step + 1, token_B, cache, done_B | (token_B == eos_id), pos_B + 1, out_BxN

  carry = (jnp.asarray(1, jnp.int32), first, cache, done_B, next_pos_B, out_BxN)
  return jax.lax.while_loop(cond, body, carry)[-1]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             pad_id: int = 0, seed: int = 0) -> list[list[int]]:
  """Continues each prompt (token ids) with up to `max_new_tokens` tokens.

  Args:
    model: a `heads.CausalLM` (e.g. from `hub.load_model(..., task='causal_lm')`).
    prompts: token ids per prompt (lengths may differ; they are left-padded together).
    max_new_tokens: tokens to generate at most per prompt.
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_p: nucleus sampling: sample among the most likely tokens holding this much probability.
    eos_id: generation of a sequence stops after this token (None: never stops early).
    pad_id: the id used to left-pad prompts (masked out, so any id works).
    seed: fixes the sampling randomness.

  Returns:
    The new tokens of each prompt, cut after its EOS (which is kept).

  Raises:
    FtjaxError: for an empty prompt, bad sampling settings, or a model that is not a causal LM.
  """
  if not hasattr(model, 'init_cache'):
    raise FtjaxError(f'generation needs a causal LM (task causal_lm), not {type(model).__name__}')
  if max_new_tokens < 1:
    raise FtjaxError(f'max_new_tokens must be at least 1, got {max_new_tokens}')
  if temperature < 0 or not 0 < top_p <= 1:
    raise FtjaxError(f'need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}')
  if not prompts or any(len(p) == 0 for p in prompts):
    raise FtjaxError('every prompt needs at least one token')
  length = -(-max(len(p) for p in prompts) // _BUCKET) * _BUCKET
  limit = getattr(model.encoder.config, 'max_position_embeddings', None) or \
      getattr(model.encoder.config, 'n_positions', None)
  if limit is not None and length + max_new_tokens > limit:
    length = max(len(p) for p in prompts)  # Unbucketed, in case that fits.
    if length + max_new_tokens > limit:
      raise FtjaxError(f'prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
                       f'the model\'s {limit} positions: shorten one of them')
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = 1
  graphdef, state = nnx.split(model)
  out = np.asarray(_generate(state, ids, mask, jax.random.key(seed), graphdef=graphdef,
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_p=float(top_p), eos_id=-1 if eos_id is None else eos_id,
                             pad_id=pad_id))
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return results


def complete(model: nnx.Module, tokenizer: tokenizers.Tokenizer, texts: Sequence[str], *,
             eos_id: int | None = None, **kwargs) -> list[str]:
  """`generate` on text: tokenizes each prompt (with special tokens), decodes what follows."""
  raw = tokenizer_lib.unpadded(tokenizer)
  pad_id = tokenizer.padding['pad_id'] if tokenizer.padding else 0
  prompts = [raw.encode(text).ids for text in texts]
  new = generate(model, prompts, eos_id=eos_id, pad_id=pad_id, **kwargs)
  return [raw.decode(ids, skip_special_tokens=True) for ids in new]
