"""The browser client's node:test suites (tests/js/), run as part of the Python suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = Path(__file__).with_name("js")
# Seconds for the whole node run (about 1 s when healthy); a hung test fails instead of hanging.
TIMEOUT = 120


# The suites mock Date with node:test's mock.timers, which Node.js has since 20.11.
NODE_MIN = (20, 11)


def node_or_skip() -> str:
    """The node binary, if new enough; else skip (fail under CI, which must run these)."""
    node = shutil.which("node")
    reason = "node is not on PATH"
    if node is not None:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        found = tuple(int(part) for part in version.lstrip("v").split(".")[:2])
        if found >= NODE_MIN:
            return node
        reason = f"node {version} is older than {'.'.join(map(str, NODE_MIN))}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser client's node tests, but {reason}")
    pytest.skip(f"{reason}: install Node.js 20.11+ to run tests/js/ (the browser client)")


def test_browser_client_passes_its_node_test_suites() -> None:
    node = node_or_skip()
    try:
        result = subprocess.run(
            [node, "--test", "--test-reporter=tap", str(JS_TESTS)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=JS_TESTS.parent.parent,
            env={**os.environ, "NO_COLOR": "1", "NODE_OPTIONS": ""},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test did not finish within {TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}")
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
    # A run that found no test files exits 0 too: make sure the suites ran.
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed is not None, result.stdout
    assert int(passed.group(1)) > 0, result.stdout
    assert re.search(r"^# fail 0$", result.stdout, re.MULTILINE), result.stdout
