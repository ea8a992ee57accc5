"""(IA)^3 and bottleneck adapters: parity with PEFT's IA3, identity at init, grads, errors."""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import bert, heads
from ftjax.peft import adapters, ia3

TINY = bert.BertConfig(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
# all-MiniLM-L6-v2's architecture, only ever built abstractly here.
MINILM = bert.BertConfig(
    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
)


def _tiny_model(dtype=jnp.float32) -> heads.SequenceClassifier:
  encoder = bert.BertModel(TINY, dtype=dtype, rngs=nnx.Rngs(0))
  return heads.SequenceClassifier(encoder, 3, rngs=nnx.Rngs(1))


def _batch() -> tuple[jax.Array, jax.Array]:
  ids = jax.random.randint(jax.random.key(0), (2, 7), 1, TINY.vocab_size)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  return ids, mask


def _path(p: tuple) -> str:
  return '/'.join(map(str, p))


def _randomise(
    model: nnx.Module, filter_, name: str, *, loc: float = 0.0, scale: float = 0.3
) -> None:
  key = jax.random.key(0)
  for path, variable in nnx.to_flat_state(nnx.state(model, filter_)):
    if path[-2:] == (name, 'kernel') or path[-1] == name:
      key, sub = jax.random.split(key)
      variable[...] = loc + scale * jax.random.normal(sub, variable.shape)


def _grads(model: nnx.Module, filter_, ids, mask) -> list:
  labels = jnp.array([0, 2])
  graphdef, trainable, rest = nnx.split(model, filter_, ...)

  @jax.jit
  def grad_fn(trainable, rest):
    def loss_fn(trainable):
      logits = nnx.merge(graphdef, trainable, rest)(ids, mask)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
    return jax.grad(loss_fn)(trainable)

  return nnx.to_flat_state(grad_fn(trainable, rest))


def _abstract_count(config: bert.BertConfig, surgery, filter_) -> int:
  def build():
    model = bert.BertModel(config, rngs=nnx.Rngs(0))
    surgery(model)
    return model
  model = nnx.eval_shape(build)
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, filter_)))


# (IA)^3
# ------------------------------------------------------------------------------


def test_ia3_identity_at_init_and_paths():
  model = _tiny_model()
  ids, mask = _batch()
  base = model(ids, mask)
  params_before = nnx.to_flat_state(nnx.state(model, nnx.Param))
  kernel = model.encoder.layers[0].attention.key.kernel
  adapted = ia3.apply_ia3(model)
  assert adapted == [
      f'encoder/layers/{i}/{n}' for i in (0, 1) for n in ('attention/key', 'attention/value',
                                                         'output')
  ]
  np.testing.assert_array_equal(model(ids, mask), base)
  key = model.encoder.layers[0].attention.key
  assert isinstance(key, ia3.IA3Linear) and key.kernel is kernel and not key.feedforward
  assert model.encoder.layers[0].output.feedforward

  # Base params keep their paths; the vectors sit next to them, laid out like the scaled axis.
  base_after = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(ia3.ia3_filter))))
  assert [p for p, _ in base_after] == [p for p, _ in params_before]
  vectors = {_path(p): v for p, v in nnx.to_flat_state(nnx.state(model, ia3.ia3_filter))}
  assert len(vectors) == 3 * TINY.num_hidden_layers
  value_l = vectors['encoder/layers/1/attention/value/ia3_l']
  output_l = vectors['encoder/layers/1/output/ia3_l']
  assert value_l.shape == (32,) and output_l.shape == (37,)
  assert value_l.get_metadata()['out_sharding'] == ('heads',)
  assert output_l.get_metadata()['out_sharding'] == ('mlp',)
  np.testing.assert_array_equal(output_l[...], 1)


