"""The status page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

Skipped when Chromium or its driver is not installed (``.ci/run`` installs both when it runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from frontend.queue_control import read_control
from frontend.status_page import StatusPage

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"),
]

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201e2215bc20000000049454e44ae426082")
WAIT = 30  # seconds a page change may take at most (the page polls once a second)
START = 300  # seconds a queue job may take to load its model on a busy machine


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,1250", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, message, timeout=WAIT):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition())
    except TimeoutException:
        pytest.fail(f"{message}; the page said: {driver.find_element('tag name', 'body').text[:2000]}")


def by_css(driver, selector):
    return driver.find_elements("css selector", selector)


def row_names(driver):
    return [row.get_attribute("data-name") for row in by_css(driver, "#jobs tbody tr")]


def _job(name, state, **values):
    job = {"name": name, "state": state, "step": None, "total_steps": 40, "epoch": None, "loss": None, "lr": None,
           "it_per_s": None, "eta_seconds": None, "output_dir": None, "output_name": None, "last_saved": None,
           "samples": [], "log": None, "seconds": None, "retried": None, "reason": None}
    job.update(values)
    return job


def write_status(folder, out, step, state="running"):
    """The status document as the queue writes it: job1 running at ``step``, job2 and job3 waiting."""
    steps = list(range(1, step + 1))
    status = {"version": 1, "folder": str(folder), "pid": os.getpid(), "state": state, "started": time.time() - 9,
              "updated": time.time(), "eta_seconds": 12.0,
              "jobs": [_job("job1.json", "running", step=step, epoch=1, loss=0.1, lr=1e-4, it_per_s=4.0,
                            eta_seconds=8.0, output_dir=str(out), output_name="one",
                            samples=[str(out / "sample" / "one_000004_00.png")]),
                       _job("job2.json", "waiting"), _job("job3.json", "waiting")],
              "curve": {"job": "job1.json", "step": steps, "loss": [0.1 + 0.2 / s + 0.02 * (s % 3) for s in steps],
                        "lr": [1e-4] * len(steps)},
              "log_tail": [f"step {s}" for s in steps]}
    tmp = folder / "queue_status.json.tmp"
    tmp.write_text(json.dumps(status), encoding="utf-8")
    os.replace(tmp, folder / "queue_status.json")


def test_page_draws_the_status_and_its_buttons_reach_the_queue(browser, tmp_path):
    folder, out = tmp_path / "queue", tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    folder.mkdir()
    (out / "sample" / "one_000004_00.png").write_bytes(PNG)
    write_status(folder, out, step=3)
    with StatusPage(str(folder / "queue_status.json"), str(folder), queue=True, token="tok-123") as page:
        base = f"http://127.0.0.1:{page.port}/"
        # without the token the browser gets nothing but the refusal
        browser.get(base)
        assert "refused" in browser.find_element("tag name", "body").text
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/status", timeout=10)
        assert refused.value.code == 403

        browser.get(base + "?token=tok-123")
        bar = lambda: browser.find_element("id", "progress-bar")  # noqa: E731
        wait_for(browser, lambda: bar().get_attribute("data-step") == "3", "the running job's step 3 is not shown")
        width = bar().value_of_css_property("width")
        write_status(folder, out, step=7)
        wait_for(browser, lambda: bar().get_attribute("data-step") == "7", "the progress did not move on to step 7")
        wait_for(browser, lambda: bar().value_of_css_property("width") != width, "the progress bar did not grow")
        assert "step 7 of 40" in browser.find_element("id", "progress-text").text
        assert browser.find_element("css selector", "#loss-chart path.line").get_attribute("d").count("L") == 6
        assert "step 7" in browser.find_element("id", "log").text

        # the sample opens full size and closes with a click
        image = wait_for(browser, lambda: (by_css(browser, "#samples img") or [None])[0], "no sample image")
        wait_for(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 1,
                 "the sample image did not load")
        image.click()
        assert browser.find_element("id", "viewer").is_displayed()
        browser.find_element("id", "viewer").click()
        assert not browser.find_element("id", "viewer").is_displayed()

        # job3 up: the table and the queue's control file follow
        assert row_names(browser) == ["job1.json", "job2.json", "job3.json"]
        assert browser.find_element("css selector", 'tr[data-name="job2.json"] .move-up').get_attribute("disabled")
        browser.find_element("css selector", 'tr[data-name="job3.json"] .move-up').click()
        wait_for(browser, lambda: row_names(browser) == ["job1.json", "job3.json", "job2.json"], "job3 did not move up")
        assert read_control(str(folder)).order == ["job3.json", "job2.json"]

        stop = browser.find_element("id", "stop-button")
        assert stop.text == "Stop after this job"
        stop.click()
        wait_for(browser, lambda: read_control(str(folder)).stop_after_current, "the stop request was not written")
        wait_for(browser, lambda: "Keep going" in browser.find_element("id", "stop-button").text,
                 "the page does not show the stop request")
        assert "stops when job1.json ends" in browser.find_element("id", "stop-note").text

        write_status(folder, out, step=40, state="finished")
        wait_for(browser, lambda: not browser.find_element("id", "stop-button").is_displayed(),
                 "the buttons stay after the queue finished")
        assert browser.find_element("id", "summary").text.startswith("Finished")



# --------------------------------------------------------------------------- a real queue of tiny trainings
def save_screenshot(browser, path):
    """A small PNG of the page (256 colours), for the README."""
    import io

    from PIL import Image

    size = browser.get_window_size()
    frame = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(size["width"], browser.execute_script("return document.body.scrollHeight") + frame)
    try:
        image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    finally:
        browser.set_window_size(size["width"], size["height"])
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def start_queue(tmp_path, model, jobs):
    """``main.py --multi_run_path`` on ``jobs`` ({file name: settings}) with the page open to the network."""
    import subprocess
    import sys
    import threading

    from tests.helpers import make_dataset

    make_dataset(tmp_path / "data", count=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape, red, circle --w 64 --h 64 --d 1 --s 4\n"
                       "sks shape, blue, circle --w 64 --h 64 --d 2 --s 4\n", encoding="utf-8")
    queue = tmp_path / "queue"
    queue.mkdir()
    common = {"base_model": str(model), "img_folder": str(tmp_path / "data"), "output_folder": str(tmp_path / "out"),
              "tokenizer_cache_dir": str(model / "tokenizer"), "train_resolution": 64, "min_bucket_resolution": 64,
              "max_bucket_resolution": 128, "bucket_reso_steps": 32, "batch_size": 1, "net_dim": 4, "alpha": 2,
              "clip_skip": 1, "optimizer_type": "AdamW", "mixed_precision": "no", "xformers": False,
              "cache_latents": True, "learning_rate": 1e-3, "sample_prompts": str(prompts)}
    for name, settings in jobs.items():
        (queue / name).write_text(json.dumps({**common, "change_output_name": name[:-5], **settings}), encoding="utf-8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, os.path.join(root, "main.py"), "--multi_run_path", str(queue), "--status_port", "0",
         "--status_listen", "0.0.0.0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
        errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    address: list[str] = []
    found = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("status page: ") and not found.is_set():
                address.append(line.split(": ", 1)[1].strip())
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(120)
    return process, queue, (address or [None])[0], lines


def test_a_real_queue_watched_in_the_browser_stops_after_the_running_job(browser, tmp_path, tiny_sd1_diffusers):
    from urllib.parse import parse_qs, urlsplit

    jobs = {"1_first.json": {"max_steps": 40, "sample_every_n_steps": 10},
            "2_second.json": {"max_steps": 8}, "3_third.json": {"max_steps": 8}}
    process, queue, url, lines = start_queue(tmp_path, tiny_sd1_diffusers, jobs)
    try:
        assert url, "no status page address printed:\n" + "".join(lines)[-3000:]
        token = parse_qs(urlsplit(url).query)["token"][0]
        port = urlsplit(url).port
        local = f"http://127.0.0.1:{port}/"
        # listening beyond this computer: a request without the token is refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(local + "api/status", timeout=10)
        assert refused.value.code == 403
        browser.get(local)
        assert "refused" in browser.find_element("tag name", "body").text

        browser.get(f"{local}?token={token}")
        step = lambda: int(browser.find_element("id", "progress-bar").get_attribute("data-step") or 0)  # noqa: E731
        wait_for(browser, lambda: step() > 0, "no running job's progress shown", timeout=START)
        first = step()
        wait_for(browser, lambda: step() > first, "the running job's progress did not change")
        wait_for(browser, lambda: step() >= 20 and by_css(browser, "#samples img"), "no sample images shown")
        shot = save_screenshot(browser, tmp_path / "status_page.png")
        if os.environ.get("STATUS_PAGE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["STATUS_PAGE_SCREENSHOT"])

        running = browser.find_element("id", "current-name").text
        browser.find_element("id", "stop-button").click()
        wait_for(browser, lambda: "Keep going" in browser.find_element("id", "stop-button").text,
                 "the page does not show the stop request")
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines)[-4000:]
    names = list(jobs)
    ran, left = names[:names.index(running) + 1], names[names.index(running) + 1:]
    assert left, f"the stop was pressed during the last job {running}"
    assert code == 130, output  # stopped before the end
    assert sorted(os.listdir(queue / "complete")) == sorted([*ran, *(n[:-5] + ".log" for n in ran)]), output
    for name in left:
        assert (queue / name).is_file(), output  # still queued for the next run
    status = json.loads((queue / "queue_status.json").read_text(encoding="utf-8"))
    assert status["state"] == "finished"
    assert {job["name"]: job["state"] for job in status["jobs"]} == {
        **{name: "complete" for name in ran}, **{name: "waiting" for name in left}}
