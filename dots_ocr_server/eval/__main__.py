"""``python -m dots_ocr_server.eval``: the ``dots-ocr-eval`` command."""
import sys

from .cli import main

sys.exit(main())
