"""Sharded training on CPU: 8 fake devices, meshes, restoring elsewhere, two processes.

Runs that need more than one device start `tests/parallel_runner.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (jax reads it once, at start-up).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import configs, hub, optim, parallel, params as params_lib, steps, tasks
from ftjax.errors import FtjaxError

ROOT = pathlib.Path(__file__).parent.parent
RUNNER = ROOT / 'tests' / 'parallel_runner.py'
RECORDED = ROOT / 'tests' / 'data' / 'shardings_tiny_bert_2x2x2.json'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _run(args, devices: int, timeout: int = 600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  done = subprocess.run([sys.executable, str(RUNNER), *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]


def _assert_same(reference: dict, other: dict, prefix_a: str, prefix_b: str):
  """Per-step losses and every parameter equal within a relative 1e-5."""
  losses_a, losses_b = reference[f'{prefix_a}/losses'], other[f'{prefix_b}/losses']
  assert len(losses_a) == len(losses_b) and len(losses_a) >= 5
  np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
  keys = [k for k in reference if k.startswith(f'{prefix_a}/params/')]
  assert keys
  for key in keys:
    a, b = reference[key], other[key.replace(prefix_a, prefix_b, 1)]
    # Relative to the tensor's norm; tensors without gradient (BERT's key bias: the softmax
    # ignores it) hold ~1e-9 noise around their zero init, compared absolutely.
    scale = np.linalg.norm(a)
    if scale > 1e-6:
      assert np.linalg.norm(a - b) / scale <= 1e-5, key
    else:
      assert np.abs(a - b).max() <= 1e-7, key


def test_same_losses_and_parameters_on_every_mesh(tiny_bert_dir, data_dir, tmp_path):
  out = tmp_path / 'meshes.npz'
  _run(['meshes', out, tiny_bert_dir, data_dir], devices=8)
  result = dict(np.load(out))
  for method in ('full', 'lora'):
    for mesh in ('data8', 'fsdp8', '2x2x2'):
      _assert_same(result, result, f'{method}/single', f'{method}/{mesh}')
  # Every parameter (trained and frozen) is sharded as the rules say: the recorded table...
  recorded = json.loads(RECORDED.read_text())
  for method in ('full', 'lora'):
    tables = json.loads(str(result[f'{method}/2x2x2/shardings']))
    assert tables['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert {k: tables[k] for k in ('params', 'frozen')} == recorded[method]
  # ... which reads as intended: embed -> fsdp, heads/mlp/vocab -> tensor, LoRA follows its
  # weight (A splits the input like the kernel's rows, B the output like its columns).
  full, lora = recorded['full']['params'], recorded['lora']['params']
  assert full['encoder/embeddings/word_embeddings/embedding'] == "('tensor', 'fsdp')"
  assert full['encoder/layers/0/attention/query/kernel'] == "('fsdp', 'tensor')"
  assert full['encoder/layers/0/attention/out/kernel'] == "('tensor', 'fsdp')"
  assert full['encoder/layers/1/intermediate/kernel'] == "('fsdp', 'tensor')"
  assert lora['encoder/layers/0/attention/query/lora_a'] == "('fsdp',)"
  assert lora['encoder/layers/0/attention/query/lora_b'] == "(None, 'tensor')"
  assert lora['classifier/kernel'] == "('fsdp',)"


def test_frozen_weights_held_in_bfloat16_keep_their_shards(tiny_bert_dir, tmp_path):
  out = tmp_path / 'frozen.json'
  _run(['frozen', out, tiny_bert_dir], devices=8)
  result = json.loads(out.read_text())
  before, after = result['before'], result['after']
  assert before.keys() == after.keys()
  held = [p for p in after if after[p][1] == 'bfloat16']
  assert 'encoder/layers/0/attention/query/kernel' in held
  for path, (spec, dtype) in after.items():
    assert spec == before[path][0], path  # The same shards, in bfloat16 or not.
    assert dtype == ('bfloat16' if path in held else 'float32')
  assert not any('lora_' in p or p.startswith('classifier/') for p in held)
  assert before['encoder/layers/0/attention/query/kernel'][0] == "P('fsdp', 'tensor')"


def test_checkpoint_saved_on_8_devices_resumes_on_4(tiny_bert_dir, data_dir, tmp_path):
  # Uninterrupted: 10 steps on an fsdp=8 mesh.
  _run(['train', tmp_path / 'a.npz', tiny_bert_dir, data_dir, tmp_path / 'a', 10, '1,8,1'],
       devices=8)
  # Interrupted: 5 steps on fsdp=8 (constant learning rate, so the first 5 steps are the
  # same), then the same workdir resumed to step 10 in a process with 4 devices, fsdp=4.
  _run(['train', tmp_path / 'b1.npz', tiny_bert_dir, data_dir, tmp_path / 'b', 5, '1,8,1'],
       devices=8)
  _run(['train', tmp_path / 'b.npz', tiny_bert_dir, data_dir, tmp_path / 'b', 10, '1,4,1'],
       devices=4)
  a, b = dict(np.load(tmp_path / 'a.npz')), dict(np.load(tmp_path / 'b.npz'))
  assert json.loads((tmp_path / 'b' / 'shardings.json').read_text())['mesh']['fsdp'] == 4
  _assert_same(a, b, 'run', 'run')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_packed_batches_give_the_padded_logits_on_a_mesh(tiny_bert_dir, data_dir, tmp_path):
  out = tmp_path / 'packed.npz'
  _run(['packed', out, tiny_bert_dir, data_dir], devices=8)
  result = dict(np.load(out))
  assert list(result['padded/shape']) == [64, 8]
  rows, length = result['packed/shape']
  assert length == 16 and rows % 4 == 0 and rows < 32  # A multiple of the 4 batch devices.
  assert int(result['packed/rows_sharded']) == 8
  np.testing.assert_allclose(result['packed'], result['padded'], atol=1e-5, rtol=1e-5)


def test_two_processes_train_like_one(tiny_bert_dir, data_dir, tmp_path):
  _run(['train', tmp_path / 'one.npz', tiny_bert_dir, data_dir, tmp_path / 'one', 5, '1,1,1'],
       devices=1)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen(
      [sys.executable, str(RUNNER), 'process', str(i), '2', str(port), str(tmp_path / 'two.npz'),
       str(tiny_bert_dir), data_dir, str(tmp_path / 'two')], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  one, two = dict(np.load(tmp_path / 'one.npz')), dict(np.load(tmp_path / 'two.npz'))
  assert int(two['devices']) == 2  # One device per process, data-parallel across both.
  _assert_same(one, two, 'run', 'run')


# In-process (one device)
# ------------------------------------------------------------------------------


def test_mesh_shapes_and_errors():
  cfg = lambda d, f, t: ml_collections.ConfigDict({'data': d, 'fsdp': f, 'tensor': t})
  assert parallel.mesh_shape(cfg(-1, 1, 1), 8) == (8, 1, 1)
  assert parallel.mesh_shape(cfg(2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(FtjaxError, match='makes 4 devices, but there are 8'):
    parallel.mesh_shape(cfg(2, 2, 1), 8)
  with pytest.raises(FtjaxError, match='at most one -1'):
    parallel.mesh_shape(cfg(-1, -1, 1), 8)
  with pytest.raises(FtjaxError, match='do not divide by 3'):
    parallel.mesh_shape(cfg(3, -1, 1), 8)


def test_partition_spec_replicates_what_does_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.MESH_AXES)
  P = jax.sharding.PartitionSpec
  assert parallel.partition_spec(('embed', 'mlp'), (32, 64), mesh) == P('fsdp', 'tensor')
  assert parallel.partition_spec(('vocab', 'embed'), (99, 32), mesh) == P(None, 'fsdp')
  assert parallel.partition_spec(('embed', 'classes'), (32, 3), mesh) == P('fsdp')
  assert parallel.partition_spec(None, (5,), mesh) == P()


def test_batch_that_does_not_split_is_one_clear_error(tiny_bert_dir, tmp_path):
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py:runlocal'))
  configs.apply_overrides(config, [f'model.checkpoint={tiny_bert_dir}', 'train.batch_size=30',
                                   'train.grad_accum_steps=4'])
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(FtjaxError, match=r'batch_size=30 must be a multiple of grad_accum_steps'):
    train_and_evaluate(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def _one_step(model, accum_steps: int):
  groups = params_lib.build_policy(ml_collections.ConfigDict({'preset': 'full'}), model)
  optim_cfg = configs.load_config(str(ROOT / 'configs/minilm_vader.py')).optim
  tx, schedule = optim.make_optimizer(optim_cfg, 10, groups)
  graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable), rng=jax.random.key(0))
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, tasks.get_task('classification'),
                                  accum_steps=accum_steps)
  rng = np.random.default_rng(0)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 1000, (8, 12)), jnp.int32),
           'attention_mask': jnp.asarray(rng.integers(0, 2, (8, 12)).clip(1), jnp.int32)
           .at[:4, 8:].set(0),  # Some padding, unevenly spread over the micro-batches.
           'token_type_ids': jnp.zeros((8, 12), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  state, metrics = train_step(state, batch, rest)
  return jax.tree.leaves(state.params), float(metrics['loss'])


def test_gradient_accumulation_and_remat_give_the_same_step(tiny_bert_dir):
  # Dropout off: micro-batches draw their own masks, which a whole batch would not.
  load = lambda remat=False: hub.load_model(str(tiny_bert_dir), num_labels=3, dropout=0.0,
                                            classifier_dropout=0.0, remat=remat)[0]
  whole, loss = _one_step(load(), 1)
  for accum_steps, remat in ((4, False), (1, True), (2, True)):
    other, other_loss = _one_step(load(remat), accum_steps)
    assert abs(other_loss - loss) <= 1e-6 * abs(loss)
    for a, b in zip(whole, other):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_train_step_reuses_the_donated_state_and_never_touches_frozen_weights(tiny_bert_dir):
  model = hub.load_model(str(tiny_bert_dir), num_labels=3)[0]
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))  # Word embeddings frozen.
  groups = params_lib.build_policy(config.policy, model)
  tx, schedule = optim.make_optimizer(config.optim, 10, groups)
  graphdef, trainable, rest = nnx.split(
      model, params_lib.trainable_filter(params_lib.trainable_paths(groups, 0)), ...)
  mesh = parallel.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  trainable, rest = parallel.put(trainable, parallel.shardings(trainable, mesh)), \
      parallel.put(rest, parallel.shardings(rest, mesh))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable), rng=jax.random.key(0))
  shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, tasks.get_task('classification'),
                                  mesh=mesh, state_shardings=shard(state),
                                  rest_shardings=shard(rest))
  batch = parallel.global_batch({'input_ids': np.full((4, 8), 1000, np.int32),
                                 'attention_mask': np.ones((4, 8), np.int32),
                                 'token_type_ids': np.zeros((4, 8), np.int32),
                                 'label': np.arange(4, dtype=np.int32) % 3}, mesh)
  old_leaves = jax.tree.leaves((state.params, state.opt_state))
  frozen = parallel.describe(rest)  # Path -> sharding of every frozen weight.
  frozen_before = [np.asarray(x) for x in jax.tree.leaves(rest)]
  new_state, _ = train_step(state, batch, rest)
  # The step wrote the new state into the old one's buffers (donation), so every array of the
  # old state is gone, and the frozen weights were inputs only: unchanged and still alive.
  assert all(x.is_deleted() for x in old_leaves)
  assert not any(x.is_deleted() for x in jax.tree.leaves(rest))
  for before, after in zip(frozen_before, jax.tree.leaves(rest)):
    np.testing.assert_array_equal(before, np.asarray(after))
  assert 'encoder/embeddings/word_embeddings/embedding' in frozen
  # Optimizer state exists for the trainable parameters only: two AdamW moments each.
  moments = sum(x.size for x in jax.tree.leaves(new_state.opt_state) if x.ndim)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(new_state.params))
