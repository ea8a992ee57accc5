"""Orbax checkpoints in the workdir: the latest (to resume) and the best by a validation metric.

Two managers, because orbax's `max_to_keep` with `best_fn` keeps the N best steps and would drop
the latest one that resuming needs. `latest/` holds the whole train state plus the data
iterator's position; `best/` holds the trainable parameters only.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from ftjax import params as params_lib
from ftjax.errors import FtjaxError


def _flat_shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {params_lib.path_str(path): tuple(getattr(leaf, 'shape', ())) for path, leaf in flat}


class Checkpoints:
  """Saves and restores the train state under `workdir/checkpoints/{latest,best}`."""

  def __init__(self, workdir: pathlib.Path, *, best_metric: str, best_mode: str):
    if best_mode not in ('max', 'min'):
      raise FtjaxError(f"train.best_mode must be 'max' or 'min', got {best_mode!r}")
    root = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.best_metric = best_metric
    # Runs of several processes save synchronously. Orbax's barrier between processes
    # (`multihost.sync_global_processes`, by default jax's `sync_global_devices`) is an XLA
    # computation with a collective; run from an async save's background thread, it can meet
    # the train and eval steps' own collectives in a different order on each process, and the
    # processes then wait on each other for good (seen once in the two-process test on a 2-core
    # VM: the last 'latest' checkpoint never left its temporary directory, and the coordination
    # service's shutdown barrier timed out after 5 minutes).
    async_saves = jax.process_count() == 1
    # Handlers named up front so that a fresh process can read a checkpoint's metadata.
    self.latest = ocp.CheckpointManager(
        root / 'latest', options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=async_saves),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        root / 'best', item_handlers={'params': ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode,
            enable_async_checkpointing=async_saves))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save_latest(self, step: int, state: Any, data_state: dict) -> None:
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics=metrics)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Fails with the first parameter whose checkpointed shape differs from the model's."""
    saved = _flat_shapes(self.latest.item_metadata(step)['state']['params'])
    wanted = _flat_shapes(abstract_state.params)
    where = f'the checkpoint in {self.latest.directory} (step {step})'
    fix = 'rerun with the config it was written with, or pass a new --workdir'
    for name, shape in wanted.items():
      if name not in saved:
        raise FtjaxError(f'{where} has no parameter {name} that this config needs: {fix}')
      if saved[name] != shape:
        raise FtjaxError(f'{where} does not match the config: {name} has shape {saved[name]} '
                         f'there but {shape} in this model; {fix}')
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise FtjaxError(f'{where} has parameters this config lacks (e.g. {extra[0]}): {fix}')
    # The optimizer state's layout follows the optimizer config (L2-SP, clipping, the policy's
    # groups) and ftjax's optimizer code; orbax would otherwise fail with a structure dump.
    saved_opt = _flat_shapes(self.latest.item_metadata(step)['state']['opt_state'])
    wanted_opt = _flat_shapes(abstract_state.opt_state)
    if saved_opt != wanted_opt:
      name = sorted(set(saved_opt) ^ set(wanted_opt) or
                    {k for k in wanted_opt if saved_opt[k] != wanted_opt[k]})[0]
      raise FtjaxError(f'{where} holds an optimizer state laid out differently from this run\'s '
                       f'(e.g. at {name}): it was written with another optimizer config or '
                       f'ftjax version; {fix}')

  def restore_latest(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    self.check_compatible(step, abstract_state)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def best_step(self) -> int | None:
    return self.best.best_step()

  def restore_best_params(self, abstract_params: Any) -> Any:
    step = self.best.best_step()
    restored = self.best.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    return restored.params

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
