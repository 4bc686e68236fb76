"""The docs stay true: every test the supported-pipelines table cites exists, and README commands are real."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_rows_cite_existing_tests():
    table = (ROOT / "docs" / "pipelines.md").read_text()
    cited = set(re.findall(r"tests/\w+\.py", table))
    assert cited, "the table should cite the tests behind each row"
    for path in cited:
        assert (ROOT / path).is_file(), f"docs/pipelines.md cites {path}, which does not exist"


def test_the_pipelines_page_is_what_attnprobe_measures_and_knows():
    from attnprobe.models.coverage import TESTED, pipeline_verdicts, render_page

    page = (ROOT / "docs" / "pipelines.md").read_text()
    assert page == render_page(), "docs/pipelines.md is stale: run .venv/bin/python tools/pipelines_table.py"
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert set(TESTED) <= set(verdicts)  # every tested class is one diffusers exports
    assert verdicts["StableDiffusionPanoramaPipeline"].verdict.startswith("refused")
    assert verdicts["FluxPipeline"].family == "flux" and verdicts["FluxPipeline"].verdict.startswith("tested")


def test_readme_names_the_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("study", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
