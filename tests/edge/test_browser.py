"""A real browser (Debian's headless Chromium) through Envoy: an uploaded PNG shown by its /v1/files URL;
the upload page at / uploading a file; a <video> playing and seeking an uploaded MP4 (Range requests);
a cached download revalidated with If-None-Match (304). The last three drive Chromium over the DevTools
protocol (tests/edge/cdp.py) and read what happened from its network events and Envoy's access log."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.edge.cdp import CHROMIUM, HEADLESS, Browser
from tests.edge.conftest import SECRET, Edge, upload, wait_done
from tests.helpers import wait_until

FFMPEG = shutil.which("ffmpeg")
VIDEO_SECONDS = 8
WIDTH, HEIGHT = 64, 48
# Quadrant colours the page reads back from the decoded image.
COLOURS = {"tl": (230, 30, 40), "tr": (20, 200, 60), "bl": (30, 60, 220), "br": (250, 250, 250)}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); apt-get install chromium"
)


def png(width: int, height: int) -> bytes:
    """An RGB PNG with four coloured quadrants, written with zlib alone."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            quad = ("t" if y < height // 2 else "b") + ("l" if x < width // 2 else "r")
            row += bytes(COLOURS[quad])
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>loading</title></head>
<body>
<h1>gridstor through Envoy</h1>
<img id="img" src="/v1/files/{file_id}" alt="uploaded PNG">
<canvas id="canvas"></canvas>
<pre id="result">pending</pre>
<script>
async function main() {{
  const img = document.getElementById("img");
  await img.decode();
  const canvas = document.getElementById("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
  const w = img.naturalWidth, h = img.naturalHeight;
  const resp = await fetch("/v1/files/{file_id}");
  const buf = await resp.arrayBuffer();
  const digest = await crypto.subtle.digest("SHA-256", buf);
  const hex = Array.from(new Uint8Array(digest)).map(b => b.toString(16).padStart(2, "0")).join("");
  document.getElementById("result").textContent = JSON.stringify({{
    width: w, height: h, type: resp.headers.get("content-type"), bytes: buf.byteLength, sha256: hex,
    tl: px(1, 1), tr: px(w - 2, 1), bl: px(1, h - 2), br: px(w - 2, h - 2)
  }});
  document.title = "done";
}}
main().catch(e => {{ document.getElementById("result").textContent = "ERROR " + e; document.title = "error"; }});
</script>
</body></html>
"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [*HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=90, check=False)


def test_page_shows_uploaded_png_and_bytes_match(edge: Edge, tmp_path: Path) -> None:
    image = png(WIDTH, HEIGHT)
    reply = upload(edge, image, "picture.png", content_type="image/png")
    file_id = wait_done(edge, reply["job"])["file_id"]
    assert file_id.endswith(".png")
    (edge.www / "index.html").write_text(PAGE.format(file_id=file_id))
    url = f"{edge.base}/test-page/index.html"

    done = chromium(tmp_path, "--dump-dom", url)
    match = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no result (chromium exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    text = html.unescape(match.group(1))
    assert not text.startswith(("ERROR", "pending")), text
    result = json.loads(text)
    assert (result["width"], result["height"]) == (WIDTH, HEIGHT)
    assert result["type"] == "image/png"
    assert result["bytes"] == len(image)
    assert result["sha256"] == hashlib.sha256(image).hexdigest()
    for corner, colour in COLOURS.items():
        assert tuple(result[corner]) == colour, corner

    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=640,400", url)
    assert shot.is_file() and shot.stat().st_size > 1000


# -- driven over the DevTools protocol ------------------------------------------------------------------


def wait_for(expression: str, ms: int = 45_000) -> str:
    """JavaScript: a promise of ``expression``'s value once it is truthy (checked every 50 ms in the page)."""
    return f"""new Promise((resolve, reject) => {{
  const t0 = Date.now();
  (function poll() {{
    let v;
    try {{ v = {expression}; }} catch (e) {{ v = undefined; }}
    if (v) return resolve(v);
    const what = {json.dumps(expression)};
    const late = Date.now() - t0 > {ms};
    if (late) return reject(new Error("timed out waiting for " + what + ": " + document.body.innerText));
    setTimeout(poll, 50);
  }})();
}})"""


def access_log(edge: Edge, path: str) -> list[dict[str, Any]]:
    """Envoy's access log entries for requests to ``path`` (the JSON lines of the edge's log)."""
    assert edge.gw.envoy_log is not None
    found = []
    for line in edge.gw.envoy_log.read_text().splitlines():
        if line.startswith("{") and f'"path":"{path}"' in line:
            found.append(json.loads(line))
    return found


def responses(browser: Browser, url: str) -> list[dict[str, Any]]:
    """The responses Chromium's network layer saw for ``url`` (Network.responseReceived), in order."""
    return [
        e["params"]["response"]
        for e in browser.events
        if e["method"] == "Network.responseReceived" and e["params"]["response"]["url"] == url
    ]


def blank_page(edge: Edge) -> str:
    """A same-origin empty page (served under /test-page/) to run a test's script in."""
    (edge.www / "blank.html").write_text("<!doctype html><html><head><title>blank</title></head><body></body></html>")
    return f"{edge.base}/test-page/blank.html"


def test_upload_page_uploads_a_picked_file_and_shows_its_link(edge: Edge, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    picked = tmp_path / "From the page.dat"
    picked.write_bytes(data)
    with Browser(tmp_path / "profile") as browser:
        browser.navigate(f"{edge.base}/")
        assert browser.evaluate("document.body.dataset.mode") == "secret"
        assert browser.evaluate("!document.getElementById('auth').hidden")
        # Secret mode: the page gets a token with the secret (POST /v1/auth).
        browser.evaluate(
            f"document.getElementById('secret').value = {json.dumps(SECRET)};"
            " document.getElementById('get-token').click()"
        )
        token = browser.evaluate(wait_for("document.getElementById('token').value"))
        assert token.count(".") == 2
        # Pick the file, as the file dialog would.
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(picked)], nodeId=node)
        href = browser.evaluate(wait_for("document.querySelector('.file-link')?.getAttribute('href')"))
        progress = browser.evaluate("document.querySelector('#uploads progress').value")
        rows = browser.evaluate("document.querySelectorAll('#uploads li').length")
    match = re.fullmatch(r"/v1/files/([0-9a-f]{56}\.dat)", href)
    assert match, href
    assert progress == 1 and rows == 1
    got = edge.request("GET", href)
    assert got.status == 200 and got.body == data


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An H.264 MP4 made by ffmpeg, its index (moov) at the end as ffmpeg writes it: playing needs Range."""
    if FFMPEG is None:
        pytest.skip("ffmpeg not installed (Debian package ffmpeg; make test installs it)")
    out = tmp_path_factory.mktemp("video") / "clip.mp4"
    subprocess.run(
        [FFMPEG, "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={VIDEO_SECONDS}",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-b:v", "2M", "-g", "25", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    data = out.read_bytes()
    assert data.rfind(b"moov") > data.find(b"mdat") > 0, "ffmpeg put the index first"
    return data


VIDEO_JS = """(async () => {
  const v = document.createElement("video");
  v.muted = true;
  v.src = %s;
  document.body.append(v);
  const once = (name) => new Promise((resolve, reject) => {
    v.addEventListener(name, resolve, { once: true });
    v.addEventListener("error", () => reject(new Error("video error " + (v.error && v.error.message))), { once: true });
  });
  await once("loadedmetadata");
  const until = (ok) => new Promise((resolve) => {
    const check = () => ok() ? resolve() : setTimeout(check, 50);
    check();
  });
  await v.play();
  await until(() => v.currentTime > 0.3);
  const played = v.currentTime;
  const target = v.duration - 1.5;
  // where the seek landed, read when it lands (the video plays on: later, a loaded machine would see it further)
  const seeked = new Promise((resolve) => v.addEventListener("seeked", () => resolve(v.currentTime), { once: true }));
  v.currentTime = target;
  const at = await seeked;
  await until(() => v.readyState >= 2);
  return { duration: v.duration, played, target, at, width: v.videoWidth, height: v.videoHeight };
})()"""


def test_video_plays_and_seeks_in_an_uploaded_mp4(edge: Edge, mp4: bytes, tmp_path: Path) -> None:
    file_id = wait_done(edge, upload(edge, mp4, "clip.mp4", content_type="video/mp4")["job"])["file_id"]
    url = f"{edge.base}/v1/files/{file_id}"
    with Browser(tmp_path / "profile") as browser:
        browser.call("Network.enable")
        browser.navigate(blank_page(edge))
        result = browser.evaluate(VIDEO_JS % json.dumps(url), timeout=90)
        seen = responses(browser, url)
    assert abs(result["duration"] - VIDEO_SECONDS) < 0.5, result
    assert result["played"] > 0.3 and (result["width"], result["height"]) == (640, 360), result
    assert abs(result["at"] - result["target"]) < 0.5, result
    assert seen and all(r["status"] == 206 for r in seen), [r["status"] for r in seen]
    assert all(r["headers"].get("content-type") == "video/mp4" for r in seen)
    # Envoy saw ranged reads: the index at the end of the file is fetched by a range of its own. Chromium
    # may also revalidate a part it cached with If-None-Match and a Range: that is a 304 (RFC 9110 13.2.2).
    path = f"/v1/files/{file_id}"
    wait_until(lambda: len(access_log(edge, path)) >= len(seen), "the video's requests in Envoy's access log")
    # A range the seek made useless may be cancelled by Chromium before its answer: Envoy logs it as 0 with
    # DC (downstream connection termination), never as an error status.
    entries = access_log(edge, path)
    statuses = [e["status"] for e in entries if not (e["status"] == 0 and "DC" in e["flags"])]
    assert statuses.count(206) >= 2 and set(statuses) <= {206, 304}, entries


REVALIDATE_JS = """(async () => {
  const first = await fetch(%(url)s);
  const a = await first.arrayBuffer();
  const second = await fetch(%(url)s, { cache: "no-cache" });  // revalidate what the cache holds
  const b = await second.arrayBuffer();
  const same = a.byteLength === b.byteLength && new Uint8Array(a).every((x, i) => x === new Uint8Array(b)[i]);
  return { first: first.status, etag: first.headers.get("etag"), second: second.status, bytes: b.byteLength, same };
})()"""


def test_browser_revalidates_a_cached_download_and_gets_304(edge: Edge, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    file_id = wait_done(edge, upload(edge, data, "cached.bin")["job"])["file_id"]
    url = f"{edge.base}/v1/files/{file_id}"
    with Browser(tmp_path / "profile") as browser:
        browser.call("Network.enable")
        browser.navigate(blank_page(edge))
        result = browser.evaluate(REVALIDATE_JS % {"url": json.dumps(url)})
        sent = [e["params"]["headers"] for e in browser.events if e["method"] == "Network.requestWillBeSentExtraInfo"]
        raw = [e["params"] for e in browser.events if e["method"] == "Network.responseReceivedExtraInfo"]
    # The page sees the cached body (200 to fetch); on the wire it was a conditional request and a 304.
    assert result == {"first": 200, "etag": f'"{file_id[:56]}"', "second": 200, "bytes": len(data), "same": True}
    assert [h.get("If-None-Match") for h in sent if "If-None-Match" in h] == [result["etag"]], sent
    assert [r["statusCode"] for r in raw if r["headers"].get("etag") == result["etag"]] == [200, 304]
    wait_until(lambda: len(access_log(edge, f"/v1/files/{file_id}")) == 2, "both requests in Envoy's access log")
    assert [e["status"] for e in access_log(edge, f"/v1/files/{file_id}")] == [200, 304]
