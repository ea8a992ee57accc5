"""The benchmark scripts run end to end (smoke sizes) and compare like with like.

Their figures are measured by running them at full size (README, "Performance"); here only what
must hold at any size: both frameworks train the same parameters from the same weights.
"""

import json
import pathlib
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


def test_pipeline_benchmark_reports_batches_and_steps(tmp_path):
  out = tmp_path / 'pipeline.json'
  _run('pipeline.py', '--quick', f'--out={out}')
  result = json.loads(out.read_text())
  assert result['pipeline_batches_per_second'] > 0 and result['train_steps_per_second'] > 0
  assert result['ratio_pipeline_over_step'] == pytest.approx(
      result['pipeline_batches_per_second'] / result['train_steps_per_second'], rel=1e-3)
