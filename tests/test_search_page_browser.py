"""The search page in a real headless browser (Debian's chromium, driven by Selenium).

The demo corpus is re-indexed with the tiny preset into a temporary folder and served by the
whole app with an API key. Without the key the page shows the login prompt and no result;
with it: a text query and an image-file query, result cards with thumbnails, an audio player
and captions, "more like this", the modality filter, and the note when the index moves on.

Screenshots go to $TEST_ARTIFACTS_DIR (default `test-artifacts/`); with
UPDATE_DOCS_SCREENSHOT=1 the README's docs/search-page.png is rewritten too.

`make browser-deps` installs chromium and chromium-driver (`make test` does). Without them
this module is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from helpers.pipeline import SMALL_JOB
from helpers.serve import serve_base_url, wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APP = "page-t"
PREFIX = "/page-t"
KEY = "page-test-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("TEST_ARTIFACTS_DIR") or os.path.join(ROOT, "test-artifacts")
DOCS_SCREENSHOT = os.path.join(ROOT, "docs", "search-page.png")
WAIT_S = 60

pytestmark = pytest.mark.slow


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    return ", ".join(missing) or None


# Checked at collection, before any fixture starts Ray: under CI a missing browser is an error
# of the run, elsewhere the module is skipped.
_MISSING = _browser_missing()
if _MISSING:
    _WHY = f"no headless browser: {_MISSING} missing (run `make browser-deps`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)


def chrome(width: int = 1280, height: int = 900):
    """A headless Chromium from the Debian packages; Selenium Manager is never asked."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def page(ray_session, tmp_path_factory):
    from ray import serve

    from pipelines.config import load_reindex_config
    from pipelines.demo_corpus import write_demo_corpus
    from pipelines.reindex import reindex
    from serve.app import build_app
    from serve.options import AppArgs

    work = tmp_path_factory.mktemp("page")
    corpus, root = str(work / "corpus"), str(work / "index")
    write_demo_corpus(corpus)
    over = {**SMALL_JOB, "input": corpus, "index.root": root}
    assert reindex(load_reindex_config(None, over)).status == "published"

    base = serve_base_url()
    args = AppArgs(
        preset="tiny",  # seed 0, like the job: the same model
        modalities=["text", "vision", "audio"],
        encoder={"num_cpus": 0.1, "max_batch_size": 4, "max_ongoing_requests": 8},
        ingress={"num_cpus": 0.1, "preprocess_threads": 2},
        index_uri=root,
        media_local_dirs=[corpus],
        api_key=KEY,
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    url = base + PREFIX
    wait_ready(url)
    os.makedirs(ARTIFACTS, exist_ok=True)
    driver = chrome()
    try:
        yield driver, url, corpus, root
    finally:
        driver.quit()
        serve.delete(APP)


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=what
    )


def searches(driver) -> int:
    return driver.execute_script("return window.imagebindPage.searches")


def cards(driver) -> list[dict]:
    """The result cards as the user sees them."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#results .card')].map(c => ({
            id: c.dataset.id, modality: c.dataset.modality,
            score: c.querySelector('.score').textContent,
            uri: c.querySelector('.uri').textContent,
            thumb: (() => { const i = c.querySelector('img.thumb');
                return i && i.complete && i.naturalWidth > 0
                    ? (i.classList.contains('placeholder') ? 'placeholder' : i.src) : null; })(),
            audio: (c.querySelector('audio') || {}).src || null,
            caption: (c.querySelector('.caption') || {}).textContent || null,
        }))"""
    )


def after_search(driver, before: int, what: str) -> list[dict]:
    """Wait for the search after `before` to render, and for its media to load."""
    wait(driver, lambda d: searches(d) > before, f"results of {what}")

    def loaded(d):
        got = cards(d)
        pending = [
            c
            for c in got
            if (c["modality"] == "vision" and c["thumb"] is None)
            or (c["modality"] == "audio" and c["audio"] is None)
            or (c["modality"] == "text" and c["caption"] is None)
        ]
        return got if got and not pending else None

    return wait(driver, loaded, f"media of the results of {what}")


