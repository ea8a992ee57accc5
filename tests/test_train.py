"""The loop end to end on the real MiniLM checkpoint: train, evaluate, checkpoint, resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ftjax import configs
from ftjax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).parent.parent
# A short run: 24 steps of batch 8, evaluation and checkpoints every 6 steps.
OVERRIDES = ['train.batch_size=8', 'train.num_epochs=0.032', 'train.eval_every=6',
             'train.checkpoint_every=6', 'train.log_every=1', 'train.eval_batch_size=64',
             'data.max_length=12']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(data_dir, *extra):
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  configs.apply_overrides(config, OVERRIDES + [f'data.data_dir={data_dir}', *extra])
  return config


def _train_losses(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def _latest_params(workdir):
  latest = workdir / 'checkpoints' / 'latest'
  step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  return step, ocp.StandardCheckpointer().restore(latest / str(step) / 'state')['params']


def test_train_evaluate_writes_everything(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  results = train_and_evaluate(_config(data_dir), workdir)
  for name in ('config.json', 'metrics.jsonl', 'results.json'):
    assert (workdir / name).is_file(), name
  assert list((workdir / 'tensorboard').iterdir()), 'no TensorBoard event file'
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['train']['batch_size'] == 8 and saved['data']['data_dir'] == data_dir
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  validation = [r for r in records if r['split'] == 'validation']
  assert [r['step'] for r in validation] == [6, 12, 18, 24]
  for r in validation:
    assert {'loss', 'accuracy', 'macro_f1'} <= r.keys()
  # The best checkpoint is the validation step with the highest accuracy.
  best = max(validation, key=lambda r: r['accuracy'])
  assert results['best_step'] == best['step']
  assert results['validation']['accuracy'] == pytest.approx(best['accuracy'])
  assert 0.0 <= results['test']['accuracy'] <= 1.0
  on_disk = json.loads((workdir / 'results.json').read_text())
  assert on_disk['test']['num_examples'] > 500
  # The config freezes the word embeddings: they are neither trained nor checkpointed.
  _, params = _latest_params(workdir)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any('classifier' in p for p in paths) and any('layers' in p for p in paths)
  assert not any('word_embeddings' in p for p in paths)


def test_final_evaluation_of_the_best_step_in_memory_equals_a_restore(data_dir, tmp_path):
  # One evaluation, at the last step: the best step is the state in memory, and the run reports
  # it without restoring its checkpoint (evaluating the test split while the checkpoint is
  # written). Run again on the finished workdir, it resumes at the last step, trains nothing,
  # restores the best checkpoint and evaluates that: the same results.
  config = _config(data_dir, 'train.eval_every=24')
  results = train_and_evaluate(config, tmp_path / 'run')
  assert results['best_step'] == 24
  assert train_and_evaluate(config, tmp_path / 'run') == results


def test_killed_run_resumes_to_the_same_result(data_dir, tmp_path):
  reference = tmp_path / 'uninterrupted'
  train_and_evaluate(_config(data_dir), reference)

  workdir = tmp_path / 'killed'
  command = [sys.executable, str(ROOT / 'scripts/train.py'),
             f'--config={ROOT / "configs/minilm_vader.py"}', f'--workdir={workdir}',
             *[f'--config.{o}' for o in OVERRIDES + [f'data.data_dir={data_dir}']]]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  latest = workdir / 'checkpoints' / 'latest'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, _ = _latest_params(workdir)
  assert killed_at < 24, 'the run finished before it could be killed'

  rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f'resumed from {latest} at step {killed_at}' in rerun.stdout

  # The resumed run saw the same batches and dropout masks: same losses, same final weights.
  expected, got = _train_losses(reference), _train_losses(workdir)
  for step in range(killed_at + 1, 25):
    assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
  step_a, params_a = _latest_params(reference)
  step_b, params_b = _latest_params(workdir)
  assert step_a == step_b == 24
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gradual_unfreezing_compiles_once_per_phase(data_dir, tmp_path, monkeypatch):
  from ftjax import steps
  traces = []
  original = steps.train_step

  def counting_train_step(state, *args, **kwargs):
    traces.append(len(jax.tree.leaves(state.params)))  # Runs once per trace, not per step.
    return original(state, *args, **kwargs)

  monkeypatch.setattr(steps, 'train_step', counting_train_step)
  config = _config(data_dir, 'policy.preset=gradual_unfreeze', 'policy.unfreeze_every=10')
  results = train_and_evaluate(config, tmp_path / 'gradual')
  # 24 steps: the head alone, then + block 5 at step 10, + block 4 at step 20.
  assert len(traces) == 3
  assert traces[0] < traces[1] < traces[2]
  assert results['test']['num_examples'] == 757
