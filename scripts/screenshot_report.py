#!/usr/bin/env python3
"""Render a distillkit report (or any HTML file) in headless Chromium and save a screenshot.

    python scripts/screenshot_report.py runs/eye_m3/report/report.html report.png [--size 1400,3000]

Checks that the page renders in a real browser (the figures are embedded, so nothing is
fetched). Exits with status 3 when no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
NO_BROWSER = 3


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(html: Path, png: Path, size: str = "1400,3000", timeout: float = 120) -> Path:
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--screenshot={png}", f"--window-size={size}", html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--size", default="1400,3000", help="window width,height in pixels")
    args = parser.parse_args()
    if not args.html.is_file():
        print(f"error: {args.html} does not exist", file=sys.stderr)
        return 2
    try:
        path = screenshot(args.html, args.png, args.size)
    except FileNotFoundError as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return NO_BROWSER
    print(f"screenshot: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
