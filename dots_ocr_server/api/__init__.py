"""The HTTP side of dots-ocr-server, one module per concern; ``server.py`` assembles them.

- ``config``: ``ServerConfig`` and the command-line flags (``DOTS_OCR_*`` environment variables);
- ``errors``: ``RequestError``, the fixed messages of API.md, and the JSON error handlers;
- ``schemas``: the ``/ocr`` request body (pydantic) and its validation order;
- ``state``: the generation slots (the processing lock of API.md at ``--max-batch-size 1``) and
  the runner's background loading;
- ``http``: request plumbing every route group shares (API key, JSON body, client-gone probe);
- ``ocr``: the blueprint of API.md's routes, ``GET /health`` and ``POST /ocr``.
"""
