"""Write docs/pipelines.md from what attnprobe measures on its tiny pipelines and knows of every diffusers pipeline.

    .venv/bin/python tools/pipelines_table.py
"""

from pathlib import Path

from attnprobe.models.coverage import render_page

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "pipelines.md"
    path.write_text(render_page())
    print(f"wrote {path}")
