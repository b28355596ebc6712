"""The static web viewer: its server, and the page in a real browser.

Headless Chromium (Debian's ``chromium`` package, ``make chromium``), driven by
Playwright, loads the page from ``nasar-zarr view`` running as a subprocess on a
converted synthetic cube. Set ``NASAR_VIEWER_SCREENSHOT=docs/viewer.png`` to
copy the screenshot artefact into the docs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nasar_zarr.cli import main
from nasar_zarr.viewer import STATIC_DIR, ViewerError, make_server, viewer_url

CHROMIUM = os.environ.get("NASAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000
RTC_RANGES = {"co": (0.15, 2.39), "cross": (0.01, 1.09)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def view_url(small_cube):
    """``nasar-zarr view CUBE --port 0 --no-browser`` as a real process; yields its URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nasar_zarr",
            "view",
            str(small_cube),
            "--port",
            "0",
            "--no-browser",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.fullmatch(
        rf"nasar-zarr viewer of {re.escape(str(small_cube))} at "
        r"(http://127\.0\.0\.1:\d+/) \(Ctrl-C stops it\)\n",
        line,
    )
    if match is None:
        proc.kill()
        pytest.fail(f"nasar-zarr view printed {line!r}; stderr: {proc.communicate()[1]}")
    yield match.group(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (0, "nasar-zarr viewer stopped\n", "")


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the viewer tests run in a real browser. Install"
            " Debian's package with `make chromium` (apt-get install -y chromium"
            " chromium-driver), or point NASAR_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def keys(cube):
    return [str(k) for k in cube["sample"].values]


def _open(browser, url: str, query: str = ""):
    """A page at ``url + query``, once #status says ready or error; records every request."""
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.requested = []
    page.errors = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + query)
    _wait(page)
    return page


def _wait(page) -> str:
    page.wait_for_function(
        "() => { const s = document.getElementById('status').textContent;"
        " return s === 'ready' || s.startsWith('error'); }",
        timeout=TIMEOUT_MS,
    )
    return page.text_content("#status")


def _channel(page, name: str) -> np.ndarray:
    raw = base64.b64decode(page.evaluate("n => window.__nasar.base64(n)", name))
    return np.frombuffer(raw, "<f4").reshape(128, 128)


# ---------------------------------------------------------------- the server


