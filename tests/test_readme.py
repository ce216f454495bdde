"""README's usage example runs exactly as written."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _section_code(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '## {title}'"
    return "\n".join(blocks)


def test_usage_example_runs_as_written():
    result = subprocess.run(
        [sys.executable, "-c", _section_code("Usage")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    loss, aux = map(float, lines[0].split())
    assert loss > 0 and aux > 0
    assert lines[1] == "torch.Size([2, 12])"
