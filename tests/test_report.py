"""`quantnpu report`: the page a user reads after a run."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantnpu.models.export import export_causal_lm, save_pt2
from quantnpu.models.tiny import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def _quantnpu(*args):
    return subprocess.run([sys.executable, "-m", "quantnpu", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def run_record(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    model = save_pt2(export_causal_lm(tiny_llama(layers=2, vocab=49152), 16), directory / "tiny.pt2")
    result = _quantnpu("lower", model, "-o", directory / "tiny.pte", "--calib-windows", "2", "--steps", "3", "--eval", "--eval-windows", "1", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    return directory / "tiny.json"


def test_report_page_has_every_section_and_its_figures(run_record):
    record = json.loads(run_record.read_text())
    grid = record["linear_bits"]  # what the Q/DQ graph really reads and writes, per linear
    assert len(grid) == 2 * 7
    assert all(r["weight"] == 4 and r["output"] in (8, 16) for r in grid)  # the default 4-8-8
    assert {r["input"] for r in grid if r["linear"] == "q_proj"} == {8}
    assert [r["input"] for r in grid if r["linear"] == "gate_proj"] == [16, 16]  # legalized: gate_proj writes 16 bits
    result = _quantnpu("report", run_record)
    assert result.returncode == 0, result.stderr
    page_path = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert page_path == run_record.with_suffix(".html")
    page = page_path.read_text()
    for heading in ("Perplexity", "Seconds per stage", "Rotation: layers.", "Mixed precision", "Bit widths", "Stage one"):
        assert heading in page, heading
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert f"{record['evaluation']['pte_htp_simulator']['ppl']:.3f}" in page


def test_report_of_a_file_that_is_not_a_record(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    result = _quantnpu("report", bad)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bad}: not a run record of tools/lower.py"], result.stderr
    assert not bad.with_suffix(".html").exists()
