#!/usr/bin/env python
"""Run the Ray batch job from a checkout: python scripts/ocr_batch.py INPUT... --out DIR [options]

(Installed with pip and the [batch] extra, the same program is the ``dots-ocr-batch`` command.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dots_ocr_server.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
