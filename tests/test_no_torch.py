"""Listing plugins and validating every shipped example config never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CODE = """
import json, sys
from pathlib import Path
from vlm_config import get_registry, load_job_config
from vlm_config.cli import plugins_table
rows = plugins_table(get_registry())
validated = []
for path in sorted(Path(sys.argv[1]).rglob("*.toml")):
    if "plugins" in path.parts:
        continue
    job = load_job_config(path)
    validated.append([str(path), job.arch.arch, job.sequence_budget().total])
print(json.dumps({"torch": "torch" in sys.modules, "plugins": len(rows) - 1,
                  "validated": validated}))
"""


def test_listing_and_validating_examples_never_imports_torch(repo_root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(repo_root / "examples")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert result["torch"] is False
    assert result["plugins"] >= 4 + 5 + 4  # encoders, adapters, archs shipped first-party
    archs = {arch for _, arch, _ in result["validated"]}
    assert {"joint_decoder", "cross_attention", "mot", "moma"} <= archs, result["validated"]
