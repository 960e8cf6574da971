"""The README's screenshot of `unirestorer serve`: start the app on BUNDLE, restore IMAGE in headless Chromium,
save the page as PNG.

    .venv/bin/python docs/serve_screenshot.py BUNDLE IMAGE [--out docs/serve.png] [--port 7870]
"""

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def wait(ready, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not ready():
        if time.time() > end:
            raise TimeoutError(f"the page did not get there in time: {ready.__doc__}")
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("image")
    p.add_argument("--out", default="docs/serve.png")
    p.add_argument("--port", type=int, default=7870)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    server = subprocess.Popen([sys.executable, "-m", "unirestorer.cli", "serve", "--weights", args.bundle,
                               "--port", str(args.port)])
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1250"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(args.image)
        # Gradio splits the file name into name and extension while the upload runs; its download link comes after
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, f'#upload a[download="{Path(args.image).name}"]'))
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#path-outputs img"))
        time.sleep(3)  # the slider's images finish loading
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
