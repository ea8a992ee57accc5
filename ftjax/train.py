"""`train_and_evaluate(config, workdir)`: the one training loop, read top to bottom.

config -> data (TFDS build, labels) -> pretrained model + new head -> optimizer -> train state
(restored from the workdir if a run was there) -> jitted steps <- batches. Every check on the
user's input happens before the first byte is written to the workdir, so a bad run never harms
a good one that shares its directory.
"""

import dataclasses
import inspect
import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from flax import nnx

from ftjax import checkpoints as checkpoints_lib
from ftjax import configs, data, hub, launch, metrics as metrics_lib, optim, parallel, steps, tasks
from ftjax import params as params_lib
from ftjax import peft as peft_lib
from ftjax.errors import FtjaxError

logger = logging.getLogger('ftjax')


def _check_train_config(train: ml_collections.ConfigDict, task: tasks.Task) -> None:
  for name in ('batch_size', 'eval_every', 'eval_batch_size', 'checkpoint_every', 'log_every'):
    if train[name] <= 0:
      raise FtjaxError(f'train.{name} must be a positive integer, got {train[name]}')
  if train.num_epochs <= 0:
    raise FtjaxError(f'train.num_epochs must be positive, got {train.num_epochs}')
  if train.best_metric not in task.metrics:
    raise FtjaxError(f'train.best_metric must be one of {", ".join(task.metrics)} for task '
                     f'{task.name!r}, got {train.best_metric!r}')
  if train.best_mode not in ('min', 'max'):
    raise FtjaxError(f"train.best_mode must be 'min' or 'max', got {train.best_mode!r}")


def _check_batch_sizes(train: ml_collections.ConfigDict, accum_steps: int, divisor: int) -> None:
  if accum_steps < 1:
    raise FtjaxError(f'train.grad_accum_steps must be >= 1, got {accum_steps}')
  if train.batch_size % (accum_steps * divisor):
    raise FtjaxError(f'train.batch_size={train.batch_size} must be a multiple of '
                     f'grad_accum_steps ({accum_steps}) x the data-parallel devices ({divisor})')
  if train.eval_batch_size % divisor:
    raise FtjaxError(f'train.eval_batch_size={train.eval_batch_size} must be a multiple of the '
                     f'data-parallel devices ({divisor})')


_END = 2**62  # A step after every unfreeze: the split into ever-trainable and always-frozen.


def _split(model: nnx.Module, groups, step: int):
  """(graphdef, trainable params, everything else) for the policy's phase at `step`."""
  return nnx.split(model, params_lib.trainable_filter(params_lib.trainable_paths(groups, step)),
                   ...)


def _place(tree, mesh):
  """`tree` moved onto its shardings (a no-op for arrays already there, e.g. loaded weights)."""
  return parallel.put(tree, parallel.shardings(tree, mesh))


def _init_opt_state(tx, params, mesh):
  """The optimizer state, created directly in its shards (moments follow their parameter)."""
  abstract = jax.eval_shape(tx.init, params)
  return jax.jit(tx.init, out_shardings=parallel.shardings(abstract, mesh))(params)


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _unfreeze(graphdef, state: steps.TrainState, rest, groups, step: int, tx, mesh):
  """Moves the groups that unfreeze at `step` into the trainable state.

  Optimizer state is carried over by parameter path, so groups already training keep their
  moments; the new groups start from a fresh AdamW state.
  """
  model = nnx.merge(graphdef, state.params, rest)
  graphdef, params, rest = _split(model, groups, step)
  old = {jax.tree_util.keystr(k): v for k, v in
         jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  opt_state = jax.tree_util.tree_map_with_path(
      lambda k, fresh: old.get(jax.tree_util.keystr(k), fresh), _init_opt_state(tx, params, mesh))
  return graphdef, dataclasses.replace(state, params=params, opt_state=opt_state), rest


def _main_process_first(fn):
  """Runs `fn` on process 0, then on the others (e.g. a dataset build they then reuse)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('ftjax: process 0 done first')
  return result if jax.process_index() == 0 else fn()


def _save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Writes the resolved config; a different earlier one is kept beside it, never overwritten."""
  path = workdir / 'config.json'
  text = configs.to_json(config)
  if path.exists() and path.read_text() != text:
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(path.stat().st_mtime))
    path.rename(workdir / f'config.{stamp}.json')
  path.write_text(text)


