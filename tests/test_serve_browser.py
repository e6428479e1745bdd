"""flux serve's page (flux/serve/page.html) in a real headless browser: Debian's chromium and chromium-driver,
driven with selenium. Type a prompt, click Generate: an image of the asked size appears, with its seed; a bad size
shows the server's own message. `.ci/run` installs the browser; where it cannot be installed, these tests skip
and say why."""

import base64
import io
import shutil

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from flux.pipelines.pipeline import Pipeline  # noqa: E402
from flux.pipelines.snapshots import BUILTIN  # noqa: E402
from serving import serving  # noqa: E402

WAIT = 240  # seconds for a generation on the shared machine


def find(*names):
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = find("chromium", "chromium-browser"), find("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no chromium or chromedriver on PATH: install Debian's `chromium chromium-driver` "
                    "(apt-get install -y chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(BUILTIN, dtype=torch.float32)


def fill(browser, element_id, text):
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def test_the_page_generates_an_image_of_the_asked_size(browser, pipe):
    with serving(pipe) as (url, _):
        browser.get(url + "/")
        fill(browser, "prompt", "a lighthouse at dusk")
        fill(browser, "size", "48x32")
        fill(browser, "steps", "3")
        fill(browser, "seed", "42")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, WAIT).until(lambda b: "seed 42" in b.find_element(By.ID, "caption").text)
        source = browser.find_element(By.ID, "image").get_attribute("src")
        picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert picture.size == (48, 32) and picture.text["seed"] == "42"
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
        link = browser.find_element(By.ID, "download")
        assert link.is_displayed() and link.get_attribute("download") == "flux-42.png"


def test_the_page_shows_the_servers_message_for_a_bad_size(browser, pipe):
    with serving(pipe) as (url, _):
        browser.get(url + "/")
        fill(browser, "prompt", "a cat")
        fill(browser, "size", "100x64")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "error").text)
        assert "nearest valid size is 96" in browser.find_element(By.ID, "error").text


def test_with_a_key_the_page_asks_for_it(browser, pipe):
    with serving(pipe, api_key="sesame") as (url, _):
        browser.get(url + "/")
        assert browser.find_element(By.ID, "key").is_displayed()
        fill(browser, "prompt", "a keyed cat")
        fill(browser, "size", "32x32")
        fill(browser, "steps", "2")
        fill(browser, "key", "wrong")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "error").text)
        assert "invalid API key" in browser.find_element(By.ID, "error").text
        fill(browser, "key", "sesame")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, WAIT).until(lambda b: "seed" in b.find_element(By.ID, "caption").text)
