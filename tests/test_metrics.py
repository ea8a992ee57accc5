"""The metric writers: JSON lines and TensorBoard event files, written without importing torch."""

import json
import struct
import subprocess
import sys

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