def _ensure_logging() -> None:
  """Lets notebook users see progress without configuring logging themselves."""
  if not logger.handlers and not logging.getLogger().handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(message)s'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def evaluate(eval_step, params, rest, batches, accumulator) -> dict[str, float]:
  """The task's metrics (e.g. loss, accuracy, macro-F1) over padded evaluation batches."""
  for batch in batches:
    accumulator.update(jax.device_get(eval_step(params, rest, batch)))
  return accumulator.compute()


def _processor(dataset: data.Dataset, checkpoint_dir: pathlib.Path, max_length: int):
  """What turns records into model inputs: the checkpoint's tokenizer, or its image settings."""
  if dataset.kind == 'image':
    from ftjax.data import images  # pylint: disable=g-import-not-at-top
    return images.image_processor_settings(checkpoint_dir), None
  tokenizer = data.load_tokenizer(checkpoint_dir, max_length)
  eos = data.eos_id(checkpoint_dir, tokenizer) if dataset.kind == 'instruction' else None
  return tokenizer, eos


def _build_model(config: ml_collections.ConfigDict, task: tasks.Task, dataset: data.Dataset,
                 mesh):
  """Pretrained backbone (loaded into its shards) + the task's head + PEFT surgery, and the
  policy's groups."""
  model, report, checkpoint_dir = hub.load_model(
      config.model.checkpoint, task=task.name, num_labels=max(1, len(dataset.label_names)),
      pooling=config.model.pooling, classifier_dropout=config.model.classifier_dropout,
      init=config.model.init, dtype=config.model.dtype, seed=config.seed,
      dropout=None if config.model.dropout < 0 else config.model.dropout,
      allow_missing=config.model.get('allow_missing', False), mesh=mesh,
      remat=config.model.get('remat', False))
  logger.info('%s', report.format())
  peft_paths = peft_lib.apply(model, config.peft, seed=config.seed)
  groups = params_lib.build_policy(config.policy, model, peft_paths)
  return model, checkpoint_dir, groups