def test_the_page_in_a_browser(page):
    from selenium.webdriver.common.by import By

    driver, url, corpus, root = page
    find = driver.find_element

    # Without the key: the login prompt, no results, nothing about the index.
    driver.get(url + "/ui/")
    wait(driver, lambda d: find(By.ID, "login").is_displayed(), "the login prompt")
    assert not find(By.ID, "app").is_displayed() and not find(By.ID, "q").is_displayed()
    assert cards(driver) == []
    assert "version" not in find(By.ID, "index-info").text
    driver.save_screenshot(os.path.join(ARTIFACTS, "search-page-login.png"))

    # A wrong key is refused and says so; the right one opens the page.
    find(By.ID, "api-key").send_keys("wrong")
    find(By.ID, "login-button").click()
    wait(driver, lambda d: find(By.ID, "login-error").is_displayed(), "the wrong-key message")
    assert not find(By.ID, "app").is_displayed() and cards(driver) == []
    find(By.ID, "api-key").send_keys(KEY)
    find(By.ID, "login-button").click()
    wait(driver, lambda d: find(By.ID, "app").is_displayed(), "the page after login")
    assert not find(By.ID, "login").is_displayed()
    assert not find(By.ID, "index-moved").is_displayed()
    wait(driver, lambda d: "Index version 1" in find(By.ID, "index-info").text, "index info")
    info = find(By.ID, "index-info").text
    assert "9 items" in info and "vision 4" in info and "+9 added" in info
    # the key lives in this tab's sessionStorage only
    assert driver.execute_script("return sessionStorage.getItem('imagebind.apiKey')") == KEY
    assert driver.execute_script("return localStorage.length") == 0

    # A text query: the caption itself comes first; thumbnails, a player and captions.
    n = searches(driver)
    find(By.ID, "q").send_keys("a dog running on the beach")
    find(By.ID, "search").click()
    got = after_search(driver, n, "the text query")
    assert got[0]["id"] == "captions/dog.txt" and got[0]["score"].startswith(("1.000", "0.999"))
    assert got[0]["caption"] == "a dog running on the beach"
    assert len(got) == 9  # top-k 12 of 9 items
    kinds = {c["modality"] for c in got}
    assert kinds == {"vision", "text", "audio"}
    for c in got:
        assert c["uri"].startswith(corpus) and c["score"]
        if c["modality"] == "vision":
            assert c["thumb"].startswith("blob:"), c
        if c["modality"] == "audio":
            assert c["audio"].startswith("blob:"), c
    driver.save_screenshot(os.path.join(ARTIFACTS, "search-page-text.png"))

    # An image file as the query: the same picture comes first.
    n = searches(driver)
    find(By.ID, "file").send_keys(os.path.join(corpus, "images", "dog.jpg"))
    got = after_search(driver, n, "the image-file query")
    assert got[0]["id"] == "images/dog.jpg" and got[0]["modality"] == "vision"
    assert "dog.jpg" in find(By.ID, "status").text

    # More like this: the item's own vector, so the item first.
    n = searches(driver)
    card = find(By.CSS_SELECTOR, '#results .card[data-id="images/city.png"]')
    card.find_element(By.CSS_SELECTOR, "button.more").click()
    got = after_search(driver, n, "more like this")
    assert got[0]["id"] == "images/city.png" and got[0]["score"].startswith(("1.000", "0.999"))

    # The modality filter re-runs the query for one kind.
    from selenium.webdriver.support.ui import Select

    n = searches(driver)
    Select(find(By.ID, "filter")).select_by_value("text")
    got = after_search(driver, n, "the text filter")
    assert len(got) == 4 and {c["modality"] for c in got} == {"text"}
    n = searches(driver)
    Select(find(By.ID, "filter")).select_by_value("")
    after_search(driver, n, "no filter")
    driver.save_screenshot(os.path.join(ARTIFACTS, "search-page.png"))

    # A second version is published: the page says the index moved on.
    _publish_copy(root)
    wait(driver, lambda d: find(By.ID, "index-moved").is_displayed(), "the moved-on note", 60)
    assert "version 1 then, 2 now" in find(By.ID, "index-moved").text

    # Logged-in search on the new version, then the docs' screenshot (a fresh page: no note).
    driver.refresh()
    wait(driver, lambda d: find(By.ID, "app").is_displayed(), "the page after reload")
    n = searches(driver)
    find(By.ID, "q").send_keys("a sunrise over a calm sea")
    find(By.ID, "search").click()
    after_search(driver, n, "the docs query")
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        driver.save_screenshot(DOCS_SCREENSHOT)


def _publish_copy(root: str) -> None:
    """Publish version 2 of `root` with the content of version 1 (a re-index without changes
    would publish nothing)."""
    from imagebind_core.index import Pointer
    from pipelines.publish import IndexRoot

    ir = IndexRoot(root)
    old, etag = ir.latest()
    name = "00000002-copy"
    shutil.copytree(ir.version_uri(old.name), ir.version_uri(name))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    ir.publish(Pointer(2, name, stamp), etag)


def test_the_page_routes_over_http(page):
    """The routes the page uses, through Serve's proxy and the route prefix."""
    import httpx

    _, url, _, _ = page
    key = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == PREFIX + "/ui/"
    r = httpx.get(url + "/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == PREFIX + "/ui/"
    r = httpx.get(url + "/ui/")  # public: the page holds no data
    assert r.status_code == 200 and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert httpx.get(url + "/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/ui/ingress.py").status_code == 404
    assert httpx.get(url + "/ui/%2e%2e%2fingress.py").status_code == 404
    q = {"id": "images/dog.jpg"}
    for path in ("/v1/index", "/v1/media", "/v1/thumbnail"):
        assert httpx.get(url + path, params=q).status_code == 401, path
    r = httpx.get(url + "/v1/thumbnail", params={**q, "size": 64}, headers=key)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = httpx.get(url + "/v1/media", params={"id": "captions/dog.txt"}, headers=key)
    assert r.status_code == 200 and r.text == "a dog running on the beach"
    r = httpx.get(url + "/v1/media", params={"id": "../../etc/passwd"}, headers=key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "item_not_found"
    r = httpx.get(url + "/v1/thumbnail", params={**q, "size": "big"}, headers=key)
    assert r.status_code == 400
