"""The README's picture of a run's page: `report.html` opened in headless Chromium and saved as a PNG.

    python docs/screenshot.py RUN_DIR/report.html docs/report_page.png [--width 1100] [--height 1500]
    python docs/screenshot.py RUN_DIR/report.html docs/concept_page.png --anchor concept-ID

Needs Debian's `chromium` and `chromium-driver` and the dev extra's selenium (as the browser test does).
The page is opened from disk; the picture is the top of the page (or of the part `--anchor` opens, such as
a concept's page) at that window size. The test suite never
writes it, so CI leaves the tree clean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a report.html")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--anchor", default="", help="open the page at this #anchor, e.g. concept-219")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(
            f"screenshot: {args.page} is not a file; run `cocomix run` (or `run --from report`) first",
            file=sys.stderr,
        )
        return 2
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        print(
            "screenshot: needs chromium and chromedriver: apt-get install chromium chromium-driver",
            file=sys.stderr,
        )
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={args.width},{args.height}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(args.page.resolve().as_uri() + (f"#{args.anchor}" if args.anchor else ""))
        if args.anchor:  # the load may end before the browser scrolls to the fragment
            driver.execute_script(f"document.getElementById({args.anchor!r}).scrollIntoView();")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(f"screenshot: {args.out} ({args.width}x{args.height}) of {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
