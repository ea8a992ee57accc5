r"""Fine-tune a ViT on an image folder: by default scikit-learn's 1797 handwritten digits.

  .venv/bin/python scripts/train.py --config=configs/vit_digits.py --workdir=workdirs/digits \
      --config.model.checkpoint=google/vit-base-patch16-224-in21k

The checkpoint is any Hugging Face ViT (ViTModel or ViTForImageClassification) in the local HF
cache or a directory; its preprocessor_config.json gives the input size and normalisation. The
default data source writes the 8x8 digits, upsampled to 32x32 RGB PNGs, to
`<data_dir>/sklearn_digits_png/<digit>/` once; images are resized to the model's input size when
batched. Your own images: `--config.data.source=path/to/folder` with one sub-folder per class
(split by `data.split_fractions`), or train/, validation/ and test/ folders of class folders.
`:runlocal` trains a few steps.
"""

import minilm_vader  # The sibling config this one varies (configs/ is on the path).
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='runlocal'` gives a tiny variant that runs in seconds."""
  config = minilm_vader.get_config(arg)
  with config.unlocked():
    config.task = 'image_classification'
    config.model.checkpoint = 'google/vit-base-patch16-224-in21k'
    config.model.classifier_dropout = 0.0  # As ViTForImageClassification.
    config.policy.preset = 'full'
    config.data.source = 'sklearn_digits'  # Or a folder of class folders.
    config.data.digits_size = 32  # Side of the written digit PNGs (source 'sklearn_digits').
    config.data.split_fractions = (0.8, 0.1, 0.1)
    config.train.batch_size = 32
    config.train.num_epochs = 3.0 if arg != 'runlocal' else 0.05
    config.train.eval_batch_size = 64
    config.optim.lr = 5e-5
  return config
