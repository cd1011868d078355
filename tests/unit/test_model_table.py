"""docs/model.md is generated from the code and must match it."""
from omni.model.table import DOC, render


def test_model_doc_matches_the_code(qwen2_7b):
    """The 7B rows from Qwen2-7B's config.json (a local copy: no hub here), as every rank reads it."""
    assert DOC.read_text() == render({"7b": qwen2_7b}), "docs/model.md is stale: run `python -m omni.model.table`"