def restore_model(workdir: str | pathlib.Path, mesh=None):
  """The fine-tuned model of a finished (or running) workdir, at its best checkpoint.

  `mesh` (default: every device as data parallel) need not be the mesh the run trained on.

  Returns:
    (model, checkpoint directory of the pretrained model (its tokenizer), the run's config).

  Raises:
    FtjaxError: if the workdir holds no config.json or no best checkpoint.
  """
  workdir = pathlib.Path(workdir)
  try:
    config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise FtjaxError(f'{workdir} holds no readable config.json of a training run ({e}); pass '
                     'the --workdir a run wrote') from e
  task = tasks.get_task(config.get('task', 'classification'))
  dataset = data.build_dataset(config.data, task.name)
  mesh = mesh or parallel.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1,
                                                               'tensor': 1}))
  model, checkpoint_dir, groups = _build_model(config, task, dataset, mesh)
  graphdef, params, rest = _split(model, groups, _END)
  params, rest = _place(params, mesh), _place(rest, mesh)
  ckpts = checkpoints_lib.Checkpoints(workdir, best_metric=config.train.best_metric,
                                      best_mode=config.train.best_mode)
  if ckpts.best_step() is None:
    raise FtjaxError(f'{workdir} has no best checkpoint yet: train until the first evaluation')
  params = ckpts.restore_best_params(jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
  ckpts.close()
  return nnx.merge(graphdef, params, rest), checkpoint_dir, config


def _length_buckets(data_config, dataset) -> tuple[int, ...]:
  """`data.length_buckets`, checked; one process only (each process reads only its rows, and
  all processes must cut a batch to the same length)."""
  buckets = data.check_buckets(data_config.get('length_buckets', ()), data_config.max_length)
  if buckets and dataset.kind == 'image':
    raise FtjaxError('data.length_buckets applies to token data, not images: set it to ()')
  if buckets and jax.process_count() > 1:
    raise FtjaxError('data.length_buckets needs a single process (every process would cut its '
                     'own rows differently): set it to () for multi-process runs')
  return buckets


def _pack_length(config: ml_collections.ConfigDict, task: tasks.Task, model: nnx.Module,
                 accum_steps: int, buckets: tuple[int, ...]) -> tuple[int, bool]:
  """`data.pack_length`, checked against what packed batches support: (row length, whether a
  split is packed only where that saves positions). (0, False) means no packing.

  -1 (auto) packs rows of 2 x max_length where the run allows it and says why where it does not;
  an explicit length the run cannot pack is an error.
  """
  pack_length = data.check_pack_length(config.data.get('pack_length', 0), config.data.max_length)
  if not pack_length:
    return 0, False
  encoder = getattr(model, 'encoder', None)
  if not task.packable:
    problem = (f'the {task.name} task (packing serves classification, regression and token '
               'classification)')
  elif 'packing' not in inspect.signature(type(encoder).__call__).parameters:
    problem = (f'a {type(encoder).__name__} backbone (encoders such as BERT and RoBERTa take '
               'packed batches)')
  elif config.model.pooling == 'last':
    problem = "model.pooling='last'"
  elif config.peft.method in ('prompt', 'prefix'):
    problem = f'{config.peft.method} tuning'
  elif accum_steps > 1:
    problem = f'train.grad_accum_steps={accum_steps}'
  elif buckets:
    problem = 'data.length_buckets (packing already removes the padding)'
  elif jax.process_count() > 1:
    problem = 'several processes (each would size its rows alone)'
  elif pack_length == data.AUTO_PACK:
    return 2 * config.data.max_length, True
  else:
    return pack_length, False
  if pack_length == data.AUTO_PACK:
    logger.info('batches are not packed (data.pack_length=-1, auto): %s', problem)
    return 0, False
  raise FtjaxError(f'data.pack_length={pack_length} does not work with {problem}: set '
                   'data.pack_length=0 (or -1, which packs only where it can)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       mesh: jax.sharding.Mesh | None = None) -> dict:
  """Fine-tunes the configured model and returns validation and test metrics of the best step.

  Rerunning on the same workdir resumes from its latest checkpoint with the data position and
  RNG state restored, so it sees the batches an uninterrupted run would, also on another mesh
  or device count. `mesh` replaces the one `config.mesh` describes (e.g. a subset of devices).

  Raises:
    FtjaxError: for any problem with the config, checkpoint, data or workdir (one line).
  """
  _ensure_logging()
  started = time.perf_counter()
  launch.enable_compilation_cache()  # A rerun, resume or sweep skips compiling the steps.
  launch.reuse_freed_host_memory()  # Each step's scratch memory is not faulted in afresh.
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise FtjaxError(f'--workdir {workdir} exists and is not a directory')
  task = tasks.get_task(config.get('task', 'classification'))
  _check_train_config(config.train, task)
  parallel.initialize_distributed(config.get('distributed'))
  mesh = mesh or parallel.make_mesh(config.mesh)
  accum_steps = config.train.get('grad_accum_steps', 1)
  _check_batch_sizes(config.train, accum_steps, parallel.batch_divisor(mesh))
  is_main = jax.process_index() == 0
  logger.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size,
              jax.process_count())

  # Data first: its label set sizes the new head.
  dataset = _main_process_first(lambda: data.build_dataset(config.data, task.name))
  for split in ('train', 'validation', 'test'):
    logger.info('data %-10s %6d examples', split, dataset.num_examples[split])
  steps_per_epoch = dataset.num_examples['train'] // config.train.batch_size
  if steps_per_epoch == 0:
    raise FtjaxError(f'train.batch_size={config.train.batch_size} is larger than the train split '
                     f"({dataset.num_examples['train']} examples): lower it")
  total_steps = max(1, round(config.train.num_epochs * steps_per_epoch))

  model, checkpoint_dir, groups = _build_model(config, task, dataset, mesh)
  processor, eos_id = _processor(dataset, checkpoint_dir, config.data.max_length)
  logger.info('parameter policy (%s):\n%s', config.policy.preset, params_lib.format_table(
      groups, config.optim.lr, config.optim.weight_decay))
  cast, saved = params_lib.hold_frozen_in_compute_dtype(model, groups)
  if cast:
    logger.info('frozen weights held in %s: %.1fM parameters, %.0f MiB less', config.model.dtype,
                cast / 1e6, saved / 2**20)
  phases = params_lib.phase_starts(groups)  # Gradual unfreezing: one compilation per phase.
  tx, schedule = optim.make_optimizer(config.optim, total_steps, groups)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  buckets = _length_buckets(config.data, dataset)
  pack_length, pack_if_smaller = _pack_length(config, task, model, accum_steps, buckets)
  packing = dict(pack_length=pack_length, pack_if_smaller=pack_if_smaller,
                 row_multiple=parallel.batch_divisor(mesh))
  train_iter = data.train_iterator(dataset, processor, config.train.batch_size, config.seed,
                                   num_workers=config.data.num_workers, eos_id=eos_id,
                                   rows=parallel.local_rows(config.train.batch_size),
                                   length_buckets=buckets, **packing)

  ckpts = checkpoints_lib.Checkpoints(workdir, best_metric=config.train.best_metric,
                                      best_mode=config.train.best_mode)
  start_step = ckpts.latest_step() or 0
  graphdef, params, rest = _split(model, groups, start_step)
  del model  # Its arrays live on in `params` and `rest`.
  # Loaded weights are in their shards already; this places what surgery added (e.g. LoRA).
  params, rest = _place(params, mesh), _place(rest, mesh)
  replicated = parallel.replicated(mesh)
  state = steps.TrainState(step=parallel.put(jnp.asarray(start_step, jnp.int32), replicated),
                           params=params, opt_state=_init_opt_state(tx, params, mesh),
                           rng=parallel.put(rng, replicated))
  if start_step:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state, data_state = ckpts.restore_latest(start_step, abstract)
    train_iter.set_state(data_state)
    logger.info('resumed from %s at step %d', ckpts.latest.directory, start_step)
  if is_main:
    _save_config(config, workdir)
    # Where every parameter, trained or frozen, lives on the mesh ('path': PartitionSpec).
    (workdir / 'shardings.json').write_text(json.dumps(
        {'mesh': dict(mesh.shape), 'params': parallel.describe(state.params),
         'frozen': parallel.describe(rest)}, indent=1, sort_keys=True) + '\n')
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  jit_steps = lambda graphdef, state, rest: steps.jit_steps(
      graphdef, tx, schedule, task, mesh=mesh, state_shardings=_shardings_of(state),
      rest_shardings=_shardings_of(rest), accum_steps=accum_steps)
  train_step, eval_step = jit_steps(graphdef, state, rest)
  eval_rows = parallel.local_rows(config.train.eval_batch_size)
  eval_batches = lambda split: (parallel.global_batch(b, mesh) for b in data.eval_batches(
      dataset, split, processor, config.train.eval_batch_size, eos_id=eos_id, rows=eval_rows,
      length_buckets=buckets, **packing))
  accumulator = lambda: task.metrics_accumulator(len(dataset.label_names))
  logger.info('training %d steps (%.2f epochs of %d steps, batch %d)', total_steps,
              config.train.num_epochs, steps_per_epoch, config.train.batch_size)

  pending = None  # Step N's metrics are fetched after step N+1 is dispatched.
  last_eval = None  # (step, validation metrics) of this process's last evaluation.
  # Log lines go through tqdm while the bar is up, so they never land in the middle of it.
  redirected = [log for log in (logging.root, logger) if log.handlers]
  with logging_redirect_tqdm(loggers=redirected), tqdm.tqdm(
      total=total_steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
      disable=not sys.stderr.isatty()) as bar:

    def flush(pending):
      step, device_metrics = pending
      scalars = jax.device_get(device_metrics)
      bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
      if step % config.train.log_every == 0 or step == total_steps:
        writer.write(step, 'train', scalars)

    step_starts = []  # Iteration start times: their spacing is the pipelined step time.
    for step in range(start_step + 1, total_steps + 1):
      step_starts.append(time.perf_counter())
      if step - 1 in phases and step - 1 > start_step:  # New groups unfreeze now.
        graphdef, state, rest = _unfreeze(graphdef, state, rest, groups, step - 1, tx, mesh)
        train_step, eval_step = jit_steps(graphdef, state, rest)
        logger.info('step %d: unfroze %d more parameters', step - 1,
                    sum(g.num_params for g in groups if g.rule.unfreeze_step == step - 1))
      batch = parallel.global_batch(next(train_iter), mesh)
      state, device_metrics = train_step(state, batch, rest)
      if pending:
        flush(pending)
      pending = (step, device_metrics)
      bar.update(1)
      if step % config.train.eval_every == 0 or step == total_steps:
        flush(pending)
        pending = None
        val = evaluate(eval_step, state.params, rest, eval_batches('validation'), accumulator())
        last_eval = (step, val)
        writer.write(step, 'validation', val)
        # Every parameter that trains in any phase: frozen-for-now ones included, so the best
        # step can be rebuilt exactly after later phases have changed them.
        ckpts.save_best(step, _split(nnx.merge(graphdef, state.params, rest), groups, _END)[1],
                        val)
        logger.info('step %d validation: %s', step,
                    ' '.join(f'{k} {val[k]:.4f}' for k in task.metrics))
      if step % config.train.checkpoint_every == 0 or step == total_steps:
        ckpts.save_latest(step, state, train_iter.get_state())
    if pending:
      flush(pending)

  # Report the step that validation chose, on both held-out splits.
  best_step = ckpts.best_step()
  if len(phases) > 1:
    graphdef, final_params, rest = _split(nnx.merge(graphdef, state.params, rest), groups, _END)
    eval_step = jit_steps(graphdef, dataclasses.replace(state, params=final_params), rest)[1]
  else:
    final_params = state.params
  evaluate_best = lambda params, split: evaluate(eval_step, params, rest, eval_batches(split),
                                                 accumulator())
  if last_eval is not None and last_eval[0] == best_step:
    # The best step is the state in memory, and its validation metrics are known: the test split
    # is evaluated while the last checkpoints are still being written, not after a restore.
    best_params, validation = final_params, last_eval[1]
  else:
    ckpts.wait()
    best_params = ckpts.restore_best_params(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, final_params))
    validation = evaluate_best(best_params, 'validation')
  results = {'validation': validation, 'test': evaluate_best(best_params, 'test')}
  ckpts.wait()  # Every checkpoint is on disk before the run reports.
  if is_main:
    writer.write(best_step, 'test', results['test'])
    # Wall time of this call (data, model load, compile, train, evaluate); a resumed run counts
    # only its own part.
    # Median spacing: robust to the steps that also compiled, evaluated or checkpointed.
    spacing = np.diff(step_starts[1:])
    num_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    summary = {'best_step': best_step, 'best_metric': config.train.best_metric,
               'total_steps': total_steps, 'resumed_from_step': start_step,
               'trainable_params': int(num_trainable),
               'total_params': sum(g.num_params for g in groups),
               'optimizer_state_bytes': int(sum(x.nbytes for x in jax.tree.leaves(
                   state.opt_state))),
               'steps_per_second': (round(1 / float(np.median(spacing)), 3) if len(spacing)
                                    else None),
               'wall_seconds': round(time.perf_counter() - started, 1), **results}
    (workdir / 'results.json').write_text(json.dumps(summary, indent=2) + '\n')
    logger.info('\n%s', metrics_lib.format_table(
        results, f'best checkpoint: step {best_step} (by validation {config.train.best_metric})'))
    logger.info('wall time %.1f s; results in %s', summary['wall_seconds'],
                workdir / 'results.json')
  writer.close()
  ckpts.close()
  return {'best_step': best_step, **results}
