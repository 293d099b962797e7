"""A real browser (Debian's headless Chromium) shows an uploaded PNG by its /v1/files URL through Envoy."""

from __future__ import annotations

import hashlib
import html
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.edge.conftest import Edge, upload, wait_done

CHROMIUM = Path("/usr/bin/chromium")
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
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
    ]
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
