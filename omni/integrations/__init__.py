"""Other tools that run omni models. lmms-eval finds omni through the `lmms_eval.models` entry point
(pyproject.toml), which names `lmms_eval_manifest`; docs/eval.md has the commands."""
from __future__ import annotations


def lmms_eval_manifest():
    """The `omni` model of lmms-eval: a chat model (it reads a task's `doc_to_messages`). Imported
    only by lmms-eval, so omni itself never needs lmms-eval installed."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="omni", chat_class_path="omni.integrations.lmms_eval.OmniLmms")
