"""Classification and regression metrics, and their writers (JSON lines + TensorBoard)."""

import json
import pathlib
import sys
import time

import numpy as np


class ClassificationMetrics:
  """Accumulates weighted predictions over batches into loss, accuracy and macro-F1."""

  def __init__(self, num_classes: int):
    self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [true, predicted]
    self.loss_sum = 0.0
    self.count = 0

  def update(self, labels, predictions, losses, weights) -> None:
    keep = np.asarray(weights) > 0
    labels = np.asarray(labels)[keep]
    predictions = np.asarray(predictions)[keep]
    np.add.at(self.confusion, (labels, predictions), 1)
    self.loss_sum += float(np.asarray(losses, np.float64)[keep].sum())
    self.count += int(keep.sum())

  def compute(self) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (the unweighted mean of per-class F1, 0 for absent classes)."""
    if self.count == 0:
      raise ValueError('no examples were evaluated')
    tp = np.diag(self.confusion).astype(np.float64)
    predicted = self.confusion.sum(0)
    actual = self.confusion.sum(1)
    denom = predicted + actual
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = actual > 0  # Classes absent from the split would count as F1 = 0 otherwise.
    return {
        'loss': self.loss_sum / self.count,
        'accuracy': float(tp.sum() / self.count),
        'macro_f1': float(f1[present].mean()),
        'num_examples': self.count,
    }


class RegressionMetrics:
  """Accumulates weighted predictions and targets into MSE (the loss), RMSE, Pearson, Spearman."""

  def __init__(self):
    self.predictions: list[np.ndarray] = []
    self.targets: list[np.ndarray] = []

  def update(self, out: dict) -> None:
    keep = np.asarray(out['weight']) > 0
    self.predictions.append(np.asarray(out['prediction'], np.float64)[keep])
    self.targets.append(np.asarray(out['target'], np.float64)[keep])

  def compute(self) -> dict[str, float]:
    """MSE as 'loss', RMSE, and the two correlations (0 when a side is constant)."""
    predictions, targets = np.concatenate(self.predictions), np.concatenate(self.targets)
    if not len(targets):
      raise ValueError('no examples were evaluated')
    mse = float(np.mean(np.square(predictions - targets)))

    def correlation(a, b):
      if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0
      return float(np.corrcoef(a, b)[0, 1])

    return {'loss': mse, 'rmse': mse**0.5, 'pearson': correlation(predictions, targets),
            'spearman': correlation(average_ranks(predictions), average_ranks(targets)),
            'num_examples': len(targets)}


def average_ranks(x) -> np.ndarray:
  """1-based ranks of `x`, ties given their average rank (Spearman's rho ranks this way).

  numpy's own, not `scipy.stats.rankdata`: importing scipy.stats took 0.7 s of every run's start.
  """
  _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return ((ends - counts + 1 + ends) / 2)[inverse.reshape(-1)]


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard event files in the workdir.

  JSON lines are appended, so a resumed run extends the record of the run it continues.
  """

  def __init__(self, workdir: pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl = open(workdir / 'metrics.jsonl', 'a')
    self._tb = _summary_writer()(str(workdir / 'tensorboard'))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': step, 'split': split, 'time': round(time.time(), 3)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f'{split}/{name}', float(value), step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _summary_writer():
  """tensorboardX's SummaryWriter class, imported without importing torch.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors, which ftjax
  never passes; that cost 1-3 s of every run's start here (torch is a test dependency). While
  tensorboardX loads, `sys.modules['torch'] = None` makes `import torch` fail, so it takes its
  own no-torch path, as in an environment without torch. A torch imported before is left alone.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
  """A plain-text table: one row per split, one column per metric."""
  columns = list(next(iter(rows.values())).keys())
  header = ['split'] + columns
  body = [[name] + [_fmt(values[c]) for c in columns] for name, values in rows.items()]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths))
  rule = '-' * len(line(header))
  return '\n'.join([title, rule, line(header), rule] + [line(r) for r in body] + [rule])


def _fmt(value) -> str:
  if isinstance(value, int):
    return str(value)
  return f'{value:.4f}'
