"""Configs load, overrides apply with types kept, and every mistake is one clear line."""

import pathlib
import sys

import pytest

from ftjax import cli, configs
from ftjax.errors import FtjaxError

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob('configs/*.py'))


def _variants(path):
  """The config args to try: a file with a METHODS table takes one of them as its arg."""
  text = path.read_text()
  if 'METHODS = {' not in text:
    return [None, 'runlocal']
  sys.path.insert(0, str(path.parent))
  try:
    methods = __import__(path.stem).METHODS
  finally:
    sys.path.remove(str(path.parent))
  return [arg for m in methods for arg in (m, f'{m},runlocal')]


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_locked_and_documented(path):
  variants = _variants(path)
  for arg in variants:
    spec = str(path) if arg is None else f'{path}:{arg}'
    config = configs.load_config(spec)
    assert config.is_locked
    with pytest.raises(AttributeError):
      config.not_a_field = 1
  # Every field carries a comment where a config file assigns it (a derived config may leave
  # the comment to the config it builds on).
  lines = [line for p in CONFIGS for line in p.read_text().splitlines()]
  first = variants[0]
  for key in configs.flat_keys(configs.load_config(str(path) if first is None
                                                   else f'{path}:{first}')):
    at = [i for i, line in enumerate(lines) if f'config.{key} =' in line]
    assert at, f'config.{key} is assigned in no config file'
    commented = any('#' in lines[i] or lines[i - 1].strip().startswith('#') for i in at)
    assert commented, f'config.{key} has no comment'


def test_overrides_keep_types():
  config = configs.load_config('configs/minilm_vader.py')
  configs.apply_overrides(config, ['optim.lr=3e-5', 'train.batch_size=16', 'model.init=scratch',
                                   'train.num_epochs=2', 'data.split_fractions=(0.7,0.2,0.1)'])
  assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
  assert config.train.batch_size == 16 and isinstance(config.train.batch_size, int)
  assert config.model.init == 'scratch'
  assert config.train.num_epochs == 2.0 and isinstance(config.train.num_epochs, float)
  assert config.data.split_fractions == (0.7, 0.2, 0.1)


@pytest.mark.parametrize('override, expected', [
    ('optim.lrr=1e-3', 'did you mean --config.optim.lr?'),
    ('train.lr=1e-3', 'did you mean --config.optim.lr?'),
    ('optim.lr=fast', 'expects a number'),
    ('train.batch_size=3.5', 'expects an integer'),
    ('optim.lr', 'needs a value'),
])
def test_bad_overrides_name_the_fix(override, expected):
  config = configs.load_config('configs/minilm_vader.py')
  with pytest.raises(FtjaxError, match=expected.replace('?', r'\?').replace('.', r'\.')):
    configs.apply_overrides(config, [override])


def test_split_argv():
  rest, overrides = configs.split_argv(
      ['--config=c.py', '--config.optim.lr=1e-3', '--workdir', 'w', '--config.model.init', 'x'])
  assert rest == ['--config=c.py', '--workdir', 'w']
  assert overrides == ['optim.lr=1e-3', 'model.init=x']


@pytest.mark.parametrize('argv, expected', [
    (['--config=configs/minilm_vader.py', '--workdir=W', '--config.optim.lrr=1'],
     'did you mean --config.optim.lr?'),
    (['--config=configs/minilm_vader.py', '--workdir=W', '--config.train.batch_size=big'],
     'expects an integer'),
    (['--config=configs/nope.py', '--workdir=W'], 'does not exist'),
    (['--config=configs/minilm_vader.py:tiny', '--workdir=W'], 'unknown config variant'),
    (['--config=configs/minilm_vader.py'], 'the following arguments are required: --workdir'),
    (['--config=configs/minilm_vader.py', '--workdir=W', '--bogus'], 'unrecognized arguments'),
])
def test_cli_errors_are_one_line_and_write_nothing(argv, expected, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(pathlib.Path(__file__).parent.parent)
  argv = [a.replace('=W', f'={tmp_path / "w"}') for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('ftjax: error: ')
  assert expected in err
  assert not (tmp_path / 'w').exists()
