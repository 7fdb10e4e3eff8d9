"""`examples/demo.py --quick` runs end to end: sections printed, loss falling, PNG written.

The demo needs the `demo` extra (tqdm, matplotlib); without it the test is skipped. It runs
in a subprocess, so the test suite's strict JAX settings (conftest) do not apply to it.
"""

import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess run of minutes: `make test-slow`

DEMO = pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("tqdm", reason="the demo needs the `demo` extra (tqdm)")
    pytest.importorskip("matplotlib", reason="the demo needs the `demo` extra (matplotlib)")
    out = tmp_path_factory.mktemp("demo_out")
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


def test_prints_every_section(quick_run):
    stdout, _ = quick_run
    for section in (
        "corpus:",
        "packing:",
        "model:",
        "training:",
        "packing efficiency:",
        "tokens/s",
        "loss:",
        "sample",
        "picture:",
    ):
        assert section in stdout, f"missing {section!r} in:\n{stdout}"
    files, size = re.search(r"corpus: (\d+) files, ([\d,]+) bytes", stdout).groups()
    assert int(files) > 0 and int(size.replace(",", "")) > 0
    efficiency = float(re.search(r"packing efficiency: ([\d.]+)%", stdout).group(1))
    assert 0 < efficiency <= 100
    assert "0 truncated" in stdout  # sequences are cut to the row length before packing


def test_loss_falls(quick_run):
    stdout, _ = quick_run
    chunks = [float(x) for x in re.findall(r"chunk .* loss ([\d.]+) bits/byte", stdout)]
    assert len(chunks) >= 2, stdout
    assert chunks[-1] < chunks[0], chunks
    first, last = map(float, re.search(r"loss: ([\d.]+) -> ([\d.]+) bits/byte", stdout).groups())
    assert last < first - 1.0, (first, last)  # from ~8 bits/byte (uniform) well down


def test_writes_png(quick_run):
    stdout, out = quick_run
    path = pathlib.Path(re.search(r"picture: (.+)", stdout).group(1).strip())
    assert path == out / "demo.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
