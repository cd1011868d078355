"""What a sample's messages may be: OpenAI / transformers typed content parts are read as the
same text and placeholders as a plain string (for training and eval alike); an unknown role, a
reply with no user turn before it, or a part of an unknown type is refused naming the sample and
the field; a shard whose keys hold a dot is explained, and omni never writes one."""
from __future__ import annotations

import io
import json
import re

import pytest
import webdataset as wds
from PIL import Image

from omni.curate.common import CurationError, ShardSink
from omni.data.loader import read_meta
from omni.data.records import chat_messages, read_records, record_from_raw, sft_example
from omni.errors import SampleError
from omni.model.processor import OmniProcessor


@pytest.fixture(scope="module")
def processor(tiny_model):
    model, tok = tiny_model
    return OmniProcessor.from_config(model.config, tok, model.token_ids)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    return buf.getvalue()


def _sample(messages, key: str = "s0") -> dict:
    return {"__key__": key, "__url__": "shard-000.tar", "json": json.dumps({"messages": messages}).encode(),
            "png": _png()}


PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
PLAIN = [{"role": "user", "content": "<image> What colour is it?"}, {"role": "assistant", "content": "red"}]


def test_typed_content_parts_train_exactly_like_the_plain_string(processor):
    parts = sft_example(processor, record_from_raw(_sample(PARTS)))
    plain = sft_example(processor, record_from_raw(_sample(PLAIN)))
    assert parts.input_ids.tolist() == plain.input_ids.tolist()
    assert parts.labels.tolist() == plain.labels.tolist()
    assert parts.media.image is not None and parts.media.image.equal(plain.media.image)
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file.png"}},
                                           {"type": "text", "text": "What colour is it?"}]}, PLAIN[1]]
    assert read_meta(_sample(openai))["messages"] == read_meta(_sample(PLAIN))["messages"] == PLAIN  # eval's reader


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
     "field 'messages[0].role' is 'tool'; use one of ['system', 'user', 'assistant']"),
    ([{"role": "assistant", "content": "<image> red"}], "assistant reply with no user turn before it"),
    ([{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "<image> red"}],
     "assistant reply with no user turn before it"),
    ([{"role": "user", "content": [{"type": "audio_clip"}]}, PLAIN[1]], "field 'messages[0].content[0]' must be"),
    ([{"role": "user", "content": {"text": "hi"}}, PLAIN[1]],
     "field 'messages[0].content' must be a string or a list of typed parts"),
    ([], "no assistant message to learn from"),
    ("hi", "field 'messages' must be a list of {role, content}"),
])
def test_a_sample_training_cannot_use_is_refused_naming_it(messages, message):
    with pytest.raises(SampleError, match="sample s0 in shard-000.tar: .*" + re.escape(message)):
        chat_messages(record_from_raw(_sample(messages)))


def test_a_shard_whose_keys_hold_a_dot_is_explained(tmp_path):
    shard = tmp_path / "dots-000000.tar"
    with wds.TarWriter(str(shard)) as w:  # writes img.001.json and img.001.png
        w.write({"__key__": "img.001", "json": json.dumps({"messages": PLAIN}).encode(), "png": _png()})
    with pytest.raises(SampleError, match=r"sample img in .*dots-000000.tar: the shard's file names have a dot in "
                                          r"the sample key \(img.001.json\).*rename the tar members"):
        read_records(str(shard))
    with pytest.raises(CurationError, match="sample key 'img.001' has a dot"):
        ShardSink(tmp_path / "out", "set").write({"__key__": "img.001", "json": b"{}"})
    assert not (tmp_path / "out").exists()


def test_data_build_reads_typed_content_parts_as_training_does():
    from omni.curate.common import Reject
    from omni.curate.formats import draft

    messages, media, _ = draft("sharegpt", {"messages": PARTS, "image": "red.png"}, "chats.jsonl:1")
    assert messages == PLAIN and media == {"image": ["red.png"]}
    with pytest.raises(Reject, match=r"chats.jsonl:2: field 'messages\[0\].content\[0\]' must be"):
        draft("sharegpt", {"messages": [{"role": "user", "content": [{"type": "file"}]}, PLAIN[1]]}, "chats.jsonl:2")
