"""The metric writers (JSON lines and TensorBoard event files, written without importing torch) and
the regression metrics against scipy's."""

import json
import struct
import subprocess
import sys

import numpy as np
import scipy.stats

from ftjax import metrics

_WRITE = '''
import json, sys
from ftjax import metrics
writer = metrics.MetricWriter(__import__("pathlib").Path(sys.argv[1]))
writer.write(7, "train", {"loss": 0.25, "accuracy": 0.5})
writer.close()
print(json.dumps({"torch_imported": "torch" in sys.modules}))
'''


def _scalars(event_file) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, found, offset = event_file.read_bytes(), [], 0
  while offset < len(data):
    (length,) = struct.unpack_from('<Q', data, offset)
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4  # length, its crc, the record, its crc
    found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return found


def test_writer_records_scalars_without_importing_torch(tmp_path):
  # tensorboardX imports torch when it is installed (1-3 s of every run's start); the writer
  # keeps it out. torch is installed wherever the tests run (a test dependency).
  out = subprocess.run([sys.executable, '-c', _WRITE, str(tmp_path)], capture_output=True,
                       text=True, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {'torch_imported': False}
  (event_file,) = (tmp_path / 'tensorboard').iterdir()
  assert sorted(_scalars(event_file)) == [(7, 'train/accuracy', 0.5), (7, 'train/loss', 0.25)]
  record = json.loads((tmp_path / 'metrics.jsonl').read_text())
  assert {k: record[k] for k in ('step', 'split', 'loss', 'accuracy')} == {
      'step': 7, 'split': 'train', 'loss': 0.25, 'accuracy': 0.5}


def test_regression_metrics_match_scipy_with_ties_and_padding():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 5, 200).astype(np.float64)  # Many ties, as ratings have.
  predictions = np.round(targets + rng.normal(0, 1.5, 200), 1)
  acc = metrics.RegressionMetrics()
  for rows in np.array_split(np.arange(200), 7):  # Batches, each with padding (weight 0) rows.
    acc.update({'prediction': np.append(predictions[rows], 9.0),
                'target': np.append(targets[rows], -9.0),
                'weight': np.append(np.ones(len(rows)), 0)})
  got = acc.compute()
  np.testing.assert_allclose(metrics.average_ranks(predictions),
                             scipy.stats.rankdata(predictions), rtol=0, atol=0)
  np.testing.assert_allclose(got['spearman'], scipy.stats.spearmanr(predictions, targets)[0],
                             rtol=1e-12)
  np.testing.assert_allclose(got['pearson'], scipy.stats.pearsonr(predictions, targets)[0],
                             rtol=1e-12)
  np.testing.assert_allclose(got['loss'], np.mean((predictions - targets) ** 2), rtol=1e-12)
  assert got['num_examples'] == 200


def test_training_does_not_import_scipy_stats():
  # scipy.stats took 0.7 s of every run's start for one rank function.
  code = 'import sys, ftjax.train; print("scipy.stats" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == 'False'
