r"""Per-device parameter + optimizer-state bytes of a ~110M-parameter model on 8 devices.

  .venv/bin/python scripts/bench/sharding_memory.py

Builds a BERT-base-sized encoder with a 3-way head (109.5M parameters) directly in its shards
(`parallel.init_sharded`) and its AdamW state (`jax.jit(tx.init)` with sharded outputs) on meshes
of 8 devices, one fresh process each, and prints what the fullest device holds. With 'data' every
device holds a whole copy; 'fsdp' divides parameters and moments by 8; 2x2x2 mixes the three
axes. On a machine without 8 accelerators it uses 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`): the bytes are those the shardings put on each
device, whatever the device.
"""

import json
import os
import subprocess
import sys

MESHES = {'data=8': (8, 1, 1), 'fsdp=8': (1, 8, 1), 'data=2 x fsdp=2 x tensor=2': (2, 2, 2)}


def measure(sizes: tuple[int, int, int]) -> dict:
  """Runs in a fresh process: builds the model and optimizer state on the mesh, counts bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax import optim, parallel  # pylint: disable=g-import-not-at-top
  from ftjax.models import bert, heads  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, sizes))))
  config = bert.BertConfig()  # BERT-base: 12 layers, hidden 768, vocab 30522.
  build = lambda: heads.SequenceClassifier(bert.BertModel(config, rngs=nnx.Rngs(0)), 3,
                                           pooling='pooler', rngs=nnx.Rngs(1))
  model = parallel.init_sharded(build, mesh)
  params = nnx.state(model, nnx.Param)
  optim_cfg = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_fraction=0.0, schedule='linear', weight_decay=0.01, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip=1.0, l2_sp=0.0))
  tx, _ = optim.make_optimizer(optim_cfg, 100)
  abstract = jax.eval_shape(tx.init, params)
  opt_state = jax.jit(tx.init, out_shardings=parallel.shardings(abstract, mesh))(params)
  return {'params': sum(x.size for x in jax.tree.leaves(params)),
          'total_bytes': sum(x.nbytes for x in jax.tree.leaves((params, opt_state))),
          'per_device_bytes': parallel.bytes_per_device((params, opt_state)),
          'devices': jax.device_count(), 'platform': jax.devices()[0].platform}


def main() -> None:
  if len(sys.argv) > 1:
    print(json.dumps(measure(tuple(int(s) for s in sys.argv[1].split(',')))))
    return
  env = dict(os.environ)
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  rows = {}
  for name, sizes in MESHES.items():
    out = subprocess.run([sys.executable, __file__, ','.join(map(str, sizes))], env=env,
                         capture_output=True, text=True, check=True)
    rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
  first = next(iter(rows.values()))
  print(f"model: {first['params'] / 1e6:.1f}M parameters; parameters + AdamW state "
        f"{first['total_bytes'] / 2**20:.0f} MiB in all; {first['devices']} "
        f"{first['platform']} devices")
  print(f'{"mesh":30s} {"per-device bytes":>18s} {"vs data=8":>10s}')
  base = rows['data=8']['per_device_bytes']
  for name, row in rows.items():
    print(f"{name:30s} {row['per_device_bytes'] / 2**20:>14.1f} MiB "
          f"{base / row['per_device_bytes']:>9.2f}x")


if __name__ == '__main__':
  main()
