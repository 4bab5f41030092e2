"""Measuring a deployment: ``dots-ocr-eval`` (``cli``) and what benchmarks print.

Modules: ``pages`` (files, folders, PDF pages -> the bytes sent), ``drivers`` (one page through
``POST /ocr`` or an OpenAI-compatible ``/v1/chat/completions``), ``olmocr_bench`` (olmOCR-bench
predictions and the official scorer), ``compare`` (two setups' answers, page by page),
``throughput`` (a server driven at a fixed concurrency, and its ``/metrics``), ``report``
(percentiles, tables, JSON reports), ``machine`` (the machine a figure was taken on, and the
table + JSON line of ``scripts/bench_*.py``), ``cli`` (the command line).

Client side only: nothing here imports torch (``machine`` reports it when it is installed).
"""
