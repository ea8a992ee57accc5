r"""Peak host memory of loading a checkpoint: ftjax's streaming loader vs reading it whole.

  .venv/bin/python scripts/bench/load_memory.py [--hidden=1024 --layers=16 --vocab=32000]

Writes a random Llama checkpoint (float32 safetensors, ~0.85 GB at the defaults), then loads it
in fresh processes and prints each one's peak resident memory above the same process just
before loading (peak VmHWM minus VmRSS, Linux), as a multiple of the checkpoint's size:

  ftjax   hub.load_encoder: the model is built abstractly and each tensor goes file -> array
          one at a time, so the peak is the model plus one tensor (~1.0x).
  whole   the common pattern: read the whole file into host arrays (safetensors load_file),
          then copy them into the model: two full copies at the peak (~2x).

On a CPU backend the "device" arrays live in host memory too, so 1.0x is the floor.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time


def _status_mb(field: str) -> float:
  """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f'{field} not in /proc/self/status')


def write(directory: pathlib.Path, hidden: int, layers: int, vocab: int) -> int:
  """Writes config.json + model.safetensors one tensor at a time; returns the file's bytes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftjax.models import llama  # pylint: disable=g-import-not-at-top
  config = {'model_type': 'llama', 'architectures': ['LlamaModel'], 'vocab_size': vocab,
            'hidden_size': hidden, 'intermediate_size': hidden * 11 // 4,
            'num_hidden_layers': layers, 'num_attention_heads': hidden // 64,
            'num_key_value_heads': hidden // 256, 'max_position_embeddings': 2048,
            'rms_norm_eps': 1e-5, 'rope_theta': 10000.0, 'tie_word_embeddings': False}
  (directory / 'config.json').write_text(json.dumps(config))
  family_config = llama.LlamaConfig.from_hf(config)
  rng = np.random.default_rng(0)
  header, shapes = {}, {}
  offset = 0
  import numpy as np  # pylint: disable=g-import-not-at-top,reimported
  for name, mapping in llama.hf_key_map(family_config).items():
    shape = _shape(name, config)
    shapes[name] = shape
    size = int(np.prod(shape)) * 4
    header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
    del mapping
  header['__metadata__'] = {'format': 'pt'}
  raw = json.dumps(header).encode()
  raw += b' ' * (-len(raw) % 8)
  with open(directory / 'model.safetensors', 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little'))
    f.write(raw)
    for name, shape in shapes.items():  # Streamed: the writer never holds the whole model.
      f.write((rng.standard_normal(shape, np.float32) * 0.02).tobytes())
  return offset


def _shape(name: str, config: dict) -> tuple[int, ...]:
  d, f, v = config['hidden_size'], config['intermediate_size'], config['vocab_size']
  kv = config['num_key_value_heads'] * d // config['num_attention_heads']
  if name == 'embed_tokens.weight':
    return (v, d)
  if name.endswith('norm.weight'):
    return (d,)
  for proj, shape in (('q_proj', (d, d)), ('k_proj', (kv, d)), ('v_proj', (kv, d)),
                      ('o_proj', (d, d)), ('gate_proj', (f, d)), ('up_proj', (f, d)),
                      ('down_proj', (d, f))):
    if f'.{proj}.' in name:
      return shape
  raise ValueError(name)


def measure(mode: str, directory: pathlib.Path) -> dict:
  """Loads the checkpoint one way in this (fresh) process and reports memory and time."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax import hub  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()  # Start the backend before the baseline.
  before = _status_mb('VmRSS')
  start = time.perf_counter()
  if mode == 'ftjax':
    model, _, _ = hub.load_encoder(str(directory))
  else:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    tensors = safetensors.numpy.load_file(directory / 'model.safetensors')  # Whole file.
    family, config = hub.read_config(directory)
    model = nnx.eval_shape(lambda: family.model_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for name, mapping in family.hf_key_map(config).items():
      flat[mapping.path].set_value(jnp.array(mapping.to_nnx(tensors[name])))
    model = nnx.merge(graphdef, state)
  jax.block_until_ready(nnx.state(model))
  return {'mode': mode, 'seconds': round(time.perf_counter() - start, 2),
          'peak_increase_mb': round(_status_mb('VmHWM') - before, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--hidden', type=int, default=1024)
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--measure', choices=('ftjax', 'whole'), help=argparse.SUPPRESS)
  parser.add_argument('--dir', type=pathlib.Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure, args.dir)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    size = write(directory, args.hidden, args.layers, args.vocab)
    print(f'checkpoint: random Llama, hidden {args.hidden}, {args.layers} layers, vocab '
          f'{args.vocab}: {size / 1e6:.0f} MB float32 safetensors')
    print(f'{"loader":8s} {"peak host memory above baseline":>32s} {"x checkpoint":>13s} '
          f'{"seconds":>8s}')
    for mode in ('ftjax', 'whole'):
      out = subprocess.run([sys.executable, __file__, f'--measure={mode}', f'--dir={directory}'],
                           capture_output=True, text=True, check=True)
      result = json.loads(out.stdout.strip().splitlines()[-1])
      ratio = result['peak_increase_mb'] * 1024 * 1024 / size
      print(f'{mode:8s} {result["peak_increase_mb"]:>29.0f} MB {ratio:>12.2f}x '
            f'{result["seconds"]:>8.1f}')


if __name__ == '__main__':
  main()