def test_ia3_matches_peft(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, attn_implementation='eager',
  )
  hf_model = transformers.BertModel(hf_config).eval()
  hf_model.save_pretrained(tmp_path, safe_serialization=True)

  # PEFT's ['key', 'value', 'output.dense'] would also catch attention.output.dense in BERT.
  ffn = r'.*layer\.\d+\.output\.dense$'
  peft_config = peft.IA3Config(
      target_modules=rf'.*\.(key|value)$|{ffn}', feedforward_modules=ffn
  )
  peft_model = peft.get_peft_model(hf_model, peft_config).eval()
  encoder, _, _ = hub.load_encoder(str(tmp_path))
  assert len(ia3.apply_ia3(encoder)) == 3 * 2

  name_re = re.compile(
      r'encoder\.layer\.(\d+)\.(attention\.self\.key|attention\.self\.value|output\.dense)'
      r'\.ia3_l\.default$'
  )
  where = {'attention.self.key': ('attention', 'key'),
           'attention.self.value': ('attention', 'value'), 'output.dense': ('output',)}
  ours = {p: v for p, v in nnx.to_flat_state(nnx.state(encoder, ia3.ia3_filter))}
  copied = 0
  for name, param in peft_model.named_parameters():
    if not param.requires_grad:
      continue
    match = name_re.search(name)
    assert match, name
    with torch.no_grad():
      param.copy_(0.5 + torch.rand_like(param))
    path = ('layers', int(match[1]), *where[match[2]], 'ia3_l')
    ours[path][...] = jnp.asarray(param.detach().numpy().reshape(-1))
    copied += 1
  assert copied == len(ours)
  trainable, _ = peft_model.get_nb_trainable_parameters()
  assert trainable == sum(v.size for v in ours.values()) == 2 * (32 + 32 + 37)

  ids = np.array(_batch()[0])
  mask = np.array(_batch()[1])
  with torch.no_grad():
    expected = peft_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
    ).last_hidden_state.numpy()
  got = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
  diff = np.abs(got - expected).max()
  print(f'ia3 vs peft max abs diff: {diff:.2e}')
  assert diff <= 1e-4
  # The vectors matter: without them the output is far from PEFT's.
  with peft_model.disable_adapter(), torch.no_grad():
    plain = peft_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
    ).last_hidden_state.numpy()
  assert np.abs(plain - expected).max() > 1e-2

  # Folded into the weights, the vectors still give PEFT's output.
  ia3.merge_ia3(encoder)
  np.testing.assert_allclose(encoder(jnp.asarray(ids), jnp.asarray(mask)), expected, atol=1e-4)


def test_ia3_merge_unmerge():
  model = _tiny_model()
  ids, mask = _batch()
  ia3.apply_ia3(model)
  _randomise(model, ia3.ia3_filter, 'ia3_l', loc=1.0)
  unmerged = model(ids, mask)
  kernel = np.array(model.encoder.layers[1].output.kernel[...])
  bias = np.array(model.encoder.layers[1].attention.value.bias[...])
  assert len(ia3.merge_ia3(model)) == 6
  np.testing.assert_allclose(model(ids, mask), unmerged, atol=1e-5)
  with pytest.raises(FtjaxError, match='merged already'):
    ia3.merge_ia3(model)
  with pytest.raises(FtjaxError, match='unmerge_ia3 before apply_ia3'):
    ia3.apply_ia3(model, targets=r'query$')
  ia3.unmerge_ia3(model)
  np.testing.assert_allclose(model.encoder.layers[1].output.kernel[...], kernel, rtol=1e-5)
  np.testing.assert_allclose(model.encoder.layers[1].attention.value.bias[...], bias, rtol=1e-5)
  np.testing.assert_allclose(model(ids, mask), unmerged, atol=1e-5)
  with pytest.raises(FtjaxError, match='nothing to unmerge'):
    ia3.unmerge_ia3(model)
  model.encoder.layers[0].output.ia3_l[...] = model.encoder.layers[0].output.ia3_l[...].at[3].set(0)
  ia3.merge_ia3(model)
  with pytest.raises(FtjaxError, match='zero entries'):
    ia3.unmerge_ia3(model)


