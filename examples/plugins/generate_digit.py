"""Caption held-out digits with a trained run folder through `vlm generate`.

Usage: python examples/plugins/generate_digit.py RUN_DIR [COUNT]

Writes the first COUNT held-out digits of the fixed test split as PNG files, runs
``vlm generate RUN_DIR --image FILE.png`` on each (a real PNG in, text out) and prints
the generated caption next to the true digit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from vlm_train.digits import DIGIT_WORDS, digit_images, digits_split


def main(run_dir: str, count: int = 3) -> int:
    indices = digits_split()["test"][:count]
    images, labels = digit_images(indices)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            png = Path(tmp) / f"digit_{n}.png"
            image.save(png)
            out = subprocess.run(
                [sys.executable, "-m", "vlm_config.cli", "generate", run_dir, "--image", str(png)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            print(f"{png.name}: true {DIGIT_WORDS[int(label)]!r} -> generated {out!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3))
