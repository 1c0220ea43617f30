"""Page load and query round trip of the search page (`GET /ui/`) in headless Chromium.

    .venv/bin/python benchmarks/bench_search_page.py [--rounds 10] [--out FILE]

Writes the demo corpus (`pipelines.demo_corpus`) and re-indexes it with the tiny preset into a
temporary folder (or uses --index-root/--corpus), serves it with
`serve.app:app preset=tiny index_uri=... media_local_dirs=...` on a local Ray and 127.0.0.1,
and drives Debian's chromium through Selenium (`make browser-deps`). Per round, in a fresh
page load:

- page load: from `driver.get` to the index version shown (HTML, script, style and the
  `GET /v1/index` answer), and the browser's own navigation timing (`loadEventEnd`);
- a text query, an image-file query and "More like this": from the user's action to the
  result cards in the grid, as the page measures it (embedding included), and to every
  thumbnail, player and caption of the grid loaded (timed here, polling every 5 ms).

Prints the medians, p90 and maxima with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUERIES = ["a dog running on the beach", "a city street at night", "waves", "autumn leaves"]


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,900")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def until(driver, js: str, timeout: float = 60.0, poll: float = 0.005):
    deadline = time.perf_counter() + timeout
    while True:
        got = driver.execute_script(js)
        if got:
            return got
        if time.perf_counter() > deadline:
            raise TimeoutError(js)
        time.sleep(poll)


MEDIA_LOADED = """
const cards = [...document.querySelectorAll('#results .card')];
return cards.length > 0 && cards.every(c => {
  const m = c.dataset.modality;
  if (m === 'audio') return Boolean((c.querySelector('audio') || {}).src);
  if (m === 'text') return Boolean(c.querySelector('.caption'));
  const i = c.querySelector('img');
  return Boolean(i && i.complete && i.naturalWidth > 0);
});"""


def text_query(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "q").clear()
    driver.find_element(By.ID, "q").send_keys(text)
    driver.find_element(By.ID, "search").click()


def file_query(driver, path: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(path)


def more_like_second(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#results .card:nth-child(2) button.more").click()


def query(driver, act, *args) -> tuple[float, float]:
    """(page's action-to-results ms, action-to-all-media ms) of one query."""
    before = driver.execute_script("return window.imagebindPage.searches")
    t0 = time.perf_counter()
    act(driver, *args)
    until(driver, f"return window.imagebindPage.searches > {before}")
    until(driver, MEDIA_LOADED)
    media_ms = 1e3 * (time.perf_counter() - t0)
    return driver.execute_script("return window.imagebindPage.lastQueryMs"), media_ms


def stats(xs: list[float]) -> str:
    a = np.asarray(xs)
    return (
        f"median {np.median(a):7.1f}  p90 {np.percentile(a, 90):7.1f}  max {a.max():7.1f}  "
        f"(n={len(a)})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--index-root", help="a published index of --corpus (default: built here)")
    p.add_argument("--corpus", help="the corpus folder the index was built from")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from pipelines.config import load_reindex_config
    from pipelines.demo_corpus import write_demo_corpus
    from pipelines.reindex import reindex
    from serve.app import build_app
    from serve.options import AppArgs

    work = tempfile.mkdtemp(prefix="bench-page-")
    corpus = args.corpus or os.path.join(work, "corpus")
    root = args.index_root or os.path.join(work, "index")
    if not args.index_root:
        write_demo_corpus(corpus)
        reindex(load_reindex_config(None, {"input": corpus, "index.root": root, "preset": "tiny"}))

    # address="local": always a Ray of its own, never one `ray start` left running
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = AppArgs(
        preset="tiny",
        modalities=["text", "vision", "audio"],
        index_uri=root,
        media_local_dirs=[corpus],
    )
    serve.run(build_app(app), name="bench-page", route_prefix="/")
    url = f"http://127.0.0.1:{port}/ui/"
    driver = chrome()
    load, nav, text, text_all, image, image_all, more, more_all = ([] for _ in range(8))
    try:
        for r in range(args.rounds + 1):  # round 0 warms everything up and is not counted
            t0 = time.perf_counter()
            driver.get(url)
            until(
                driver,
                "return /Index version/.test(document.getElementById('index-info').textContent)",
            )
            load_ms = 1e3 * (time.perf_counter() - t0)
            nav_ms = driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "return n.loadEventEnd - n.startTime;"
            )
            a, b = query(driver, text_query, QUERIES[r % len(QUERIES)])
            image_file = os.path.join(corpus, "images", ["dog.jpg", "city.png"][r % 2])
            c, d = query(driver, file_query, image_file)
            e, f = query(driver, more_like_second)
            if r == 0:
                continue
            for lst, v in zip(
                (load, nav, text, text_all, image, image_all, more, more_all),
                (load_ms, nav_ms, a, b, c, d, e, f),
                strict=True,
            ):
                lst.append(v)
    finally:
        driver.quit()
        serve.shutdown()
        ray.shutdown()

    lines = [
        f"search page, tiny preset, corpus of {sum(len(f) for _, _, f in os.walk(corpus))} "
        "files, "
        f"{args.rounds} rounds after a warm-up round; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}",
        "times in ms",
        f"page load to index shown        {stats(load)}",
        f"page load (navigation timing)   {stats(nav)}",
        f"text query -> results           {stats(text)}",
        f"text query -> all media shown   {stats(text_all)}",
        f"image file -> results           {stats(image)}",
        f"image file -> all media shown   {stats(image_all)}",
        f"more like this -> results       {stats(more)}",
        f"more like this -> media shown   {stats(more_all)}",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
