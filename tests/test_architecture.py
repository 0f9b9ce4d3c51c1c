"""Which way dependencies point, and what the wheel ships (docs/design.md, "Dependencies").

The import-linter contracts live in ``pyproject.toml``; ``.ci/run`` runs them and so
does :func:`test_import_contracts_are_kept`. ``fuzz/`` holds scripts, not a package,
so its imports are read here. The wheel is built for real and must hold the product
only: ``ledger``, ``api`` and ``device_sim``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = {"ledger", "api", "device_sim"}
NOT_SHIPPED = ("tests", "bench", "reliability", "fuzz")


def _imported(source: str | bytes) -> set[str]:
    """The absolute module names a source file imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_import_contracts_are_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, timeout=120, check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out[-3000:]
    assert "0 broken" in out and "nothing imports tests KEPT" in out


def test_fuzz_scripts_import_no_tests_bench_or_reliability() -> None:
    for path in sorted((REPO / "fuzz").glob("*.py")):
        bad = {
            m
            for m in _imported(path.read_text(encoding="utf-8"))
            if m.split(".")[0] in ("tests", "bench", "reliability")
        }
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_a_broken_command_group_fails_writ_loudly() -> None:
    """The old registry skipped a group whose module was missing, so `writ demo` could
    vanish without a word; the composition root imports every group by name."""
    code = "import sys; sys.modules['device_sim.demo'] = None; import api.main"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert b"device_sim.demo" in proc.stderr


def test_writ_has_every_group_and_device_sim_its_fleet() -> None:
    from api.main import build_parser

    text = build_parser().format_help()
    for command in ("root", "grant", "revoke", "audit", "server", "serve", "demo"):
        assert f"    {command} " in text or f"{{{command}" in text or f",{command}" in text, command
    proc = subprocess.run(
        [sys.executable, "-m", "device_sim", "--help"], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and b"fleet" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_the_wheel_ships_only_the_product(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*cache*", "__pycache__", "build", "dist", "*.egg-info", "writ-demo"
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "out", "."],
        cwd=src,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    (wheel,) = (src / "out").glob("writ-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n) for n in names if n.endswith(".dist-info/entry_points.txt"))
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == PRODUCT
    assert not [n for n in names if n.split("/", 1)[0] in NOT_SHIPPED]
    assert b"writ = api.main:main" in entry_points
    for data in ("ledger/storage/schema.sql", "api/templates/dashboard.html", "device_sim/py.typed"):
        assert data in names, data
    with zipfile.ZipFile(wheel) as z:
        for n in (n for n in names if n.endswith(".py")):
            bad = {m for m in _imported(z.read(n)) if m.split(".")[0] in NOT_SHIPPED}
            assert not bad, f"{n} imports {sorted(bad)}"
