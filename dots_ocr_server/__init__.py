"""dots-ocr-server: the packages of the project besides the design card's top level
(``server.py``, ``model_runner``, ``image_utils``), under one name so that nothing generic lands
at the top of a user's site-packages.

- ``api``     the HTTP side: one blueprint per route group, the configuration, errors, serving
- ``layout``  post-processing of answers: layout JSON repair, boxes, Markdown, drawing
- ``client``  ``dots-ocr-client``: files, folders and PDFs through a running server (no torch)
- ``batch``   ``dots-ocr-batch``: a corpus on Ray actors, resumable shards

Nothing is imported here: ``import dots_ocr_server`` costs nothing and needs no extra.
"""
