"""Screenshot the report of the embedded example with headless Chromium (for docs/images/).

Usage: ``python scripts/report_screenshot.py [OUTPUT_DIR] [--out docs/images/report.png]``.
Without ``OUTPUT_DIR`` it writes the example dataset and runs ``m2m ... participant`` on it in a
temporary folder (a few minutes on 2 cores); with one, it reuses that output folder
(``sub-MNI152.html`` in it). Needs Debian's ``chromium`` and ``chromium-driver`` and selenium.
The screenshot is the whole page at 1200 px wide, once the interactive viewer has loaded (software
WebGL2: SwiftShader), the T1w/FA toggle showing FA, saved with a 256-colour palette to keep the
file small.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

LOGGER = logging.getLogger("report_screenshot")
EXAMPLE_PAGE = "sub-MNI152.html"


def run_example(root: Path) -> Path:
    """Write the example dataset under ``root`` and run the app on it; returns the output folder."""
    out = root / "out"
    for args in (
        ["example-data", root / "example"],
        [root / "example", out, "participant", "-w", root / "work", "--nprocs", "1", "--omp-nthreads", "2"],
    ):
        subprocess.run([sys.executable, "-m", "m2m_app.cli.run", *map(str, args)], check=True)
    return out


def screenshot(page: Path, target: Path, width: int = 1200) -> Path:
    """Save a full-page PNG of ``page`` rendered by headless Chromium at ``width`` CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--use-gl=angle",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--window-size={width},900",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(page.resolve().as_uri())
        WebDriverWait(browser, 300).until(
            lambda b: b.execute_script("return document.getElementById('viewer-status').dataset.state") != "loading"
        )
        browser.execute_script("document.getElementById('fa-toggle-switch').click();")
        height, chrome = browser.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight];"
        )
        browser.set_window_size(width, height + chrome)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    finally:
        browser.quit()
    LOGGER.info("wrote %s (%d px high)", target, height)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", nargs="?", type=Path, help="an existing output folder of the example")
    parser.add_argument("--out", type=Path, default=Path("docs/images/report.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or run_example(Path(tmp))
        screenshot(out / EXAMPLE_PAGE, args.out)


if __name__ == "__main__":
    main()
