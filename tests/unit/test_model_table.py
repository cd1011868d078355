"""docs/model.md is generated from the code and must match it."""
from omni.model.table import DOC, render


def test_model_doc_matches_the_code():
    assert DOC.read_text() == render(), "docs/model.md is stale: run `python -m omni.model.table`"
