"""Read the data files a user passes (calibration, training data, ``routes --input``) so that a
corrupt, truncated or decompression-bomb image, or text that is not UTF-8, is a one-line
:class:`UsageError` naming the file.

    >>> open_image("digits/0/a.png", "L").size          # doctest: +SKIP
    (28, 28)
    >>> read_utf8(Path("notes.txt"))[:5]                 # doctest: +SKIP
    'Hello'
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ckptforge.errors import UsageError


def open_image(path: str | os.PathLike[str], mode: str) -> Any:
    """The decoded image at ``path`` converted to ``mode`` ("L" or "RGB").

    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is enforced as an error, not
    a warning, so a tiny file that decodes into gigabytes is refused before it is decoded.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UsageError(f"image '{path}' has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                             "(a decompression bomb?); remove it or pass a smaller image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"image '{Path(path)}' cannot be decoded ({reason[:120]}); remove or replace it") from None


def read_utf8(path: Path) -> str:
    """The whole text of ``path``; :class:`UsageError` when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"'{path}' is not UTF-8 text (invalid byte at position {exc.start}); save it as UTF-8") from None
