r"""Packed against padded batches on the default job's train step, in one process.

  .venv/bin/python scripts/bench/packing.py [--rounds=8] [--steps=20] [--pack_length=16]
  .venv/bin/python scripts/bench/packing.py --quick     # a smoke run (2 rounds of 2 steps)

Builds the default job as `scripts/train.py` does (configs/minilm_vader.py: MiniLM, all but the
word embeddings trained, AdamW), reads its first `--steps` training batches twice, padded
(`data.pack_length=0`: 32 x 8 tokens) and packed (rows of `--pack_length` tokens, as sized for
the run), compiles the train step for both layouts, then times `--rounds` rounds of `--steps`
steps of each, alternating, so that the machine's drift hits both. Prints the median seconds per
step of each layout, packed / padded, the token positions each computes on, and the largest
difference between the two layouts' logits on the first batch (dropout off: the same model
output, packed or not). Writes the figures as JSON to `--out`.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ftjax import configs, data, hub, optim, params, peft, steps, tasks  # noqa: E402


def default_job() -> dict:
  """The default job's pieces as `scripts/train.py` builds them (configs/minilm_vader.py: MiniLM,
  all but the word embeddings trained, AdamW): {'task', 'model', 'state', 'rest', 'train_step'
  (jitted, the state donated), 'batches': (count, pack_length) -> the first `count` training
  batches on the device, padded (0) or packed into rows of `pack_length` tokens}."""
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  task = tasks.get_task(config.task)
  dataset = data.build_dataset(config.data, task.name)
  model, _, checkpoint_dir = hub.load_model(
      config.model.checkpoint, task=task.name, num_labels=len(dataset.label_names),
      pooling=config.model.pooling, dtype=config.model.dtype,
      classifier_dropout=config.model.classifier_dropout, seed=config.seed)
  tokenizer = data.load_tokenizer(checkpoint_dir, config.data.max_length)

  def batches(count: int, pack_length: int) -> list[dict]:
    it = data.train_iterator(dataset, tokenizer, config.train.batch_size, config.seed,
                             pack_length=pack_length)
    return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(count)]

  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  tx, schedule = optim.make_optimizer(config.optim, 1000, groups)
  graphdef, trainable, rest = nnx.split(
      model, params.trainable_filter(params.trainable_paths(groups, 0)), ...)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=jax.jit(tx.init)(trainable), rng=jax.random.key(0))
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, task)
  return {'task': task, 'model': model, 'state': state, 'rest': rest, 'train_step': train_step,
          'batches': batches}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--pack_length', type=int, default=16)
  parser.add_argument('--quick', action='store_true', help='2 rounds of 2 steps')
  parser.add_argument('--out', default='workdirs/bench/packing.json')
  args = parser.parse_args()
  rounds, num_steps = (2, 2) if args.quick else (args.rounds, args.steps)

  job = default_job()
  task, model = job['task'], job['model']
  layouts = {'padded': 0, 'packed': args.pack_length}
  batches = {name: job['batches'](num_steps, pack_length) for name, pack_length in layouts.items()}

  # The same examples, either layout: one model output (dropout off).
  first = {name: task.forward(model, b[0], deterministic=True) for name, b in batches.items()}
  logits_diff = float(jnp.max(jnp.abs(first['packed'] - first['padded'])))

  state, rest, train_step = job['state'], job['rest'], job['train_step']
  for name in layouts:  # Compile both layouts (and warm up) before any timing.
    for batch in batches[name][:2]:
      state, metrics = train_step(state, batch, rest)
  jax.block_until_ready(metrics)
  times = {name: [] for name in layouts}
  for _ in range(rounds):
    for name in layouts:
      start = time.perf_counter()
      for batch in batches[name]:
        state, metrics = train_step(state, batch, rest)
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / num_steps)

  step_s = {name: statistics.median(t) for name, t in times.items()}
  result = {
      'step_s': step_s, 'rounds_s': times, 'ratio_packed_over_padded':
      step_s['packed'] / step_s['padded'],
      'positions': {name: int(np.prod(b[0]['input_ids'].shape)) for name, b in batches.items()},
      'shapes': {name: list(b[0]['input_ids'].shape) for name, b in batches.items()},
      'max_logits_difference': logits_diff, 'device': jax.devices()[0].device_kind,
      'rounds': rounds, 'steps': num_steps,
  }
  print('| layout | batch tokens | positions | s / step |')
  print('| --- | --- | --- | --- |')
  for name in layouts:
    rows, length = result['shapes'][name]
    print(f'| {name} | {rows} x {length} | {result["positions"][name]} | {step_s[name]:.4f} |')
  print(f'packed / padded: {result["ratio_packed_over_padded"]:.3f}; largest logit difference '
        f'{logits_diff:.2e}')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  main()
