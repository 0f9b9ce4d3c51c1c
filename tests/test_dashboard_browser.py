"""The dashboard (``GET /``) as a person sees it: rendered by real headless Chromium.

A real ``writ serve`` holds a small plant's ledger: a revoker key, two
technician tablets, four PLCs; the on-call revoker revokes ``tablet-07``
(reason ``lost``); two PLCs post receipts after the revoke, one before it, one
never. Chromium loads the page twice: ``--dump-dom`` (the DOM after the page's
own scripts ran) is read for what the page says, and ``--screenshot`` for what
it shows: the spread bar drawn half full (2 of 4 devices) and the revoked
status in red. Skipped, with the reason, when Chromium is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from ledger import encoding, messages, records
from ledger.crypto import SeedSigner
from ledger.records import Reason
from tests.helpers.server import Mirror, RunningServer, make_ledger, running_server

ORIGIN = "ledger.example/plant-7"
MSGPACK = {"Content-Type": "application/msgpack"}
CHROMIUM_TIMEOUT = 30.0


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find_chromium()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]


# --- the browser ----------------------------------------------------------------


def run_chromium(profile: Path, *args: str) -> bytes:
    """Run headless Chromium once; returns its stdout. Its whole process group dies on a timeout."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {CHROMIUM_TIMEOUT} s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


# --- reading the DOM ------------------------------------------------------------


@dataclass
class Cell:
    text: str = ""
    css: str = ""
    styles: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """The parts of the page a test looks at: tables (rows of cells), texts by id, the title."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[Cell]]] = []
        self.by_id: dict[str, str] = {}
        self.title = ""
        self.h1 = ""
        self.style = ""
        self._cell: Cell | None = None
        self._ids: list[tuple[str, str]] = []  # (tag, id) open elements with an id
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self._cell = Cell(css=a.get("class", ""))
            self.tables[-1][-1].append(self._cell)
        elif tag == "span" and self._cell is not None and "style" in a:
            self._cell.styles.append(a["style"])
        if tag in ("title", "h1", "style"):
            self._in = tag
        if "id" in a:
            self._ids.append((tag, a["id"]))
            self.by_id.setdefault(a["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._cell = None
        if tag == self._in:
            self._in = None
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.text += data
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data
        elif self._in == "style":
            self.style += data
        for _, ident in self._ids:
            self.by_id[ident] += data

    def css_colour(self, selector: str, prop: str) -> tuple[int, int, int]:
        """The ``#rgb``/``#rrggbb`` value of ``prop`` in the page's own rule for ``selector``."""
        rule = re.search(r"(?:^|[}\s])" + re.escape(selector) + r"\s*\{([^}]*)\}", self.style)
        assert rule is not None, f"no CSS rule for {selector!r}"
        value = re.search(
            r"(?:^|;)\s*" + re.escape(prop) + r"\s*:\s*#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})\b", rule[1]
        )
        assert value is not None, f"{selector} has no {prop} colour"
        hexa = value[1] if len(value[1]) == 6 else "".join(c * 2 for c in value[1])
        r, g, b = bytes.fromhex(hexa)
        return r, g, b

    def table_with(self, header: str) -> list[dict[str, Cell]]:
        """The rows of the table whose header row has ``header``, as {header: cell}."""
        for table in self.tables:
            if table and header in [c.text.strip() for c in table[0]]:
                heads = [c.text.strip() for c in table[0]]
                return [dict(zip(heads, row, strict=True)) for row in table[1:]]
        raise AssertionError(f"no table with a {header!r} column")


# --- the ledger -----------------------------------------------------------------


class Plant(NamedTuple):
    server: RunningServer
    mirror: Mirror
    revoke_seq: int


def post(srv: RunningServer, path: str, body: bytes) -> None:
    r = httpx.post(srv.url + path, content=body, headers=MSGPACK, timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    root = SeedSigner.generate()
    with running_server(
        tmp_path_factory.mktemp("dash"), root.public_key, ORIGIN, checkpoint_interval=3600
    ) as srv:
        m = Mirror(root, ORIGIN)
        m.extend(make_ledger(root, ORIGIN, srv.log_public_key))
        revoker = SeedSigner.generate()
        revoker_seq = m.state.size
        m.grant(revoker.public_key, records.ROLE_REVOKER, "oncall-laptop")
        tablet_seq = m.state.size
        m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "tablet-07", scope="plant-7")
        m.grant(SeedSigner.generate().public_key, records.ROLE_OPERATOR, "tablet-08", scope="plant-7")
        plcs: dict[str, tuple[int, SeedSigner]] = {}
        for name in ("plc-line3-17", "plc-line3-18", "plc-line4-02", "plc-line4-03"):
            key = SeedSigner.generate()
            plcs[name] = (m.state.size, key)
            m.grant(key.public_key, records.ROLE_DEVICE, name, scope="plant-7/line")
        post(srv, "/v1/records", encoding.pack_records(m.records))

        def receipt(name: str) -> None:
            seq, key = plcs[name]
            body = messages.make_receipt(key, seq, m.state.size, m.state.root, int(time.time()))
            post(srv, "/v1/receipts", body)

        receipt("plc-line4-02")  # applied the head before the revoke: a straggler
        revoke_seq = m.state.size
        rev = m.revoke(tablet_seq, int(Reason.LOST), signer=(revoker_seq, revoker))
        post(srv, "/v1/records", encoding.pack_records([rev]))
        receipt("plc-line3-17")
        receipt("plc-line3-18")  # plc-line4-03 never reports
        yield Plant(srv, m, revoke_seq)


