"""serve.py's page in a real browser (Debian's chromium and chromium-driver, driven by
selenium, headless): `/?q=...` lists /api/search's results in order, a click on a result shows
its attention heatmap, an image's link shows its captions, the failures view lists the worst
queries, and a `<script>` query is shown as text and never runs. Screenshots go to pytest's
temporary folder (or $SERVE_SCREENSHOTS). Skipped, with the reason, without chromium."""
import os
import shutil
import urllib.parse

import pytest

from test_serve import N_TEST, flags, serving, tiny  # noqa: F401  (the fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 30  # seconds for the page to answer (a loaded machine)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--user-data-dir=%s" % profile):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tiny):  # noqa: F811
    with serving(flags(tiny, "SGR", "--images", tiny.images, "--image_ids", tiny.ids)) as client:
        yield client


def state(driver, *wanted):
    """Wait for the page to finish (body[data-state]); returns the state."""
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return document.body.dataset.state") in wanted + ("error",))
    return driver.execute_script("return document.body.dataset.state")


def shot(driver, name, tmp_path):
    folder = os.environ.get("SERVE_SCREENSHOTS") or str(tmp_path)
    path = os.path.join(folder, name)
    assert driver.save_screenshot(path) and os.path.getsize(path) > 1000
    return path


def test_the_page_lists_the_results_shows_attention_captions_and_failures(  # noqa: F811
        browser, server, tiny, tmp_path):
    base = str(server.base_url).rstrip("/")
    q, k = tiny.captions[17], 6
    browser.get("%s/?q=%s&k=%d" % (base, urllib.parse.quote(q), k))
    assert state(browser, "search") == "search", browser.find_element(By.ID, "status").text
    api = server.get("/api/search", params={"q": q, "k": k}).json()
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert [c.get_attribute("data-index") for c in cards] == \
        [str(r["index"]) for r in api["results"]]
    assert [c.get_attribute("data-rank") for c in cards] == [str(r["rank"]) for r in
                                                              api["results"]]
    assert browser.find_element(By.ID, "query-text").text == q
    assert "exhaustive" in cards[0].text and ("%.4f" % api["results"][0]["score"]) in cards[0].text
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script(  # the images, by index
        "const imgs = [...document.querySelectorAll('#grid img')];"
        "return imgs.length === arguments[0] && imgs.every(i => i.complete && "
        "i.naturalWidth > 0 && i.src.endsWith('/api/image/' + i.closest('.card').dataset.index "
        "+ '/file'))", k))
    shot(browser, "search.png", tmp_path)

    cards[0].find_element(By.CSS_SELECTOR, ".meta").click()  # the attention heatmap
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script(
        "const i = document.getElementById('heatmap');"
        "return i.dataset.loaded === '1' && i.naturalWidth > 0"))
    assert browser.find_element(By.ID, "explain").get_attribute("open") is not None
    shot(browser, "heatmap.png", tmp_path)
    browser.find_element(By.ID, "close").click()

    first = api["results"][0]["index"]
    cards[0].find_element(By.CSS_SELECTOR, "a.to-image").click()  # the image's captions
    assert state(browser, "image") == "image"
    assert browser.current_url.endswith("/?image=%d&k=%d" % (first, k))
    ref = server.get("/api/image/%d" % first, params={"k": k}).json()
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert [c.get_attribute("data-index") for c in cards] == [str(r["index"]) for r in
                                                              ref["results"]]

    browser.find_element(By.ID, "failures-link").click()
    assert state(browser, "failures") == "failures"
    for way in ("t2i", "i2t"):
        n = min(20, N_TEST if way == "i2t" else 5 * N_TEST)
        ref = server.get("/api/failures", params={"direction": way, "n": n}).json()
        items = browser.find_elements(By.CSS_SELECTOR, "#fail-%s > li.failure" % way)
        assert [(i.get_attribute("data-query"), i.get_attribute("data-rank")) for i in items] \
            == [(str(f["query"]), str(f["rank"])) for f in ref["failures"]]
    shot(browser, "failures.png", tmp_path)
    first = browser.find_element(By.CSS_SELECTOR, "#fail-t2i > li.failure .why button")
    first.click()  # the attention of the ground-truth pair
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script(
        "const i = document.getElementById('heatmap');"
        "return i.dataset.loaded === '1' && i.naturalWidth > 0"))
    assert "the ground truth" in browser.find_element(By.ID, "explain-title").text


def test_a_script_query_is_shown_as_text_and_never_runs(browser, server):
    base = str(server.base_url).rstrip("/")
    q = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> a dog"
    browser.get("%s/?q=%s&k=3" % (base, urllib.parse.quote(q)))
    assert state(browser, "search") == "search"
    assert browser.find_element(By.ID, "query-text").text == q
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#query script, #query img")
    browser.get("%s/?q=a+dog&k=abc" % base)  # a refused request: its line, as text
    assert state(browser) == "error"
    assert browser.find_element(By.ID, "status").text.startswith("k: ")
