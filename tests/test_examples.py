"""Every file in examples/ runs here and does what it says.

Examples that need a piece still on another branch (the middleware, the per-route guard, a
backend) skip with the branch's name until that piece is on main; once it is, they run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as a fresh module (examples/ is not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example as its README/docs say: `python examples/<name>.py`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# -- core only -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_liner_aborts_the_queued_calls_and_runs_later_ones() -> None:
    one_liner = load("one_liner")
    outcome = await one_liner.main()
    assert outcome == {
        1: "failed (card declined)",
        2: "aborted (card declined)",
        3: "aborted (card declined)",
        4: "charged on attempt 4",
    }


@pytest.mark.anyio
async def test_cache_stampede_makes_one_database_call_for_100_misses() -> None:
    example = load("cache_stampede")
    db = example.Database()
    cache = example.ProductCache(db)
    results = await example.stampede(cache, "42", callers=100)
    assert db.calls == 1
    assert len(results) == 100
    assert all(result == {"id": "42", "name": "Product 42"} for result in results)
    # Another product is one more call; a warm product none.
    await example.stampede(cache, "7", callers=10)
    await example.stampede(cache, "42", callers=10)
    assert db.calls == 2
    assert cache.lock.stats().active_keys == 0


def test_cache_stampede_runs_as_a_script() -> None:
    result = run_script("cache_stampede")
    assert result.returncode == 0, result.stderr
    assert "-> 1 database call(s)" in result.stdout