@pytest.fixture(scope="module")
def rendered(plant: Plant, tmp_path_factory: pytest.TempPathFactory) -> tuple[Page, Path]:
    """The page's DOM (after its scripts ran) and a 1280x1600 screenshot of it."""
    tmp = tmp_path_factory.mktemp("chromium")
    url = plant.server.url + "/"
    dom = run_chromium(tmp / "profile-dom", "--dump-dom", url).decode("utf-8")
    page = Page()
    page.feed(dom)
    page.close()
    shot = tmp / "dash.png"
    run_chromium(tmp / "profile-shot", f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert shot.exists(), "chromium wrote no screenshot"
    return page, shot


# --- what the page says ---------------------------------------------------------


def test_header_shows_the_origin_and_the_size(plant: Plant, rendered: tuple[Page, Path]) -> None:
    page, _ = rendered
    assert ORIGIN in page.title
    assert ORIGIN in page.h1
    assert page.by_id["size"].strip() == str(plant.mirror.state.size)
    assert page.by_id["root"].strip() == plant.mirror.state.root.hex()


def test_header_shows_the_root_key_in_force_and_the_log_key_as_server_init_printed_it(
    plant: Plant, rendered: tuple[Page, Path]
) -> None:
    page, _ = rendered
    assert plant.mirror.root.public_key.hex() in page.by_id["root-key"]
    assert "never rotated" in page.by_id["root-key"]
    # `writ server init` prints the log key as 64 hex digits: the operator compares those
    assert page.by_id["log-key"].strip() == plant.server.log_public_key.hex()
    assert page.by_id["log-vkey"].strip().startswith(ORIGIN + "+")


def test_credentials_show_tablet_07_revoked_for_lost_and_the_rest_active(
    plant: Plant, rendered: tuple[Page, Path]
) -> None:
    page, _ = rendered
    rows = {r["name"].text.strip(): r for r in page.table_with("status")}
    tablet = rows["tablet-07"]
    assert tablet["status"].text.strip() == "revoked"
    assert "revoked" in tablet["status"].css.split()
    assert "lost" in tablet["revocation"].text
    assert f"#{plant.revoke_seq}" in tablet["revocation"].text
    active = {name for name, r in rows.items() if r["status"].text.strip() == "active"}
    assert active == {
        "log",
        "oncall-laptop",
        "tablet-08",
        "plc-line3-17",
        "plc-line3-18",
        "plc-line4-02",
        "plc-line4-03",
    }
    assert all("active" in rows[n]["status"].css.split() for n in active)
    assert rows["plc-line3-17"]["role"].text.strip() == "device"
    assert rows["tablet-08"]["revocation"].text.strip() == ""


def test_revocation_spread_shows_half_the_devices_and_the_stragglers(
    plant: Plant, rendered: tuple[Page, Path]
) -> None:
    page, _ = rendered
    (row,) = page.table_with("stragglers")
    assert row["seq"].text.strip() == str(plant.revoke_seq)
    assert row["revoked"].text.strip() == "tablet-07"
    assert row["reason"].text.strip() == "lost"
    assert "2/4 devices" in row["applied"].text
    assert "width:50%" in [s.replace(" ", "") for s in row["applied"].styles]
    stragglers = row["stragglers"].text
    assert f"plc-line4-02 (last receipt: size {plant.revoke_seq}" in stragglers
    assert "plc-line4-03 (last receipt: none)" in stragglers
    assert "plc-line3-17" not in stragglers and "plc-line3-18" not in stragglers
    assert stragglers.strip().startswith("2 behind:")  # a count first; no link for a short list
    # the never-reporting device is the furthest behind: listed first
    assert stragglers.index("plc-line4-03") < stragglers.index("plc-line4-02")


def test_recent_records_describe_the_revoke_in_words(plant: Plant, rendered: tuple[Page, Path]) -> None:
    page, _ = rendered
    rows = page.table_with("what")
    assert [int(r["seq"].text) for r in rows] == list(range(plant.mirror.state.size - 1, -1, -1))
    newest = rows[0]
    assert newest["kind"].text.strip() == "revoke"
    assert "tablet-07" in newest["what"].text and "lost" in newest["what"].text


# --- what the page shows --------------------------------------------------------


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, length) of each run of True in one row."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_screenshot_draws_the_bar_half_full_and_revoked_in_red(rendered: tuple[Page, Path]) -> None:
    page, shot = rendered
    with Image.open(shot) as opened:
        img = np.asarray(opened.convert("RGB"), dtype=np.int16)
    assert img.shape == (1600, 1280, 3)
    # the colours the page itself asks for
    is_green = np.all(img == page.css_colour(".bar span", "background"), axis=2)
    is_grey = np.all(img == page.css_colour(".bar", "background"), axis=2)
    red = np.array(page.css_colour(".revoked", "color"))

    # the spread bar: a green run then the grey rest, on the same rows; green = 2/4 of the bar
    bar_rows = []
    for y in range(img.shape[0]):
        if not is_green[y].any():
            continue
        greys = {start: length for start, length in _runs(is_grey[y]) if length >= 20}
        for start, length in _runs(is_green[y]):
            if length >= 20 and start + length in greys:
                bar_rows.append((y, length, greys[start + length]))
    assert len(bar_rows) >= 8, "no half-green spread bar in the screenshot"
    _, green, grey = bar_rows[len(bar_rows) // 2]
    assert abs(green / (green + grey) - 0.5) < 0.02, (green, grey)

    # "revoked" is drawn in the .revoked colour (anti-aliased text: count near matches)
    near = int(np.count_nonzero(np.abs(img - red).sum(axis=2) <= 60))
    assert near >= 20, "no text in the .revoked colour in the screenshot"