def test_ia3_jitted_grads_reach_only_ia3_state():
  model = _tiny_model()
  ids, mask = _batch()
  ia3.apply_ia3(model)
  grads = _grads(model, ia3.ia3_filter, ids, mask)
  assert {p[-1] for p, _ in grads} == {'ia3_l'} and len(grads) == 6
  for path, g in grads:
    assert np.abs(g[...]).max() > 0, _path(path)


def test_ia3_minilm_trainable_count():
  count = _abstract_count(MINILM, ia3.apply_ia3, ia3.ia3_filter)
  assert count == 6 * (384 + 384 + 1536)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(targets='attention/(key'), 'not a valid regular expression'),
        (dict(feedforward='(output'), 'feedforward .* not a valid regular expression'),
        (dict(targets=r'qkv$'), r'match no module: linear layers are at .*layers/\*/attention/key'),
        (dict(targets=r'layers/0/attention$'), 'BertSelfAttention and not a linear layer'),
    ],
)
def test_ia3_errors(kwargs, message):
  model = _tiny_model()
  with pytest.raises(FtjaxError, match=message):
    ia3.apply_ia3(model, **kwargs)
  assert not nnx.state(model, ia3.ia3_filter)


def test_ia3_refuses_adapted_layers():
  model = _tiny_model()
  with pytest.raises(FtjaxError, match='no .*IA.*3 vectors to merge'):
    ia3.merge_ia3(model)
  ia3.apply_ia3(model)
  with pytest.raises(FtjaxError, match='IA3Linear and adapted already'):
    ia3.apply_ia3(model)
  with pytest.raises(FtjaxError, match='IA3Linear and adapted already'):
    adapters.apply_adapters(model, kind='pfeiffer', rngs=nnx.Rngs(0))


# Bottleneck adapters (no reference in Hugging Face PEFT: tested by their invariants)
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('kind, per_layer', [('houlsby', ('attention/out', 'output')),
                                             ('pfeiffer', ('output',))])
def test_adapters_identity_at_init_then_change(kind, per_layer):
  model = _tiny_model()
  ids, mask = _batch()
  base = model(ids, mask)
  params_before = nnx.to_flat_state(nnx.state(model, nnx.Param))
  adapted = adapters.apply_adapters(model, kind=kind, reduction_factor=4, rngs=nnx.Rngs(2))
  assert adapted == [f'encoder/layers/{i}/{n}' for i in (0, 1) for n in per_layer]
  np.testing.assert_array_equal(model(ids, mask), base)

  base_after = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param,
                                                          nnx.Not(adapters.adapter_filter))))
  assert [p for p, _ in base_after] == [p for p, _ in params_before]
  added = {_path(p): v for p, v in nnx.to_flat_state(nnx.state(model, adapters.adapter_filter))}
  prefix = 'encoder/layers/0/output/adapter_'
  assert sorted(k for k in added if k.startswith(prefix)) == [
      prefix + 'down/bias', prefix + 'down/kernel', prefix + 'up/bias', prefix + 'up/kernel']
  assert len(added) == 4 * len(adapted)
  down, up = added[prefix + 'down/kernel'], added[prefix + 'up/kernel']
  assert down.shape == (32, 8) and up.shape == (8, 32)
  assert 0 < np.std(down[...]) < 0.05
  assert down.get_metadata()['out_sharding'] == ('embed', None)
  assert up.get_metadata()['out_sharding'] == (None, 'embed')
  assert added[prefix + 'up/bias'].get_metadata()['out_sharding'] == ('embed',)

  # down(y) is small (0.01-scale weights on small projections), so up must be large to show.
  _randomise(model, adapters.adapter_filter, 'adapter_up', scale=30.0)
  assert np.abs(model(ids, mask) - base).max() > 1e-3


