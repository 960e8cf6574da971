"""`unirestorer serve` in a real headless Chromium (Selenium) and through gradio_client: the download is the
file `unirestorer restore` writes, byte for byte; picking the root on the path shows the root's output."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from unirestorer.cli import main

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium/chromedriver not installed here "
                                   "(.ci/run installs Debian's chromium and chromium-driver)")
pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def server(tiny_bundle, server_log, tmp_path_factory):
    """The app on a free port of 127.0.0.1, as the README starts it."""
    port, log = free_port(), server_log
    cwd, tmp = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmp")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unirestorer.cli", "serve", "--weights", tiny_bundle,
                                 "--port", str(port), "--tile", "32", "--overlap", "8"], stdout=out, stderr=out,
                                cwd=cwd, env={**os.environ, "TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
    # nothing written outside its temporary folder, and that folder deleted on exit
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == [], (list(cwd.iterdir()), list(tmp.iterdir()))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A dark photo: it lies inside the tiny tree's support, so it is restored below the root (an image of
    uniform noise lies outside it, falls back to the root, and picking the root would then change nothing)."""
    path = tmp_path_factory.mktemp("photo") / "p.png"
    rgb = (np.random.default_rng(5).random((56, 72, 3)) * 0.6 + 0.2) * 0.2
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def restored(bundle: str, photo: Path, out: Path, *extra: str) -> bytes:
    """What `unirestorer restore` writes for the photo with the app's settings."""
    assert main(["restore", "--weights", bundle, "--input", str(photo), "--output", str(out), "--tile", "32",
                 "--overlap", "8", "--device", "cpu", *extra]) == 0
    return (out / photo.name).read_bytes()


@pytest.fixture(scope="module")
def routed(tiny_bundle, photo, tmp_path_factory) -> tuple[bytes, dict]:
    """`unirestorer restore --explain --json` on the photo, run once: (image bytes, its record)."""
    out = tmp_path_factory.mktemp("routed")
    image = restored(tiny_bundle, photo, out, "--explain", "--json")
    return image, json.loads((out / f"{photo.name}.json").read_text())


@pytest.fixture(scope="module")
def page(server, server_log, photo, tmp_path_factory):
    """Headless Chromium on the app, the photo uploaded and restored (once: the page is slow to load on 2 cores)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for a failure's message
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        opts.add_argument(arg)
    downloads = tmp_path_factory.mktemp("downloads")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.downloads = downloads
    try:
        try:
            upload_and_restore(driver, server, photo)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- server log ---\n{server_log.read_text()[-3000:]}") from None
        yield driver
    finally:
        driver.quit()


def wait_for(fn, what: str, driver=None, timeout: float = 60):
    """fn()'s first truthy value, polled; on timeout an error naming `what`, with the page's text and console."""
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    msg = f"timed out after {timeout:.0f} s waiting for {what}"
    if driver is not None:
        from selenium.webdriver.common.by import By

        msg += (f"\n--- page text ---\n{driver.find_element(By.TAG_NAME, 'body').text[:3000]}"
                f"\n--- browser console ---\n" + "\n".join(e["message"] for e in driver.get_log("browser")))
    raise AssertionError(msg)


def download(driver) -> bytes:
    """Click the download button and return the file it saves."""
    from selenium.webdriver.common.by import By

    for f in driver.downloads.glob("*"):
        f.unlink()
    driver.find_element(By.CSS_SELECTOR, "#download").click()
    done = wait_for(lambda: list(driver.downloads.glob("*.png")), "the downloaded PNG", driver)
    return done[0].read_bytes()


def upload_and_restore(driver, url: str, photo: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the page", driver, 120)
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(photo))
    # Uploaded: the file's row links to the server's copy. Not the widget's text: Gradio 6 shows the name as
    # "p" and ".png" in two cells ("p\n.png"); "p.png" appears only in the transient "Uploading 1 file..." view.
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f'#upload a[download="{photo.name}"]'), "the upload",
             driver)
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#path-outputs img"), "the path outputs", driver, 120)


@needs_browser
def test_browser_download_is_restores_png(page, photo, tiny_bundle, tmp_path):
    assert download(page) == restored(tiny_bundle, photo, tmp_path / "cli")


@needs_browser
def test_browser_picking_the_root_shows_its_output(page, photo, tiny_bundle, routed, tmp_path):
    from selenium.webdriver.common.by import By

    (image, record), path, ran = routed, routed[1]["path"], routed[1]["ran"]
    assert ran != path[0], f"the photo must be restored below the root for this test to mean anything: {record}"

    def why() -> str:
        return page.find_element(By.CSS_SELECTOR, "#why").text

    page.find_elements(By.CSS_SELECTOR, "#path-outputs img")[0].click()  # the path starts at the root
    wait_for(lambda: f"Restored by node {path[0]}" in why(), "the root to become the result", page)
    root = download(page)
    assert root == restored(tiny_bundle, photo, tmp_path / "root", "--level", "0") and root != image
    page.find_elements(By.CSS_SELECTOR, "#path-outputs img")[path.index(ran)].click()  # and back
    wait_for(lambda: f"Restored by node {ran}" in why(), f"node {ran} to become the result again", page)
    assert download(page) == image


def test_api_restore_through_gradio_client(server, photo, routed):
    from gradio_client import Client, handle_file

    image, record = Client(server, verbose=False).predict(handle_file(str(photo)), "auto", api_name="/restore")
    assert Path(image).read_bytes() == routed[0]
    assert record == {k: v for k, v in routed[1].items() if k != "output"}
