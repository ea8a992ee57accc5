"""ftjax's ViT against transformers' ViTModel / ViTForImageClassification on tiny random configs."""

import json
import pathlib

from flax import nnx
import jax
import numpy as np
import pytest
import torch
import transformers

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import heads
from ftjax.models import vit

TOL = 1e-4
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  # transformers' init leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped or
  # missing norm or bias: every weight gets noise so each one matters to the output.
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.2 * torch.randn(param.shape, generator=generator))
  return model.eval()


def _pixels(batch: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_pixels(pixels_BxHxWxC: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(pixels_BxHxWxC.transpose(0, 3, 1, 2)))


def _run(module: nnx.Module, fn, pixels: np.ndarray, *, jit: bool):
  if not jit:
    return jax.tree.map(np.asarray, fn(module, pixels))
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))
  return jax.tree.map(np.asarray, forward(state, pixels))


def _hidden_and_pooled(model: vit.ViTModel, pixels):
  hidden = model(pixels)
  return hidden, model.pool(hidden)


@pytest.fixture(scope='module')
def vit_dir(tmp_path_factory) -> pathlib.Path:
  torch.manual_seed(0)
  reference = _perturbed(transformers.ViTModel(transformers.ViTConfig(**TINY)), seed=1)
  path = tmp_path_factory.mktemp('vit')
  reference.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def reference(vit_dir) -> transformers.ViTModel:
  return transformers.ViTModel.from_pretrained(vit_dir).eval()


@pytest.fixture(scope='module')
def loaded(vit_dir):
  return hub.load_encoder(str(vit_dir))


def test_loads_every_tensor(loaded):
  model, report, _ = loaded
  assert isinstance(model, vit.ViTModel)
  assert not report.missing and not report.unexpected and not report.fresh
  assert len(report.loaded) == len(vit.hf_key_map(model.config))


@pytest.mark.parametrize('jit', [False, True])
def test_hidden_and_pooler_match_transformers(loaded, reference, jit):
  model, _, _ = loaded
  pixels = _pixels()
  hidden, pooled = _run(model, _hidden_and_pooled, pixels, jit=jit)
  with torch.no_grad():
    out = reference(pixel_values=_torch_pixels(pixels))
  assert hidden.shape == (3, 1 + 16, 32)
  assert np.max(np.abs(hidden - out.last_hidden_state.numpy())) < TOL
  assert np.max(np.abs(pooled - out.pooler_output.numpy())) < TOL


@pytest.mark.parametrize('jit', [False, True])
def test_image_classifier_matches_transformers(tmp_path, jit):
  torch.manual_seed(2)
  config = transformers.ViTConfig(**TINY, num_labels=5)
  reference = _perturbed(transformers.ViTForImageClassification(config), seed=3)
  reference.save_pretrained(tmp_path)
  # A classification checkpoint has no pooler (the backbone is built without one), and its
  # classifier is not the backbone's.
  encoder, report, _ = hub.load_encoder(str(tmp_path))
  assert encoder.pooler is None and not report.missing
  assert sorted(report.unexpected) == ['classifier.bias', 'classifier.weight']
  model = heads.ImageClassifier(encoder, 5, rngs=nnx.Rngs(0))
  assert model.encoder.pooler is None
  model.classifier.kernel.set_value(reference.classifier.weight.detach().numpy().T)
  model.classifier.bias.set_value(reference.classifier.bias.detach().numpy())

  pixels = _pixels(batch=4, seed=1)
  logits = _run(model, lambda m, x: m(x), pixels, jit=jit)
  with torch.no_grad():
    expected = reference(pixel_values=_torch_pixels(pixels)).logits.numpy()
  assert logits.shape == (4, 5) and logits.dtype == np.float32
  assert np.max(np.abs(logits - expected)) < TOL


def test_export_loads_in_transformers(loaded, reference, tmp_path):
  model, _, _ = loaded
  hub.export_encoder(model, model.config, tmp_path)
  exported = transformers.ViTModel.from_pretrained(tmp_path).eval()
  pixels = _torch_pixels(_pixels(batch=2, seed=4))
  with torch.no_grad():
    got, want = exported(pixel_values=pixels), reference(pixel_values=pixels)
  np.testing.assert_allclose(got.last_hidden_state.numpy(), want.last_hidden_state.numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(got.pooler_output.numpy(), want.pooler_output.numpy(), atol=1e-6)
  assert vit.ViTConfig.from_hf(json.loads((tmp_path / 'config.json').read_text())) == model.config


def test_qkv_without_bias(tmp_path):
  torch.manual_seed(5)
  reference = _perturbed(transformers.ViTModel(transformers.ViTConfig(**TINY, qkv_bias=False)), 6)
  reference.save_pretrained(tmp_path)
  model, report, _ = hub.load_encoder(str(tmp_path))
  assert not report.missing and not report.unexpected
  assert model.layers[0].attention.query.bias is None
  pixels = _pixels(batch=2, seed=2)
  with torch.no_grad():
    expected = reference(pixel_values=_torch_pixels(pixels)).last_hidden_state.numpy()
  assert np.max(np.abs(np.asarray(model(pixels)) - expected)) < TOL


def test_parameters_have_logical_axes_and_layer_paths():
  model = vit.ViTModel(vit.ViTConfig(**TINY), rngs=nnx.Rngs(0))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  paths = ['/'.join(map(str, path)) for path, _ in params]
  assert any(p.startswith('layers/1/attention/query/') for p in paths)
  assert all(p.startswith(('embeddings/', 'layers/', 'layernorm/', 'pooler/')) for p in paths)
  for path, variable in params:
    axes = variable.get_metadata().get('out_sharding')
    assert axes is not None and len(axes) == variable.get_value().ndim, path
  assert params_axes(model, 'embeddings/cls_token') == (None, None, 'embed')
  assert params_axes(model, 'layers/0/intermediate/kernel') == ('embed', 'mlp')


def params_axes(model, wanted: str):
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if '/'.join(map(str, path)) == wanted:
      return tuple(variable.get_metadata()['out_sharding'])
  raise KeyError(wanted)


def test_wrong_image_size_is_one_clear_error():
  model = vit.ViTModel(vit.ViTConfig(**TINY), rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match=r'\[B, 32, 32, 3\].*resize the images to 32x32'):
    model(np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(FtjaxError, match='channels first'):
    model(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize('change, message', [
    (dict(image_size=[32, 48]), 'not square'),
    (dict(patch_size=[8, 4]), 'not square'),
    (dict(hidden_act='mystery'), 'unsupported hidden_act'),
    (dict(pooler_act='mystery'), 'unsupported pooler_act'),
    (dict(num_attention_heads=5), 'not divisible'),
    (dict(head_dim=4), 'head_dim'),
])
def test_unsupported_configs_fail_in_one_line(change, message):
  d = {**transformers.ViTConfig(**TINY).to_dict(), **change}
  with pytest.raises(FtjaxError, match=message) as error:
    vit.ViTConfig.from_hf(d)
  assert '\n' not in str(error.value)


def test_config_round_trip_and_dropout():
  d = transformers.ViTConfig(**{**TINY, 'image_size': [32, 32]}).to_dict()
  config = vit.ViTConfig.from_hf(d)
  assert config.image_size == 32 and config.num_patches == 16
  assert config.with_dropout(0.3).attention_probs_dropout_prob == 0.3
  assert vit.ViTConfig.from_hf(config.to_hf()) == config
  back = transformers.ViTConfig.from_dict(config.to_hf())
  assert (back.hidden_size, back.patch_size, back.pooler_output_size) == (32, 8, 32)
