"""A real ``recognite serve`` process: HTTP from outside, a browser, and ``kill -9`` mid-enrolment."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from recognite.gallery import GalleryIndex

from ._server import request, start_server
from .conftest import API_KEY, noise, png_bytes, red, stripes


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    key_file = root / "key.txt"
    key_file.write_text(API_KEY + "\n")
    proc, url = start_server(bundle_dir, root / "gallery.safetensors", key_file)
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def test_a_real_server_answers_over_http(server):
    url, root = server
    status, body = request(url + "/v1/gallery/red", "POST", [("images", "r.png", png_bytes(red()))], key=API_KEY)
    assert status == 201 and body["added"] == 1
    status, body = request(url + "/v1/recognize", "POST", [("images", "q.png", png_bytes(red())), ("top_k", "", b"1")])
    assert status == 200 and body["results"][0]["prediction"] == "red"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    status, body = request(url + "/v1/gallery/red", "DELETE")
    assert status == 401
    assert GalleryIndex.load(root / "gallery.safetensors").label_counts()["red"] == 1


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (`.ci/run` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_web_page_recognises_and_enrols(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    request(url + "/v1/gallery/red", "POST", [("images", "r.png", png_bytes(red()))], key=API_KEY)
    red_file, stripes_file = tmp_path / "red.png", tmp_path / "stripes.png"
    red_file.write_bytes(png_bytes(red()))
    stripes_file.write_bytes(png_bytes(stripes()))
    browser = _browser()
    try:
        browser.get(url + "/")

        def until(condition, what: str) -> None:
            try:
                WebDriverWait(browser, 90).until(lambda b: condition())
            except Exception:  # noqa: BLE001 - report what the page showed
                shown = {name: browser.find_element(By.ID, name).text for name in ("status", "decision", "error", "enrolled")}
                raise AssertionError(f"the page never showed {what}; it shows {shown}") from None

        def top_score() -> str:
            cells = browser.find_elements(By.CSS_SELECTOR, "#results td.score")
            return cells[0].text if cells else ""

        decision = browser.find_element(By.ID, "decision")
        until(lambda: "labels" in browser.find_element(By.ID, "status").text, "the gallery status")
        browser.find_element(By.ID, "file").send_keys(str(red_file))
        until(lambda: decision.text == "red" and top_score() == "1.0000", "red recognised")
        browser.find_element(By.ID, "file").send_keys(str(stripes_file))
        until(lambda: top_score() not in ("", "1.0000"), "the stripes image scored against red")
        label = f"stripes-{random.randrange(10**6)}"
        browser.find_element(By.ID, "label").send_keys(label)
        browser.find_element(By.ID, "key").send_keys(API_KEY)
        browser.find_element(By.ID, "enrol").click()
        until(lambda: "Enrolled" in browser.find_element(By.ID, "enrolled").text, "the enrolment")
        until(lambda: decision.text == label and top_score() == "1.0000", "the enrolled label recognised")
        assert browser.find_element(By.ID, "error").text == ""
        if os.environ.get("RECOGNITE_SCREENSHOT"):
            browser.save_screenshot(os.environ["RECOGNITE_SCREENSHOT"])
    finally:
        browser.quit()


def test_kill_9_keeps_every_acknowledged_enrolment(bundle_dir, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(API_KEY)
    gallery = tmp_path / "gallery.safetensors"
    proc, url = start_server(bundle_dir, gallery, key_file)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    images = [png_bytes(noise(seed)) for seed in range(4)]

    def client(worker: int) -> None:
        step = 0
        while not stop.is_set():
            label = f"c{worker}-{step}"
            try:
                status, _ = request(url + "/v1/gallery/" + urllib.parse.quote(label), "POST",
                                    [("images", "x.png", images[worker])], key=API_KEY, timeout=10)
            except OSError:
                return  # the server is gone
            if status == 201:
                with lock:
                    acknowledged.append(label)
            step += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(random.uniform(1.5, 3.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for thread in threads:
        thread.join()
    assert len(acknowledged) >= 4, "too few enrolments before the kill to test anything"
    on_disk = GalleryIndex.load(gallery)  # loads: never half-written
    assert set(acknowledged) <= set(on_disk.labels)
    proc, url = start_server(bundle_dir, gallery, key_file)  # and the restarted service serves them
    try:
        status, listing = request(url + "/v1/gallery")
        assert status == 200 and set(acknowledged) <= {entry["label"] for entry in listing["counts"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
