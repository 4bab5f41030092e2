"""The official olmOCR-bench scorer (``olmocr.bench.benchmark.main``, its own arguments) with a
browser of the caller's choosing: ``python -m dots_ocr_server.eval.scorer_main CHROMIUM ARGS...``.

The scorer's math tests render LaTeX with KaTeX in headless Chromium through Playwright, which
launches the browser build that ``python -m playwright install chromium`` downloads. Where that
download is impossible (offline machines, CI), this entry point makes Playwright launch the given
executable instead (e.g. Debian's ``/usr/bin/chromium``); nothing else of the scorer changes.
``olmocr_bench.run_scorer`` uses it only when a browser is named.
"""
from __future__ import annotations

import sys


def use_browser(executable: str) -> None:
    """Every Playwright Chromium launch in this process uses ``executable`` unless told otherwise."""
    from playwright.sync_api import BrowserType

    launch = BrowserType.launch

    def launch_with(self, *args, **kwargs):
        kwargs.setdefault("executable_path", executable)
        return launch(self, *args, **kwargs)

    BrowserType.launch = launch_with


def main(argv: list[str]) -> None:
    executable, *scorer_args = argv
    use_browser(executable)
    from olmocr.bench.benchmark import main as score

    sys.argv = ["olmocr.bench.benchmark", *scorer_args]
    score()


if __name__ == "__main__":
    main(sys.argv[1:])
