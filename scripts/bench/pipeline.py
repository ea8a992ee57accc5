r"""Input pipeline against train step: how many batches per second each delivers or consumes.

  .venv/bin/python scripts/bench/pipeline.py [--config=configs/minilm_vader.py] \
      [--batches=200 --steps=10 --out=workdirs/bench/pipeline.json] [--config.KEY=VALUE ...]
  .venv/bin/python scripts/bench/pipeline.py --quick        # a seconds-long smoke run

Everything is built as `ftjax.train.train_and_evaluate` builds it, from the config (default: the
default job, batch 32 x 8 tokens): the dataset (`data.build_dataset`), the model, PEFT surgery
and parameter policy (`train._build_model`), the tokenizer, the optimizer and its schedule over
the run's total steps, the train state in its shardings on the config's mesh, and the train
iterator (`data.train_iterator`: grain shuffle -> batch -> read + tokenize (+ pack), with the
config's `data.num_workers`, length buckets and packing). Then, in one process:

  pipeline    after `--warmup_batches` batches, the time to pull `--batches` more, each as the
              loop takes it: `next(train_iter)` (host numpy) then `parallel.global_batch` (onto
              the devices), waited for; batches per second, and the host part alone
  train step  the jitted, donated train step of the loop on those batches: the median over
              `--steps` steps (each waited for) after `--warmup_steps` (the first compiles)
  in the loop `--loop_steps` steps run as train.py runs them (next batch, dispatch the step,
              fetch the previous step's metrics), with the time spent waiting for data

and prints pipeline batches/s, train steps/s and their ratio (the goal is >= 10: data is never
what a step waits for), and writes them as JSON to `--out`.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ftjax import launch  # noqa: E402  pylint: disable=g-import-not-at-top


def build(config):
  """(mesh, train iterator, train step, state, rest) exactly as `train_and_evaluate` makes them."""
  import jax
  import jax.numpy as jnp
  from ftjax import data, optim, parallel, steps, tasks
  from ftjax import train as train_lib

  task = tasks.get_task(config.get('task', 'classification'))
  mesh = parallel.make_mesh(config.mesh)
  dataset = data.build_dataset(config.data, task.name)
  steps_per_epoch = dataset.num_examples['train'] // config.train.batch_size
  total_steps = max(1, round(config.train.num_epochs * steps_per_epoch))
  model, checkpoint_dir, groups = train_lib._build_model(config, task, dataset, mesh)
  processor, eos_id = train_lib._processor(dataset, checkpoint_dir, config.data.max_length)
  tx, schedule = optim.make_optimizer(config.optim, total_steps, groups)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  accum_steps = config.train.get('grad_accum_steps', 1)
  buckets = train_lib._length_buckets(config.data, dataset)  # pylint: disable=protected-access
  pack_length, pack_if_smaller = train_lib._pack_length(  # pylint: disable=protected-access
      config, task, model, accum_steps, buckets)
  train_iter = data.train_iterator(dataset, processor, config.train.batch_size, config.seed,
                                   num_workers=config.data.num_workers, eos_id=eos_id,
                                   rows=parallel.local_rows(config.train.batch_size),
                                   length_buckets=buckets, pack_length=pack_length,
                                   pack_if_smaller=pack_if_smaller,
                                   row_multiple=parallel.batch_divisor(mesh))
  graphdef, params, rest = train_lib._split(model, groups, 0)
  params, rest = train_lib._place(params, mesh), train_lib._place(rest, mesh)
  replicated = parallel.replicated(mesh)
  state = steps.TrainState(step=parallel.put(jnp.asarray(0, jnp.int32), replicated),
                           params=params,
                           opt_state=train_lib._init_opt_state(tx, params, mesh),
                           rng=parallel.put(rng, replicated))
  train_step, _ = steps.jit_steps(
      graphdef, tx, schedule, task, mesh=mesh,
      state_shardings=train_lib._shardings_of(state),
      rest_shardings=train_lib._shardings_of(rest),
      accum_steps=accum_steps)
  return mesh, dataset, train_iter, train_step, state, rest


def main() -> None:
  from ftjax import cli, configs

  rest_argv, overrides = configs.split_argv(sys.argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/minilm_vader.py', help='NAME.py[:variant]')
  parser.add_argument('--batches', type=int, default=200, help='timed batches of the pipeline')
  parser.add_argument('--warmup_batches', type=int, default=10)
  parser.add_argument('--steps', type=int, default=10, help='timed train steps')
  parser.add_argument('--warmup_steps', type=int, default=2, help='untimed steps (compile)')
  parser.add_argument('--loop_steps', type=int, default=20,
                      help='steps run as the training loop runs them (0: skip)')
  parser.add_argument('--out', default='workdirs/bench/pipeline.json')
  parser.add_argument('--quick', action='store_true', help='20 batches, 3 steps, 5 loop steps')
  args = parser.parse_args(rest_argv)
  if args.quick:
    args.batches, args.warmup_batches, args.steps, args.warmup_steps = 20, 2, 3, 1
    args.loop_steps = 5
  cli.setup_logging()
  config = configs.load_config(args.config)
  configs.apply_overrides(config, overrides)
  from absl import flags  # grain's worker processes insist that absl flags were parsed.
  flags.FLAGS.mark_as_parsed()
  import jax
  import numpy as np
  from ftjax import parallel

  mesh, dataset, train_iter, train_step, state, rest = build(config)
  batch_size, length = config.train.batch_size, config.data.max_length

  # The pipeline alone: host batches, then onto the devices, as the loop takes them.
  for _ in range(args.warmup_batches):
    jax.block_until_ready(parallel.global_batch(next(train_iter), mesh))
  keep = max(args.steps + args.warmup_steps, 1)
  device_batches = []
  host_seconds = 0.0
  start = time.perf_counter()
  for i in range(args.batches):
    t0 = time.perf_counter()
    host = next(train_iter)
    host_seconds += time.perf_counter() - t0
    batch = jax.block_until_ready(parallel.global_batch(host, mesh))
    if i >= args.batches - keep:
      device_batches.append(batch)
  pipeline_seconds = time.perf_counter() - start
  batches_per_second = args.batches / pipeline_seconds

  # The train step alone, on batches already on the devices.
  times = []
  for i in range(args.warmup_steps + args.steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, device_batches[i % len(device_batches)], rest)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_seconds = statistics.median(times[args.warmup_steps:])
  steps_per_second = 1.0 / step_seconds

  # As train.py's loop: next batch -> dispatch the step -> fetch the previous step's metrics.
  loop = {}
  if args.loop_steps:
    wait = 0.0
    pending = None
    start = time.perf_counter()
    for _ in range(args.loop_steps):
      t0 = time.perf_counter()
      batch = parallel.global_batch(next(train_iter), mesh)
      wait += time.perf_counter() - t0
      state, metrics = train_step(state, batch, rest)
      if pending is not None:
        jax.device_get(pending)
      pending = metrics
    jax.device_get(pending)
    jax.block_until_ready(state)
    total = time.perf_counter() - start
    loop = {'loop_steps': args.loop_steps,
            'loop_steps_per_second': round(args.loop_steps / total, 3),
            'loop_data_wait_fraction': round(wait / total, 4)}
  train_iter.close()

  ratio = batches_per_second / steps_per_second
  record = {
      'machine': launch.describe_cpu(), 'backend': jax.default_backend(),
      'devices': jax.device_count(), 'config': args.config, 'overrides': overrides,
      'batch_size': batch_size, 'max_length': length,
      'num_workers': config.data.num_workers, 'train_examples': dataset.num_examples['train'],
      'pipeline_batches': args.batches,
      'pipeline_batches_per_second': round(batches_per_second, 1),
      'pipeline_host_batches_per_second': round(args.batches / host_seconds, 1),
      'pipeline_ms_per_batch': round(1e3 * pipeline_seconds / args.batches, 3),
      'train_steps': args.steps, 'train_step_ms_median': round(1e3 * step_seconds, 2),
      'train_step_ms_all': [round(1e3 * t, 2) for t in times],
      'train_steps_per_second': round(steps_per_second, 3),
      'ratio_pipeline_over_step': round(ratio, 1), 'goal_ratio': 10.0,
      'last_loss': float(np.asarray(metrics['loss'])), **loop,
  }
  print(f'machine: {record["machine"]}; backend {record["backend"]} x {record["devices"]}; '
        f'config {args.config} {" ".join(overrides)}; batch {batch_size} x {length} tokens; '
        f'data.num_workers {config.data.num_workers}')
  print(f'pipeline    {batches_per_second:10.1f} batches/s  ({record["pipeline_ms_per_batch"]:.3f} '
        f'ms/batch over {args.batches} batches; host part alone '
        f'{record["pipeline_host_batches_per_second"]:.1f} batches/s)')
  print(f'train step  {steps_per_second:10.2f} steps/s    ({1e3 * step_seconds:.1f} ms median of '
        f'{args.steps} after {args.warmup_steps} warm-up)')
  print(f'ratio       {ratio:10.1f} x          (goal >= 10)')
  if loop:
    print(f'in the loop {loop["loop_steps_per_second"]:10.2f} steps/s    (data wait '
          f'{100 * loop["loop_data_wait_fraction"]:.2f}% of {args.loop_steps} steps)')
  out = pathlib.Path(args.out)
  out = out if out.is_absolute() else ROOT / out
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
