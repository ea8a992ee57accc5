"""Runs short trainings on several meshes in one process; `tests/test_parallel.py` drives it.

Started as a subprocess so that `XLA_FLAGS=--xla_force_host_platform_device_count=N` (or the
`jax.distributed` settings) take effect before jax initialises. Modes:

  meshes OUT CHECKPOINT DATA_DIR  full fine-tuning and LoRA, 5 steps each, on one device and on
                                  the meshes data=8, fsdp=8, data=2 x fsdp=2 x tensor=2
  train OUT CHECKPOINT DATA_DIR WORKDIR STEPS MESH  one run (MESH like '1,4,1'; resumes if the
                                  workdir holds a checkpoint), for the restore-elsewhere test
  process ID COUNT PORT OUT CHECKPOINT DATA_DIR WORKDIR  one of COUNT jax.distributed processes
  frozen OUT CHECKPOINT           a bfloat16 LoRA model on the 2 x 2 x 2 mesh, its frozen weights
                                  held in bfloat16: OUT (.json) has their shardings and dtypes
                                  before and after
  packed OUT CHECKPOINT DATA_DIR  logits of one VADER batch on the 2 x 2 x 2 mesh, padded and
                                  packed (rows split over the batch devices): OUT (.npz)

Each writes OUT (.npz): per run, the per-step training losses and the final trainable parameters.
"""

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MESHES = {'single': (1, 1, 1), 'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), '2x2x2': (2, 2, 2)}
METHODS = {'full': ['policy.preset=full'],
           'lora': ['policy.preset=peft', 'peft.method=lora', 'optim.lr=1e-2']}
STEP_BATCH = 16  # VADER has 6,002 training examples: 375 steps of 16 per epoch.


def _config(checkpoint: str, data_dir: str, steps: int, *extra: str):
  from ftjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  configs.apply_overrides(config, [
      f'model.checkpoint={checkpoint}', f'data.data_dir={data_dir}',
      f'train.batch_size={STEP_BATCH}', f'train.num_epochs={steps * STEP_BATCH / 6002}',
      'train.eval_every=1000', 'train.checkpoint_every=5', 'train.log_every=1',
      'train.eval_batch_size=256', 'optim.schedule=constant', 'optim.warmup_fraction=0.0',
      # Padded batches: a packed batch's rows are a multiple of the mesh's batch devices, and
      # dropout's masks follow the layout, so packed runs agree across meshes only in
      # distribution ('packed' mode checks their outputs on a mesh instead).
      'data.pack_length=0', *extra])
  return config


def _mesh(sizes):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ftjax import parallel  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, sizes)))
  count = int(np.prod(sizes))
  return parallel.make_mesh(cfg, devices=jax.devices()[:count])


def _record(out: dict, name: str, workdir: pathlib.Path) -> None:
  """Per-step losses (metrics.jsonl) and the trainable parameters of the latest checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ftjax import params as params_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  out[f'{name}/losses'] = np.asarray([r['loss'] for r in records if r['split'] == 'train'])
  latest = workdir / 'checkpoints' / 'latest'
  step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(latest / str(step) / 'state')
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(state['params'])[0]:
    out[f'{name}/params/{params_lib.path_str(keypath)}'] = np.asarray(leaf)


def meshes(out_path, checkpoint, data_dir):
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  out = {}
  for method, overrides in METHODS.items():
    for mesh_name, sizes in MESHES.items():
      workdir = pathlib.Path(out_path).parent / f'{method}_{mesh_name}'
      train_and_evaluate(_config(checkpoint, data_dir, 5, *overrides), workdir,
                         mesh=_mesh(sizes))
      _record(out, f'{method}/{mesh_name}', workdir)
      tables = json.loads((workdir / 'shardings.json').read_text())
      out[f'{method}/{mesh_name}/shardings'] = np.asarray(json.dumps(tables))
  np.savez(out_path, **out)


def train(out_path, checkpoint, data_dir, workdir, steps, mesh):
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  sizes = tuple(int(s) for s in mesh.split(','))
  train_and_evaluate(_config(checkpoint, data_dir, int(steps)), pathlib.Path(workdir),
                     mesh=_mesh(sizes))
  out = {}
  _record(out, 'run', pathlib.Path(workdir))
  np.savez(out_path, **out)


def process(index, count, port, out_path, checkpoint, data_dir, workdir):
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = _config(checkpoint, data_dir, 5, f'distributed.coordinator_address=localhost:{port}',
                   f'distributed.num_processes={count}', f'distributed.process_id={index}',
                   'mesh.data=-1')
  train_and_evaluate(config, pathlib.Path(workdir))
  import jax  # pylint: disable=g-import-not-at-top
  out = {'devices': np.asarray(jax.device_count())}
  _record(out, 'run', pathlib.Path(workdir))  # Every process takes part in the restore.
  if jax.process_index() == 0:
    np.savez(out_path, **out)


def frozen(out_path, checkpoint):
  from ftjax import configs, hub, parallel, peft  # pylint: disable=g-import-not-at-top
  from ftjax import params as params_lib  # pylint: disable=g-import-not-at-top
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  configs.apply_overrides(config, ['policy.preset=peft', 'peft.method=lora'])
  model, _, _ = hub.load_model(checkpoint, num_labels=3, dtype='bfloat16',
                               mesh=_mesh(MESHES['2x2x2']))
  groups = params_lib.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  describe = lambda: {path: [str(getattr(v.get_value().sharding, 'spec', 'one device')),
                             str(v.get_value().dtype)]
                      for path, v in params_lib.param_paths(model).items()}
  before = describe()
  params_lib.hold_frozen_in_compute_dtype(model, groups)
  pathlib.Path(out_path).write_text(json.dumps({'before': before, 'after': describe(),
                                                'mesh': str(parallel.MESH_AXES)}))


def packed(out_path, checkpoint, data_dir):
  import jax  # pylint: disable=g-import-not-at-top
  from ftjax import data, hub, parallel, tasks  # pylint: disable=g-import-not-at-top
  config = _config(checkpoint, data_dir, 5)
  mesh = _mesh(MESHES['2x2x2'])
  model, _, checkpoint_dir = hub.load_model(checkpoint, num_labels=3, mesh=mesh)
  dataset = data.build_dataset(config.data, 'classification')
  tokenizer = data.load_tokenizer(checkpoint_dir, config.data.max_length)
  task, out = tasks.get_task('classification'), {}
  for name, pack_length in (('padded', 0), ('packed', 16)):
    batch = next(data.train_iterator(dataset, tokenizer, 64, 0, pack_length=pack_length,
                                     row_multiple=parallel.batch_divisor(mesh)))
    batch = parallel.global_batch(batch, mesh)
    forward = jax.jit(lambda model, batch: task.forward(model, batch, deterministic=True))
    out[name] = np.asarray(forward(model, batch))
    out[f'{name}/shape'] = np.asarray(batch['input_ids'].shape)
    out[f'{name}/rows_sharded'] = np.asarray(len(batch['input_ids'].sharding.device_set))
  np.savez(out_path, **out)


if __name__ == '__main__':
  mode, *args = sys.argv[1:]
  {'meshes': meshes, 'train': train, 'process': process, 'frozen': frozen,
   'packed': packed}[mode](*args)
