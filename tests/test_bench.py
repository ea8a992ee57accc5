"""The benchmark scripts run end to end (smoke sizes) and compare like with like.

Their figures are measured by running them at full size (README, "Performance"); here only what
must hold at any size: both frameworks train the same parameters from the same weights.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _run(script: str, *args: str) -> None:
  out = subprocess.run([sys.executable, str(ROOT / 'scripts/bench' / script), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def test_speed_benchmark_runs_both_frameworks_on_the_same_problem(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'speed.json'
  _run('speed.py', '--quick', '--workloads=minilm-lora,llama-lora', '--dtypes=float32',
       f'--out={out}')
  result = json.loads(out.read_text())
  rows = {row['workload']: row for row in result['rows']}
  assert set(rows) == {'minilm-lora', 'llama-lora'}
  for row in rows.values():
    ftjax, torch = row['ftjax'], row['torch']
    assert ftjax['trainable'] == torch['trainable']  # The same LoRA factors (+ head).
    assert ftjax['step_s'] > 0 and torch['step_s'] > 0 and row['flops']['step'] > 0
    assert 0 < ftjax['mfu'] and ftjax['peak_mib'] > 0
    parts = ftjax['first_step_parts']
    assert parts['compile_s'] > 0 and parts['trace_s'] > 0 and parts['execute_s'] > 0
    assert len(ftjax['rounds']) == 1  # --quick: one round, so the parts add up to its first step.
    assert sum(parts.values()) == pytest.approx(ftjax['first_step_s'])
  assert rows['minilm-lora']['ftjax']['trainable'] == 74_883
  # Same random-weight decoder, same tokens, same constant lr: the same loss after the steps.
  llama = rows['llama-lora']
  assert llama['ftjax']['loss'] == pytest.approx(llama['torch']['loss'], abs=0.02)
  assert (tmp_path / 'speed.md').read_text().count('| llama-lora | float32 |') == 1


def test_lora_vs_full_runs_both_steps_alternately_in_one_process(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'speed.json'
  _run('speed.py', '--quick', '--lora-vs-full', '--dtypes=float32', '--steps=3', f'--out={out}')
  result = json.loads((tmp_path / 'speed_lora_vs_full.json').read_text())
  assert 0.5 < result['flop_ratio'] < 0.75  # 2/3 of the dense matmuls, all of attention's.
  assert {(r['framework'], r['dtype']) for r in result['rows']} == {('ftjax', 'float32'),
                                                                    ('torch', 'float32')}
  for row in result['rows']:
    times = row['step_times']
    assert len(times['minilm-lora']) == len(times['minilm-full']) == 3
    assert row['ratio'] == pytest.approx(row['lora_s'] / row['full_s'])
    lora, full = row['trainable']['minilm-lora'], row['trainable']['minilm-full']
    assert lora == 74_883 and full > 22_000_000
  assert (tmp_path / 'speed_lora_vs_full.md').read_text().count('| float32 |') == 2


def test_matmuls_times_both_frameworks_at_the_ffn_shapes(tmp_path, monkeypatch):
  pytest.importorskip('torch')
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')  # ftjax's dense layers on its kernel.
  _run('speed.py', '--quick', '--matmuls', '--dtypes=float32,bfloat16',
       f'--out={tmp_path / "speed.json"}')
  result = json.loads((tmp_path / 'speed_matmuls.json').read_text())
  for kind in ('peak-jax', 'peak-torch'):
    (run,) = result['runs'][kind]
    # The --quick batch, 4 x 16 tokens: [64, 384] x [384, 1536] and its two gradients.
    assert sorted(run['shaped']['float32']) == ['4 x 16 tokens|dy w^T', '4 x 16 tokens|x w',
                                                '4 x 16 tokens|x^T dy']
    assert all(g > 0 for g in run['shaped']['float32'].values())
  (run,) = result['runs']['peak-jax']
  assert run['kernel']['bfloat16']['gflops'] > 0 and run['kernel']['float32']['gflops'] > 0
  assert run['kernel']['bfloat16']['variant'] in ('fma', 'dot', 'amx')
  assert run['kernel']['float32']['variant'] == 'fma'
  for dtype in ('float32', 'bfloat16'):
    assert sorted(run['kernel_shaped'][dtype]) == sorted(run['shaped'][dtype])
  table = (tmp_path / 'speed_matmuls.md').read_text()
  assert table.count('| float32 | 4 x 16 tokens |') == 3
  # Every row has XLA's figure and the kernel's.
  assert len(re.findall(r'\| (float32|bfloat16) \| 4 x 16 tokens \| [^|]+ \| [\d,]+ \| [\d,]+ \|',
                        table)) == 6
  assert len(re.findall(r'\| bfloat16 \| 4 x 16 tokens \| [^|]+ \| [\d,]+ \| [\d,]+ \|',
                        table)) == 3


def test_ab_times_the_layers_of_a_revision_against_the_current_ones(tmp_path):
  out = tmp_path / 'speed.json'
  _run('speed.py', '--quick', '--ab=HEAD', '--workloads=minilm-lora', '--dtypes=float32',
       '--steps=2', f'--out={out}')
  (row,) = json.loads((tmp_path / 'speed_ab.json').read_text())['rows']
  assert len(row['step_times']['base']) == len(row['step_times']['current']) == 2
  assert row['ratio'] == pytest.approx(row['current_s'] / row['base_s'])
  assert {'attend', '_attention', 'LayerNorm', 'ACTIVATIONS'} <= set(row['swapped'])
  # The committed layers compute what the working tree's do (this commit's own are tested).
  assert row['first_loss']['base'] == pytest.approx(row['first_loss']['current'], rel=1e-6)
  assert (tmp_path / 'speed_ab.md').read_text().count('| minilm-lora | float32 |') == 1


def test_ab_builds_the_base_step_from_the_base_layers():
  """A base whose GELU differs trains a different first step: the swap reaches the model."""
  from ftjax.models import layers  # pylint: disable=g-import-not-at-top
  source = pathlib.Path(layers.__file__).read_text()
  changed = source.replace('return 0.5 * x * (1.0 + jax.lax.erf(', 'return 0.4 * x * (1.0 + '
                           'jax.lax.erf(')
  assert changed != source
  speed_py = ROOT / 'scripts/bench/speed.py'
  spec = {'workload': 'minilm-full', 'dtype': 'float32', 'batch': 2, 'length': 8,
          'vocab': 30522, 'steps': 1, 'base': 'test', 'base_layers': changed}
  code = (f'import json, sys; sys.path.insert(0, {str(speed_py.parent)!r}); import speed; '
          f'spec = json.loads(sys.stdin.read()); spec["checkpoint"] = speed._minilm_checkpoint(); '
          'print(json.dumps(speed.ab(spec)))')
  # FTJAX_MATMUL=xla: float32 GELU layers run that expression, not the bias + GELU kernel.
  out = subprocess.run([sys.executable, '-c', code], input=json.dumps(spec), cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, FTJAX_MATMUL='xla'))
  assert out.returncode == 0, out.stderr[-3000:]
  loss = json.loads(out.stdout.splitlines()[-1])['first_loss']
  assert abs(loss['base'] - loss['current']) > 1e-4, loss


def test_ab_names_a_revision_it_cannot_read(tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / 'scripts/bench/speed.py'), '--quick',
                        '--ab=no-such-revision', f'--out={tmp_path / "speed.json"}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('speed.py: --ab=no-such-revision: ')


def test_pipeline_benchmark_reports_batches_and_steps(tmp_path):
  out = tmp_path / 'pipeline.json'
  _run('pipeline.py', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  assert result['pipeline_batches_per_second'] > 0 and result['train_steps_per_second'] > 0
  # The JSON rounds the ratio to 0.1 and its two rates to 0.1 and 0.001, so the ratio recomputed
  # from them can differ from the reported one by up to 0.05 plus the rates' own rounding.
  recomputed = result['pipeline_batches_per_second'] / result['train_steps_per_second']
  assert abs(result['ratio_pipeline_over_step'] - recomputed) <= 0.05 + 1e-3 * recomputed


def test_packing_benchmark_times_both_layouts_of_the_same_batches(tmp_path):
  out = tmp_path / 'packing.json'
  _run('packing.py', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  assert result['shapes'] == {'padded': [32, 8], 'packed': [9, 16]}
  assert result['positions']['packed'] < result['positions']['padded']
  assert result['max_logits_difference'] < 1e-5  # The same examples, the same outputs.
  assert result['step_s']['packed'] > 0 and result['step_s']['padded'] > 0


def test_step_profile_accounts_for_the_default_steps_threads_parts_and_matmuls(tmp_path):
  out = tmp_path / 'step_profile.json'
  _run('step_profile.py', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  assert result['steps'] == 4 and result['batch_shape'] == [9, 16]
  assert set(result['thread_ms_by_part']) == {'forward', 'backward', 'update'}
  for name, thread in result['threads'].items():  # Busy and idle split each thread's step.
    # XLA's worker threads run the step; PjRt's client threads only hand it over (a few
    # microseconds, or none at all in a step).
    assert thread['busy_ms'] > 0 if 'XLAEigen' in name else thread['busy_ms'] >= 0
    assert thread['idle_ms'] >= 0
    assert thread['busy_ms'] + thread['idle_ms'] == pytest.approx(result['step_wall_ms'], abs=0.1)
  # The encoder's dense layers at 144 positions, forward and backward: 6 x 10.6M weights x 144 x
  # 6 FLOPs is 9.2 GFLOP (the packing membership and head add a little).
  assert 9.0 < result['matmul_gflop_per_step'] < 9.5
  assert 0 < result['update_phase_ms'] < result['step_wall_ms']


def test_malloc_benchmark_runs_the_default_job_with_reuse_off_and_on(tmp_path):
  out = tmp_path / 'malloc.json'
  _run('malloc.py', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  (off,), (on,) = result['runs']['off'], result['runs']['on']
  assert off['steps'] == on['steps'] == 9
  assert off['test_accuracy'] == on['test_accuracy']  # malloc never changes the numbers.
  # Kept scratch memory is not faulted in again (over the whole command, start-up included).
  assert on['faults_per_step'] < 0.8 * off['faults_per_step']


def test_block_cache_benchmark_runs_each_step_with_the_cache_off_and_on(tmp_path):
  out = tmp_path / 'block_cache.json'
  _run('malloc.py', '--block-cache', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  assert sorted(result['runs']) == ['minilm-full bfloat16', 'minilm-full float32',
                                    'minilm-lora bfloat16']
  for modes in result['runs'].values():
    (off,), (on,) = modes['off'], modes['on']
    assert off['step_s'] > 0 and on['step_s'] > 0 and on['peak_mib'] > 0


def test_gpu_run_script_prints_what_it_found_and_runs_the_benchmark(tmp_path):
  # scripts/bench/gpu_speed.sh as the GPU machine runs it, here on the CPU at smoke size.
  pytest.importorskip('torch')
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / 'out'), TMPDIR=str(tmp_path))
  done = subprocess.run([str(ROOT / 'scripts/bench/gpu_speed.sh'), 'run', '--quick',
                         '--workloads=llama-lora', '--dtypes=bfloat16', '--steps=1'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.search(r'^devices: \[Cpu', done.stdout, re.M)
  assert re.search(r'^jax [\d.]+, jaxlib [\d.]+, flax [\d.]+, .*, peft [\d.]+$', done.stdout, re.M)
  result = json.loads((tmp_path / 'out/speed_gpu.json').read_text())
  assert [(r['workload'], r['dtype']) for r in result['rows']] == [('llama-lora', 'bfloat16')]
  assert (tmp_path / 'out/speed_gpu.md').exists()


def test_gpu_run_script_says_how_to_use_it():
  done = subprocess.run([str(ROOT / 'scripts/bench/gpu_speed.sh')], capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 2 and 'gpu_speed.sh run' in done.stderr