def _get(url: str, headers: dict | None = None, method: str = "GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_server_answers_byte_ranges_like_a_static_host(view_url, small_cube):
    shard = small_cube / "rtc" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    data = shard.read_bytes()
    size = len(data)
    url = f"{view_url}nasar.zarr/rtc/c/1/0/0/0/0/0"

    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], body) == (206, f"bytes 10-19/{size}", data[10:20])
    status, headers, body = _get(url, {"Range": "bytes=-20"})  # shard index: a suffix
    assert (status, headers["Content-Range"], body) == (
        206,
        f"bytes {size - 20}-{size - 1}/{size}",
        data[-20:],
    )
    status, headers, body = _get(url, {"Range": f"bytes={size - 5}-"})
    assert (status, body) == (206, data[-5:])
    status, headers, _ = _get(url, {"Range": f"bytes={size}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")
    assert _get(url, {"Range": "bytes=0-1,4-5"})[0] == 416
    status, headers, body = _get(url, method="HEAD")
    assert (status, headers["Content-Length"], headers["Accept-Ranges"], body) == (
        200,
        str(size),
        "bytes",
        b"",
    )
    assert _get(url)[2] == data

    status, headers, body = _get(f"{view_url}nasar.zarr/zarr.json")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert json.loads(body)["zarr_format"] == 3
    for path in (
        "nasar.zarr/",
        "nasar.zarr/rtc/c",
        "nasar.zarr/../index.html",
        "nasar.zarr/%2e%2e/index.html",
        "no-such-file.js",
    ):
        assert _get(view_url + path)[0] == 404, path
    status, headers, body = _get(view_url)
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert body == (STATIC_DIR / "index.html").read_bytes()


def test_page_loads_nothing_from_elsewhere():
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["data:,", "viewer.css", "viewer.js", "#"]
    bundle = (STATIC_DIR / "viewer.js").read_text()
    assert re.findall(r"https?://[a-z0-9.-]+\.[a-z]{2,}/[^\s\"'`)]*\.(?:js|wasm)", bundle) == []


def test_bundle_is_built_from_the_committed_sources():
    """viewer.js's first line holds build.mjs's sha256 of viewer/src and the lock file:
    edit the sources without `make viewer` and this fails."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "viewer"
    digest = hashlib.sha256()
    for name in ["package-lock.json", *sorted(f"src/{p.name}" for p in (root / "src").iterdir())]:
        digest.update(f"{name}\0".encode() + (root / name).read_bytes() + b"\0")
    with open(STATIC_DIR / "viewer.js") as f:
        banner = f.readline()
    assert banner.endswith(f"sources sha256 {digest.hexdigest()}\n"), "run `make viewer`"


def test_view_refuses_what_it_cannot_serve(tmp_path, capsys):
    assert main(["view", str(tmp_path), "--no-browser"]) == 2
    assert capsys.readouterr().err == (
        f"nasar-zarr view: error: {tmp_path} is not a Zarr store (no zarr.json there); convert"
        f" a corpus first: nasar-zarr convert SRC {tmp_path}\n"
    )
    assert main(["view", "s3://bucket/nasar.zarr", "--no-browser"]) == 2
    assert capsys.readouterr().err == (
        "nasar-zarr view: error: view serves a local cube, got 's3://bucket/nasar.zarr'; for a"
        " store on HTTP(S) or S3, open the page with ?store=URL (see the README, 'The"
        " viewer')\n"
    )
    assert main(["view"]) == 2
    assert capsys.readouterr().err == (
        "nasar-zarr view: error: give DEST (a local cube) or --export DIR\n"
    )


def test_taken_port_is_one_clear_error(small_cube):
    server = make_server(small_cube)
    try:
        host, port = server.server_address[:2]
        with pytest.raises(
            ViewerError,
            match=rf"^cannot listen on 127\.0\.0\.1:{port}: Address"
            r" already in use; pick another --port \(0: any free port\)$",
        ):
            make_server(small_cube, port=port)
        assert viewer_url(server, sample="a b") == f"http://{host}:{port}/?sample=a+b"
    finally:
        server.server_close()


def test_export_copies_the_page(tmp_path, capsys):
    assert main(["view", "--export", str(tmp_path / "site")]) == 0
    assert capsys.readouterr().out == (
        f"wrote index.html, viewer.css, viewer.js to {tmp_path / 'site'}: open"
        " index.html?store=URL (default ./nasar.zarr)\n"
    )
    for name in ("index.html", "viewer.css", "viewer.js"):
        assert (tmp_path / "site" / name).read_bytes() == (STATIC_DIR / name).read_bytes()


# ---------------------------------------------------------------- the page, in Chromium


def test_sample_parameter_opens_that_sample(browser, view_url, keys):
    for i in (0, 13, len(keys) - 1):
        page = _open(browser, view_url, f"?sample={keys[i]}")
        assert page.text_content("#status") == "ready"
        assert page.title() == f"nasar-zarr · {keys[i]}"
        assert page.evaluate("[window.__nasar.sample, window.__nasar.index]") == [keys[i], i]
        assert page.input_value("#key") == keys[i]
        assert page.errors == []
        assert all(u.startswith(view_url) or u.startswith("data:") for u in page.requested)
        page.close()


def test_rtc_the_page_computed_equals_the_accessor(browser, view_url, cube, keys):
    present = cube["rtc_present"].values
    i = int(np.flatnonzero(~present.all(axis=(1, 2, 3)))[0])  # a sample missing a polarization
    expected = cube.nasar.normalized().isel(sample=i).compute()
    raw = cube["rtc"].isel(sample=i).values
    page = _open(browser, view_url, f"?sample={keys[i]}")
    assert page.title() == f"nasar-zarr · {keys[i]}"

    diffs = []
    for v in (0, 1):
        for t, time in enumerate(("prime", "secondary")):
            for p, pol in enumerate(("co", "cross")):
                got = _channel(page, f"rtc/{v}/{time}/{pol}")
                want = expected["rtc"].values[v, t, p]
                # The card's formula with a correctly rounded float32 log1p: bit-exact.
                lo, hi = (np.float32(b) for b in RTC_RANGES[pol])
                x = np.multiply(raw[v, t, p], np.float32(20), dtype=np.float32)
                x = np.log1p(x.astype(np.float64)).astype(np.float32)
                np.testing.assert_array_equal(got, (np.clip(x, lo, hi) - lo) / (hi - lo))
                if not present[i, v, t, p]:  # missing polarization: exactly 0, marked missing
                    np.testing.assert_array_equal(got, np.zeros((128, 128), np.float32))
                    np.testing.assert_array_equal(want, got)
                # numpy's float32 log1p (the C library's log1pf) is not correctly rounded:
                # the accessor and the page may differ in the last bit of log1p, no more.
                diffs.append(np.abs(got.astype(np.float64) - want))
    assert max(d.max() for d in diffs) <= 2.0**-23
    assert page.locator(".panel.missing").count() == int((~present[i]).sum())

    for name in ("dem", "dem_relief", "slope"):  # no transcendental step: bit-exact
        np.testing.assert_array_equal(_channel(page, name), expected[name].values, err_msg=name)
    page.close()


def test_chooser_navigates_and_filters(browser, view_url, cube, keys):
    page = _open(browser, view_url)  # no ?sample: the first one
    assert page.title() == f"nasar-zarr · {keys[0]}"
    page.fill("#key", keys[2])  # the key search
    page.dispatch_event("#key", "change")
    assert _wait(page) == "ready"
    assert page.title() == f"nasar-zarr · {keys[2]}"
    before = page.evaluate("window.__nasar.requests")
    page.click("#next")
    assert _wait(page) == "ready"
    assert page.title() == f"nasar-zarr · {keys[3]}"
    # Same inner chunk: one request per variable (shard indexes are cached).
    assert page.evaluate("window.__nasar.requests") - before == 7
    assert page.text_content("#sample-info") == f"#3 of {len(keys)} · 7 HTTP requests"
    assert page.evaluate("location.search") == f"?sample={keys[3]}"

    page.click("#prev")
    assert _wait(page) == "ready"
    assert page.title() == f"nasar-zarr · {keys[2]}"

    cross = cube["cross_pol_available"].values.astype(bool)
    page.check("#need-cross")
    assert page.text_content("#match-count") == f"{cross.sum()} of {len(keys)} samples"
    missing = int(np.flatnonzero(~cross)[0])
    page.fill("#index", str(missing - 1))
    page.dispatch_event("#index", "change")
    assert _wait(page) == "ready"
    page.click("#next")  # skips the sample without cross-pol
    assert _wait(page) == "ready"
    nxt = int(np.flatnonzero(cross & (np.arange(len(keys)) > missing - 1))[0])
    assert page.title() == f"nasar-zarr · {keys[nxt]}"

    page.uncheck("#need-cross")
    assert page.text_content("#match-count") == f"{len(keys)} of {len(keys)} samples"
    page.fill("#index", str(len(keys) - 1))
    page.dispatch_event("#index", "change")
    assert _wait(page) == "ready"
    page.click("#next")  # wraps around
    assert _wait(page) == "ready"
    assert page.title() == f"nasar-zarr · {keys[0]}"
    page.close()


def test_bad_sample_or_store_is_reported_on_the_page(browser, view_url):
    page = _open(browser, view_url, "?sample=no-such-key")
    assert page.text_content("#status") == (
        f'error: no sample with key "no-such-key" in {view_url}nasar.zarr'
    )
    assert page.title() == "nasar-zarr viewer"
    page.close()
    page = _open(browser, view_url, "?store=missing.zarr")
    assert page.text_content("#status") == (
        f"error: no nasar-zarr cube at {view_url}missing.zarr (Not found: v3 consolidated"
        " metadata); check ?store="
    )
    page.close()


def test_screenshot_is_not_blank(browser, view_url, cube, keys, tmp_path):
    from PIL import Image

    present = cube["rtc_present"].values
    i = int(np.flatnonzero(~present.all(axis=(1, 2, 3)))[0])  # shows a missing polarization
    page = _open(browser, view_url, f"?sample={keys[i]}")
    assert page.title() == f"nasar-zarr · {keys[i]}"
    path = tmp_path / "viewer.png"
    page.screenshot(path=str(path), full_page=True)
    page.close()
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] == 1600 and image.shape[0] >= 700
    packed = image.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
    assert len(np.unique(packed)) > 1000  # speckle, colour maps, text
    assert image.std() > 20
    target = os.environ.get("NASAR_VIEWER_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)