def test_adapters_jitted_grads_reach_only_adapter_state():
  model = _tiny_model()
  ids, mask = _batch()
  adapters.apply_adapters(model, kind='houlsby', reduction_factor=4, non_linearity='gelu',
                          rngs=nnx.Rngs(2))
  grads = _grads(model, adapters.adapter_filter, ids, mask)
  assert len(grads) == 4 * 2 * TINY.num_hidden_layers
  assert {p[-2:] for p, _ in grads} == {
      ('adapter_down', 'kernel'), ('adapter_down', 'bias'),
      ('adapter_up', 'kernel'), ('adapter_up', 'bias')}
  for path, g in grads:
    # up = 0 at init, so nothing reaches down yet; up's gradient is act(down(y)) times upstream.
    if path[-2] == 'adapter_down':
      np.testing.assert_array_equal(g[...], 0)
    else:
      assert np.abs(g[...]).max() > 0, _path(path)


def test_bfloat16_compute_with_both_methods():
  model = _tiny_model(jnp.bfloat16)
  ids, mask = _batch()
  base = model.encoder(ids, mask)
  ia3.apply_ia3(model, targets=r'attention/(key|value)$')
  adapters.apply_adapters(model, kind='pfeiffer', reduction_factor=4, rngs=nnx.Rngs(2))
  assert model.encoder.layers[0].attention.key.ia3_l.dtype == jnp.float32
  assert model.encoder.layers[0].output.adapter_up.kernel.dtype == jnp.float32
  hidden = model.encoder(ids, mask)
  assert hidden.dtype == jnp.bfloat16
  np.testing.assert_array_equal(hidden, base)


@pytest.mark.parametrize('kind, adapters_per_layer', [('houlsby', 2), ('pfeiffer', 1)])
def test_adapters_minilm_trainable_count(kind, adapters_per_layer):
  surgery = lambda m: adapters.apply_adapters(m, kind=kind, rngs=nnx.Rngs(0))
  count = _abstract_count(MINILM, surgery, adapters.adapter_filter)
  # D=384, rf=16: bottleneck 24; down 384*24 + 24, up 24*384 + 384.
  assert count == 6 * adapters_per_layer * (384 * 24 + 24 + 24 * 384 + 384)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(kind='lora'), "unknown adapter kind 'lora': use one of 'houlsby', 'pfeiffer'"),
        (dict(non_linearity='mish'), 'unknown adapter non_linearity'),
        (dict(reduction_factor=0), 'reduction_factor must be a positive integer'),
        (dict(reduction_factor=-4), 'reduction_factor must be a positive integer'),
        (dict(reduction_factor=2.5), 'reduction_factor must be a positive integer'),
        (dict(reduction_factor=64), 'leaves no bottleneck .* use a reduction_factor <= 32'),
        (dict(targets='(out'), 'not a valid regular expression'),
        (dict(targets=r'qkv$'), 'match no module'),
        (dict(targets=r'attention_norm$'), 'LayerNorm and not a linear layer'),
    ],
)
def test_adapters_errors(kwargs, message):
  model = _tiny_model()
  args = dict(kind='houlsby', rngs=nnx.Rngs(0)) | kwargs
  with pytest.raises(FtjaxError, match=message):
    adapters.apply_adapters(model, **args)
  assert not nnx.state(model, adapters.adapter_filter)


def test_adapters_refuse_adapted_layers():
  model = _tiny_model()
  adapters.apply_adapters(model, kind='pfeiffer', reduction_factor=4, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='AdapterLinear and adapted already'):
    adapters.apply_adapters(model, kind='houlsby', reduction_factor=4, rngs=nnx.Rngs(0))
  # Distinct layers compose: IA3 on key/value next to the adapters.
  assert len(ia3.apply_ia3(model, targets=r'attention/(key|value)$')) == 4
