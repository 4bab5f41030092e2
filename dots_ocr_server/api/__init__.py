"""The HTTP side of dots-ocr-server, one module per concern; ``server.py`` assembles them. Every
route that runs the model is a thin adapter over the page service (``dots_ocr_server.pages``).

Route groups (blueprints):

- ``ocr``: the dots.ocr API document's routes, ``GET /health`` and ``POST /ocr``;
- ``openai`` (+ ``openai_schemas``): ``POST /v1/chat/completions``, ``GET /v1/models``;
- ``inspect``: ``POST /inspect``, where an answer looked on the page;
- ``ui``: ``GET /ui`` (static files in ``static/ui``), ``/ui/config``, ``/ui/render``;
- ``metrics``: ``GET /metrics`` (Prometheus), the page service's observer;
- ``openapi``: ``GET /openapi.json``, generated from the request models.

Plumbing:

- ``config``: ``ServerConfig`` and the command-line flags (``DOTS_OCR_*`` environment variables);
- ``errors``: the JSON error handlers (the error type and fixed messages: ``dots_ocr_server.errors``);
- ``schemas``: the ``/ocr`` request body (pydantic), its validation order, its ``PageRequest``;
- ``state``: the generation slots (the single processing lock at ``--max-batch-size 1``), the
  runner's background loading, the page service;
- ``http``: request plumbing every route group shares (API key, JSON body, client-gone probe);
- ``request_log``: request ids and access lines; ``serving``: waitress and the graceful shutdown;
  ``gpu_check``: the start-up check of the GPU driver.
"""
