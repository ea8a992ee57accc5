"""Devices, mesh and shardings: the same config on one CPU, eight chips or a multi-host pod.

The mesh has three named axes (`config.mesh`): `data` (batch only: every device holds whole
parameters), `fsdp` (batch, and parameters and optimizer state split across devices) and
`tensor` (attention heads and feed-forward columns split within a layer). Any axis may be 1.

Models never name mesh axes. Every parameter declares logical axis names (`embed`, `heads`,
`kv_heads`, `mlp`, `vocab`, `classes`, ...); `RULES` maps each to mesh axes, and a dimension the
mesh axes do not divide evenly is replicated instead. PEFT weights carry the logical names of the
weight they adapt, so they follow its sharding.

  mesh = parallel.make_mesh(config.mesh)
  shardings = parallel.shardings(abstract_state, mesh)   # NamedSharding per leaf
  batch = parallel.global_batch(local_numpy_batch, mesh)  # this process's rows -> global array
"""

from collections.abc import Sequence
import logging
import math
import os
from typing import Any

from flax import nnx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from ftjax.errors import FtjaxError

logger = logging.getLogger(__name__)

MESH_AXES = ('data', 'fsdp', 'tensor')
# The batch dimension of every input splits over both data-parallel axes.
BATCH_AXES = ('data', 'fsdp')

# Logical axis -> mesh axes (None: replicated). FSDP splits the residual-stream dimension of every
# matrix (and with it the optimizer moments); tensor parallelism splits heads, feed-forward
# columns and the vocabulary.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('classes', None),
)


def initialize_distributed(distributed: ml_collections.ConfigDict | None = None) -> None:
  """Starts JAX's multi-process runtime when this process is one of several.

  Order: an explicit `distributed.coordinator_address` (with `num_processes` and `process_id`);
  else an environment JAX detects by itself (a TPU pod slice, a SLURM job with several tasks,
  or `JAX_COORDINATOR_ADDRESS`); else nothing (one process). Must run before any computation.

  Raises:
    FtjaxError: for an incomplete explicit setting.
  """
  if jax.distributed.is_initialized():
    return
  address = distributed.get('coordinator_address', '') if distributed else ''
  if address:
    num, index = distributed.num_processes, distributed.process_id
    if num < 1 or not 0 <= index < num:
      raise FtjaxError(f'distributed.coordinator_address is set, so distributed.num_processes '
                       f'({num}) must be >= 1 and distributed.process_id ({index}) in [0, {num})')
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=index)
  elif _multi_process_environment():
    jax.distributed.initialize()
  else:
    return
  logger.info('process %d of %d, %d local of %d devices', jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())


def _multi_process_environment() -> bool:
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:  # srun with several tasks.
    return True
  # A TPU VM (Cloud TPU or GKE): JAX's own cluster detection finds the slice's other hosts, and
  # on a single-host slice it simply starts one process.
  return bool(os.environ.get('TPU_ACCELERATOR_TYPE') or os.environ.get('TPU_WORKER_HOSTNAMES')
              or os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0'))


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """The (data, fsdp, tensor) sizes: -1 takes what the others leave of `num_devices`.

  Raises:
    FtjaxError: if the sizes do not multiply to the device count.
  """
  sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
  described = ', '.join(f'mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise FtjaxError(f'{described}: each size must be positive, and at most one -1 (the rest '
                     'of the devices)')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise FtjaxError(f'{described}: {num_devices} devices do not divide by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise FtjaxError(f'{described} makes {math.prod(sizes)} devices, but there are '
                     f'{num_devices}: make the product {num_devices}, or set one axis to -1')
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over every device of every process (or `devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: XLA's partitioner propagates shardings from the explicit in/out shardings of
  # the steps (the models need no sharding annotations of their own).
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    # jax.make_mesh orders devices so that the inner axes sit on the fastest interconnect.
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def partition_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """The mesh partitioning of one array from its logical axis names and the rules.

  A dimension whose size the mesh axes do not divide is replicated, and a mesh axis is used at
  most once per array (the first dimension that asks for it gets it).
  """
  if not logical:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _logical(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  metadata = variable.get_metadata()
  names = metadata.get('out_sharding') or metadata.get('sharding_names')
  return tuple(names) if names else None


def shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """A NamedSharding for every array of `tree` (nnx Variables by their logical names).

  `tree` may be an nnx.State, a train state holding them (optimizer moments are Variables
  too, with the names of their parameter), or abstract (`jax.eval_shape`) versions of these.
  Arrays without names (step counters, RNG keys) are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      if not hasattr(value, 'shape'):  # e.g. optax's MaskedNode: no arrays, nothing to place.
        return x
      return x.replace(NamedSharding(mesh, partition_spec(_logical(x), value.shape, mesh,
                                                          rules)))
    if hasattr(x, 'shape'):
      return NamedSharding(mesh, P())
    return None

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  """Global batch sizes must be multiples of this (the data x fsdp devices)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def local_rows(global_batch_size: int) -> slice:
  """The rows of a global batch this process feeds (processes split it evenly, in order)."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise FtjaxError(f'batch size {global_batch_size} does not split evenly over {count} '
                     'processes: make it a multiple of the process count')
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def to_shards(host: np.ndarray, sharding: NamedSharding, dtype: Any) -> jax.Array:
  """A host array placed straight into its shards: each device receives only its own block."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: np.asarray(host[index], dtype=dtype))


def init_sharded(build, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> nnx.Module:
  """Builds the NNX module `build()` returns with every parameter initialised in its shards.

  The module is traced abstractly (`nnx.eval_shape`) to find each parameter's sharding, then
  initialised by one jitted call whose outputs land in those shards: no device ever holds an
  unsharded copy of a sharded weight.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.split(build())[1],
                  out_shardings=shardings(abstract, mesh, rules))()
  return nnx.merge(graphdef, state)


def put(tree: Any, target: Any) -> Any:
  """Places every array of `tree` on its sharding in `target` (a tree of the same structure).

  Works across processes, where `jax.device_put` cannot reach other hosts' devices: an array
  not yet where it belongs is read to the host (every process holds the same value, e.g. a
  freshly initialised adapter) and each process fills only its own devices' blocks. PRNG keys
  travel as their key data.
  """
  def one(x, sharding):
    if getattr(x, 'sharding', None) == sharding:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=impl)
    return to_shards(np.asarray(jax.device_get(x)), sharding, x.dtype)

  return jax.tree.map(one, tree, target)


def describe(tree: Any) -> dict[str, str]:
  """'path' -> the PartitionSpec of every array in a tree of placed arrays (for tables, tests)."""
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in keypath]
      if names and names[-1] == 'value':
        names.pop()
      out['/'.join(names)] = str(tuple(sharding.spec))
  return out


def bytes_per_device(tree: Any) -> int:
  """The largest number of bytes any one device holds of `tree`'s arrays."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, 'addressable_shards', ()):
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)
