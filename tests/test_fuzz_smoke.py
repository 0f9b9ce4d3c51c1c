"""Every atheris harness in ``fuzz/`` runs a bounded number of inputs without a crash.

Each harness runs as its own process (libFuzzer exits the process when it is
done) for at most :data:`RUNS` inputs or :data:`SECONDS` seconds, reading the
committed seeds and writing what it finds and any crash artifact into
``tmp_path``. A crash (an exception other than the decoder's own WritError,
a broken oracle, a 5xx from the app) fails the test with the harness output,
which holds the libFuzzer seed and the crashing input. Without atheris (it
is not a project dependency: ``pip install 'atheris>=2.3'``) the harness tests
skip; the checks that the committed seeds are current and that a harness
exits cleanly without atheris run either way. Long runs: ``fuzz/run.py``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
#: inputs per harness (the HTTP one goes through the whole ASGI app: ~2,500 exec/s),
#: and a time bound per harness in case a machine is slow.
RUNS = {"record": 20_000, "note": 20_000, "messages": 20_000, "tiles": 20_000, "http": 5_000}
SECONDS = 12


def _load(name: str, as_name: str) -> ModuleType:
    """Import ``fuzz/<name>.py`` (not a package) as module ``as_name``."""
    spec = importlib.util.spec_from_file_location(as_name, FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module
    spec.loader.exec_module(module)
    return module


# run.py imports its sibling as ``_common``: load it under that name first.
common = _load("_common", "_common")
run = _load("run", "writ_fuzz_run")
HAVE_ATHERIS = common.load_atheris() is not None


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (pip install 'atheris>=2.3')")
@pytest.mark.parametrize("name", common.HARNESSES)
def test_harness_runs_without_a_crash(name: str, tmp_path: Path) -> None:
    outcome = run.run_harness(
        name,
        runs=RUNS[name],
        seconds=SECONDS,
        workdir=tmp_path / "corpus",
        artifacts=tmp_path / "artifacts",
        timeout=SECONDS * 5 + 60,
    )
    assert not outcome.skipped
    if outcome.crashed:
        pytest.fail(
            f"fuzz_{name} crashed (exit {outcome.returncode}):\n{outcome.output[-6000:]}", pytrace=False
        )
    assert outcome.runs > len(common.seed_inputs(name)), outcome.output[-2000:]
    assert not list((tmp_path / "artifacts").iterdir())


@pytest.mark.parametrize("name", common.HARNESSES)
def test_committed_seeds_are_current(name: str) -> None:
    """fuzz/corpus/<name>/ and fuzz/dicts/<name>.dict are what the vectors give
    (``python fuzz/run.py --write-seeds``)."""
    assert (common.DICTS / f"{name}.dict").read_text() == common.dictionary_text(name)
    d = common.CORPUS / name
    want = common.seed_inputs(name)
    assert sorted(p.name for p in d.iterdir()) == sorted(want)
    for fname, data in want.items():
        assert (d / fname).read_bytes() == data, fname


def test_harness_skips_cleanly_without_atheris() -> None:
    """With ``import atheris`` failing, a harness exits 0 and says why."""
    code = (
        "import runpy, sys\n"
        "sys.modules['atheris'] = None  # makes 'import atheris' raise ImportError\n"
        f"sys.path.insert(0, {str(FUZZ)!r})\n"
        f"sys.argv = [{str(FUZZ / 'fuzz_record.py')!r}, '-runs=1']\n"
        f"runpy.run_path({str(FUZZ / 'fuzz_record.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped: atheris is not installed" in proc.stderr
