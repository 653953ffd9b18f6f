"""The --routing-map page as a person sees it: rendered by headless Chromium (Debian's `chromium`, installed
here once per machine where root and apt-get allow, skipped with the reason elsewhere), its screenshot
read back pixel by pixel and its laid-out text and boxes probed, for a hand-built RoutingCounts with a
hostile file name."""

import json
import os
import re
import shutil
import struct
import subprocess
import urllib.parse
import zlib

import numpy as np
import pytest

from agent.citations import Citation, RoutingCounts
from agent.routingmap import LEVELS, PROMPT, write_routing_map

MARKUP = 'evil/<img src=x onerror="window.pwned=1">&amp;\'"<script>window.pwned=2</script>'
HOSTILE = MARKUP + "\u202egnp.\udcff\n.py"
SHOWN = MARKUP + "\\u202egnp.\\udcff\\n.py"  # bidi override, undecodable byte and newline shown escaped
ROUTING = RoutingCounts(
    per_layer={0: {3: 9, 5: 1, 7: 2}, 1: {3: 4, 7: 6, 8: 1}, 2: {5: 3, 8: 7}},
    spans={3: [("src/settings.py", 1, 14)], 5: [("src/settings.py", 15, 30), (HOSTILE, 1, 6)],
           7: [(HOSTILE, 7, 40)], 8: []},
)
FILES = ["src/settings.py", SHOWN, PROMPT]  # strongest first: 17, 12 and 8 routings
BLOCKS = ["block 3: lines 1-14", "block 5: lines 15-30", "block 5: lines 1-6", "block 7: lines 7-40", "block 8"]
CITES = [Citation(HOSTILE, 9, 12, 0.6, "routing"), Citation("src/settings.py", 4, 4, 0.4, "both")]
QUESTION = "Where is <RETRY> set & read?"
WINDOW = (1000, 900)

PROBE = """<script>
const all = s => [...document.querySelectorAll(s)];
const box = r => [r.left, r.top, r.right, r.bottom];
const textBox = e => { const r = document.createRange(); r.selectNodeContents(e); return box(r.getBoundingClientRect()); };
const labels = all("h1, thead th, th.lab, .path, .cite").map(e => ({text: e.innerText, box: textBox(e), cell: box(e.getBoundingClientRect())}));
const cells = all("td[title]").map(e => ({n: +e.title, bg: getComputedStyle(e).backgroundColor, box: box(e.getBoundingClientRect())}));
const out = {text: document.body.innerText, labels, cells, files: all(".path").map(e => e.textContent),
  blocks: all("th.lab").slice(1).map(e => e.textContent), cites: all(".cite").map(e => e.textContent),
  table: box(document.querySelector("table").getBoundingClientRect()), title: document.title,
  pwned: window.pwned === undefined ? null : window.pwned, scripts: all("script").length, imgs: all("img").length};
document.body.insertAdjacentHTML("beforeend", "<pre id=probe>" + encodeURIComponent(JSON.stringify(out)) + "</pre>");
</script>"""


@pytest.fixture(scope="module")
def chromium():
    """The chromium binary; installed with apt-get where missing and this process may (root)."""
    found = shutil.which("chromium")
    if found:
        return found
    if getattr(os, "geteuid", lambda: 1)() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed and this process cannot install it (needs root and "
                    "apt-get): run `apt-get install chromium` to render the routing map in a browser")
    def apt(*args):
        return subprocess.run(["apt-get", *args, "-y", "-q", "-o", "DPkg::Lock::Timeout=300"],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True,
                              text=True, timeout=1800)

    r = apt("install", "chromium")
    if r.returncode:  # a fresh machine may have no package lists yet
        apt("update")
        r = apt("install", "chromium")
    found = shutil.which("chromium")
    if r.returncode or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"apt-get install chromium failed (exit {r.returncode}: {tail[0]}); the Debian archive may "
                    "be unreachable")
    return found


@pytest.fixture(scope="module")
def rendered(chromium, tmp_path_factory):
    """(the page's screenshot as RGB pixels [H, W, 3], the probe's findings on the same page)."""
    tmp = tmp_path_factory.mktemp("map")
    page = tmp / "map.html"
    write_routing_map(str(page), ROUTING, question=QUESTION, about="model tiny, moba attention, block 64, top-k 3",
                      citations=CITES)
    probed = tmp / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8") + PROBE, encoding="utf-8")  # the parser puts it in the body
    shot = tmp / "shot.png"
    browse(chromium, tmp, f"--screenshot={shot}", page)
    dom = browse(chromium, tmp, "--dump-dom", probed)
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found, dom[-2000:]
    return png_pixels(shot.read_bytes()), json.loads(urllib.parse.unquote(found.group(1)))


