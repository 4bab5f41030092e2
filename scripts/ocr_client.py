#!/usr/bin/env python
"""Run the dots-ocr-server client from a checkout: python scripts/ocr_client.py INPUT... [options]

(Installed with pip, the same program is the ``dots-ocr-client`` command.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dots_ocr_server.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
