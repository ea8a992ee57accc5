"""Write scikit-learn's bundled handwritten digits as an image folder (no download needed).

  python scripts/make_digits_folder.py --out=DIR [--size=32]

Writes DIR/<digit>/<index>.png: 1797 RGB images of size x size, ready for
`--config.data.source=DIR` of an image classification config. A complete folder is left as is.
"""

import argparse
import sys

from ftjax.data import images
from ftjax.errors import FtjaxError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='folder to write the class folders into')
  parser.add_argument('--size', type=int, default=32, help='side of the square images, pixels')
  args = parser.parse_args(argv)
  try:
    out = images.write_digits_folder(args.out, size=args.size)
  except FtjaxError as e:
    print(f'ftjax: error: {e}', file=sys.stderr)
    return 2
  print(f'{images.NUM_DIGITS} digit images ({args.size}x{args.size}) in {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