def browse(chromium: str, tmp, action: str, page) -> str:
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                        f"--user-data-dir={tmp / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}", action,
                        page.as_uri()], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def png_pixels(data: bytes) -> np.ndarray:
    """RGB pixels [H, W, 3] of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, pos = {}, 8
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8:pos + 8 + size])
        pos += 12 + size
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and color in (2, 6) and not interlace, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    rows, prev = [], bytearray(w * bpp)
    for y in range(h):
        start = y * (w * bpp + 1)
        prev = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + w * bpp]), prev, bpp)
        rows.append(bytes(prev))
    return np.frombuffer(b"".join(rows), np.uint8).reshape(h, w, bpp)[:, :, :3]


def _unfilter(kind: int, cur: bytearray, prev: bytearray, bpp: int) -> bytearray:
    """One scanline with its PNG filter (0 none, 1 sub, 2 up, 3 average, 4 paeth) undone."""
    if kind == 2:
        return bytearray((a + b) & 255 for a, b in zip(cur, prev))
    for i in range(len(cur)) if kind else ():
        a = cur[i - bpp] if i >= bpp else 0
        b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
        if kind == 1:
            cur[i] = (cur[i] + a) & 255
        elif kind == 3:
            cur[i] = (cur[i] + (a + b) // 2) & 255
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return cur


def test_page_shows_every_routed_file_and_block_strongest_first(rendered):
    _, probe = rendered
    assert probe["files"] == FILES and probe["blocks"] == BLOCKS
    text = probe["text"]
    assert all(x in text for x in [QUESTION, "model tiny, moba attention", "darker is more", *FILES, *BLOCKS])
    assert probe["cites"] == [f"{SHOWN}:9-12", "src/settings.py:4"]
    assert probe["title"].startswith(QUESTION)


def test_hostile_file_name_stays_text(rendered):
    _, probe = rendered
    assert probe["pwned"] is None and probe["imgs"] == 0 and probe["scripts"] == 1  # only the probe runs


def test_labels_are_laid_out_without_overlap(rendered):
    _, probe = rendered
    labels = [x for x in probe["labels"] if x["text"].strip()]
    assert {*FILES, *BLOCKS, QUESTION} <= {x["text"] for x in labels}
    for x in labels:
        left, top, right, bottom = x["box"]
        assert right - left > 0 and bottom - top > 0, x
        cl, ct, cr, cb = x["cell"]
        assert cl - 1 <= left and right <= cr + 1 and ct - 1 <= top and bottom <= cb + 1, f"text spills: {x}"
    for i, x in enumerate(labels):
        for y in labels[i + 1:]:
            assert not _overlap(x["box"], y["box"]), (x, y)


def test_stronger_cells_are_darker(rendered):
    _, probe = rendered
    shade = {c["n"]: float(np.dot(rgb(c["bg"]), (0.299, 0.587, 0.114))) for c in probe["cells"]}
    counts = sorted(shade)
    assert [shade[n] for n in counts] == sorted(shade.values(), reverse=True)
    assert shade[counts[0]] - shade[counts[-1]] > 100 and len(set(shade.values())) >= LEVELS // 2


def test_screenshot_shows_the_map(rendered):
    pixels, probe = rendered
    assert pixels.shape == (WINDOW[1], WINDOW[0], 3)
    left, top, right, bottom = (round(v) for v in probe["table"])
    assert bottom <= WINDOW[1], "the map is below the first screen"
    table = pixels[top:bottom, left:right].astype(int)
    assert (np.abs(table - 255).sum(-1) > 60).mean() > 0.05  # cells and labels, not blank page
    peak = max(probe["cells"], key=lambda c: c["n"])
    pl, pt, pr, pb = (round(v) for v in peak["box"])
    inner = pixels[pt + 2:pb - 2, pl + 2:pr - 2].reshape(-1, 3).astype(int)
    drawn = (np.abs(inner - rgb(peak["bg"])).max(-1) <= 12).mean() if len(inner) else 0.0
    assert drawn > 0.9 and sum(rgb(peak["bg"])) < 300, (peak, inner[:3])  # the peak cell, dark, where laid out


def rgb(css: str) -> np.ndarray:
    """A computed CSS colour, rgb() or rgba() (composited over the white page), as RGB floats."""
    parts = [float(x) for x in re.findall(r"[\d.]+", css)]
    alpha = parts[3] if len(parts) > 3 else 1.0
    return 255 + alpha * (np.array(parts[:3]) - 255)


def _overlap(a, b, slack: float = 0.5) -> bool:
    return a[0] < b[2] - slack and b[0] < a[2] - slack and a[1] < b[3] - slack and b[1] < a[3] - slack
