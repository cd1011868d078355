"""`omni export`: a tiny trained run -> a Hub-ready transformers folder, loaded without omni.

The parity test runs the exports in a second virtualenv that sees torch, transformers and the
encoder libraries but not this project (a `--without-pip` venv whose .pth file lists the main
venv's site-packages; the project's editable-install hook lives in a .pth file *inside* that
folder, which Python does not process for a folder added that way). The consumer runs there with
`python -I` in a temporary cwd, asserts omni/encoders/projectors cannot be found, loads the export
with the Auto classes and writes logits and generations for comparison with the training model
in this process. Figures are printed (`pytest -s`).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from omni.eval import evaluate, write_results
from omni.export.writer import ExportError, add_export_command, export_model
from omni.model.load import is_exported_dir, load_model
from omni.model.omni_model import OmniModel
from omni.model.processor import OmniProcessor, collate
from omni.train.config import load_stage
from omni.schedule import run_schedule
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["batch.micro_batch=4", "log.interval=1", "data.shuffle_buffer=20"]
MAX_NEW = 8
SPEECH_FRAMES = 12  # the most codec frames a spoken answer gets (talker.max_frames; decoding 30 takes ~10 s)
MESSAGES = [[{"role": "user", "content": "<image> <video> <audio> What colour is the shape?"}],
            [{"role": "user", "content": "<audio> <image> Which note is played?"}]]


# ---- fixtures: a trained run, its export, media, the consumer venv -------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus):
    """A two-stage schedule run (image projector -> SFT), with checkpoints and an eval.json."""
    d = tmp_path_factory.mktemp("export-run")
    sched = d / "schedule.yaml"
    sched.write_text(yaml.safe_dump({"name": "export-test", "stages": [
        str(ROOT / "stages/tiny/1a_image_projector.yaml"), str(ROOT / "stages/tiny/2_sft.yaml")]}))
    overrides = [f"data.manifest={tiny_corpus}", *SMALL, "steps=2", "checkpoint.interval=1", "checkpoint.keep=1"]
    final = run_schedule(sched, d / "run", overrides, progress=False)
    write_results(evaluate(final, tiny_corpus, datasets=["image_colour", "audio_note"], limit=2,
                           progress=False), d / "run")
    return d / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "omni-tiny"
    export_model(run, out, max_shard_size="2MB")
    return out


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """Random-init tiny model with NormHead, tied embeddings and AnyRes tiling on, and its export."""
    d = tmp_path_factory.mktemp("variant")
    from omni.presets import build_preset

    torch.manual_seed(1)
    cfg = build_preset("tiny", ["llm.norm_head=true", "llm.hf_config.tie_word_embeddings=true", "anyres.max_tiles=4"])
    model, tok = OmniModel.from_config(cfg)
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    model.save_pretrained(d / "model", tok)
    export_model(d / "model", d / "export")
    return d / "model", d / "export"


@pytest.fixture(scope="module")
def speaking(run, tmp_path_factory):
    """The run's model with a random-init talker (speech out), saved and exported twice: speaking
    with a tiny codec fitted on tones, and with a random-init Mimi of the real class (a local folder
    standing in for kyutai/mimi). The check is parity, not quality. {codec: (model dir, export dir)}"""
    from transformers import MimiConfig, MimiModel

    from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig
    from tests.helpers import TINY_MIMI

    d = tmp_path_factory.mktemp("speaking")
    torch.manual_seed(2)
    MimiModel(MimiConfig(**TINY_MIMI)).save_pretrained(d / "mimi")
    t = np.arange(2 * 16_000) / 16_000
    tones = [(0.3 * np.sin(2 * np.pi * f * t * (1 + 0.3 * t))).astype(np.float32) for f in (220, 330, 440, 660)]
    out = {}
    for codec, overrides in (("tiny", []), ("mimi", ["talker.codec=mimi", f"talker.codec_pretrained={d / 'mimi'}",
                                                     "talker.codebooks=2"])):
        torch.manual_seed(2)
        model, tok = load_model(run / "final", ["talker.enabled=true", f"talker.max_frames={SPEECH_FRAMES}",
                                                *overrides])
        if codec == "tiny":
            model.codec = TinyCodec.fit(tones, TinyCodecConfig(codebooks=4, codebook_size=64))
        model.save_pretrained(d / f"{codec}-model", tok)
        export_model(d / f"{codec}-model", d / f"{codec}-export")
        out[codec] = (d / f"{codec}-model", d / f"{codec}-export")
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Files for 2 images (one elongated, so AnyRes tiles it), 1 mp4 (3 s at 2 fps), 2 waveforms (one > 1 window)."""
    from omni.data.synth import _mp4

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(30, 40), (80, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        images.append(str(d / f"{i}.png"))
    (d / "v.mp4").write_bytes(_mp4(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), fps=2))
    audio = []
    for i, wav in enumerate([(rng.standard_normal(11_200) * 0.1).astype(np.float32),
                             np.sin(np.linspace(0, 3000, 40_000)).astype(np.float32)]):
        np.save(d / f"a{i}.npy", wav)
        audio.append(str(d / f"a{i}.npy"))
    return {"messages": MESSAGES, "images": images, "videos": [str(d / "v.mp4")], "audio": audio}


@pytest.fixture(scope="module")
def consumer_python(tmp_path_factory) -> Path:
    """A virtualenv with this venv's third-party packages but without the project."""
    env_dir = tmp_path_factory.mktemp("consumer") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "omni-test-deps.pth").write_text("\n".join(paths) + "\n")
    return env_dir / "bin" / "python"


@pytest.fixture(scope="module")
def consumer(consumer_python, exported, variant, speaking, media, tmp_path_factory):
    """Run export_consumer.py once over every export; returns (report, {name: arrays})."""
    work = tmp_path_factory.mktemp("consumer-run")
    spec = {"inputs": media, "max_new_tokens": MAX_NEW, "exports": [
        {"name": "main", "dir": str(exported), "auto": "AutoModelForCausalLM"},
        {"name": "main_automodel", "dir": str(exported), "auto": "AutoModel"},
        {"name": "variant", "dir": str(variant[1]), "auto": "AutoModelForCausalLM"},
        *[{"name": f"speech_{codec}", "dir": str(dirs[1]), "auto": "AutoModelForCausalLM", "speak": True}
          for codec, dirs in speaking.items()]]}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
    env |= {"HF_MODULES_CACHE": str(work / "hf_modules"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home"),
            "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "2"}
    script = Path(__file__).with_name("export_consumer.py")
    proc = subprocess.run([str(consumer_python), "-I", str(script), str(work / "spec.json"), str(work)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    arrays = {c["name"]: dict(np.load(work / f"{c['name']}.npz")) for c in spec["exports"]}
    return report, arrays


def _per_sample(media) -> list[dict]:
    """The consumer's flat media lists as each conversation's own (omni's processor takes them so)."""
    images = [Image.open(p) for p in media["images"]]
    audio = [np.load(p) for p in media["audio"]]
    return [{"image": [images[0]], "video": media["videos"], "audio": [audio[0]]},
            {"image": [images[1]], "audio": [audio[1]]}]


def _reference(model_dir, media):
    """The training model's processor, logits and greedy continuation for the same inputs."""
    model, tok = load_model(model_dir)
    model.eval()
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    per_sample = _per_sample(media)
    examples = [proc(m, s, add_generation_prompt=True) for m, s in zip(media["messages"], per_sample)]
    batch = collate(examples, tok.pad_token_id, left_pad=True)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask, media=batch.media).logits
        new = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return batch, logits, new


def _assert_parity(name, arrays, batch, logits, new):
    got = arrays[name]
    assert np.array_equal(got["input_ids"], batch.input_ids.numpy())
    assert np.array_equal(got["attention_mask"], batch.attention_mask.numpy())
    assert np.array_equal(got["pixel_values"], batch.media.image.numpy())
    assert np.array_equal(got["pixel_values_videos"], batch.media.video.numpy())
    assert np.array_equal(got["input_features"], batch.media.audio.numpy())
    assert got["audio_valid"].tolist() == batch.media.audio_valid
    diff = float(np.abs(got["logits"] - logits.numpy()).max())
    print(f"[{name}] logits {tuple(logits.shape)} max abs diff {diff:.3g} (max |logit| "
          f"{logits.abs().max():.3g}); greedy tokens equal: {np.array_equal(got['new_tokens'], new.numpy())}")
    assert diff <= 1e-5
    assert np.array_equal(got["new_tokens"], new.numpy())
    assert np.array_equal(got["prompt_echo"], batch.input_ids.numpy())


# ---- 2: a fresh environment loads the export and computes the same ------------------------
def test_consumer_env_cannot_import_the_project(consumer):
    report, _ = consumer
    assert report["findable_at_start"] == {"omni": False, "encoders": False, "projectors": False}
    assert report["project_modules_imported"] == []
    for case in report["exports"].values():
        assert case["model_class"].startswith("transformers_modules.")
        assert case["processor_class"].startswith("transformers_modules.")
        assert all(not v for v in case["loading_info"].values()), case["loading_info"]
    assert any(m.endswith(".omni_encoders_image") for m in report["remote_modules"])


def test_export_matches_training_model_logits_and_greedy_generation(consumer, run, media):
    _, arrays = consumer
    batch, logits, new = _reference(run / "final", media)
    _assert_parity("main", arrays, batch, logits, new)
    _assert_parity("main_automodel", arrays, batch, logits, new)


def test_norm_head_tied_embeddings_and_anyres_survive_the_export(consumer, variant, media):
    _, arrays = consumer
    batch, logits, new = _reference(variant[0], media)
    assert batch.media.image_tiles[1] > 1  # the 20x80 image is tiled
    _assert_parity("variant", arrays, batch, logits, new)
    assert (variant[1] / "model.safetensors").is_file()  # one file under the default 5GB shard size
    assert not (variant[1] / "model.safetensors.index.json").exists()
    with safe_open(str(variant[1] / "model.safetensors"), framework="pt") as f:
        assert "llm.lm_head.weight" not in f.keys()  # noqa: SIM118  # tied: stored once, as the input embedding
    loaded, _ = load_model(variant[1])
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight
    original, _ = load_model(variant[0])
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("codec", ["tiny", "mimi"])
def test_an_export_speaks_as_omni_does(consumer, speaking, media, codec):
    """Text and speech without omni: the greedy answers are omni's, the talker's greedy codes for
    them are omni's own (`omni chat --speak`'s path) code for code, and the waves omni's codec gives."""
    from omni.model.generate import LocalGenerator
    from omni.model.speech import answer_states, speak

    report, arrays = consumer
    name, (model_dir, export_dir) = f"speech_{codec}", speaking[codec]
    batch, logits, new = _reference(model_dir, media)
    _assert_parity(name, arrays, batch, logits, new)
    model, tok = load_model(model_dir)
    answers = tok.batch_decode(new, skip_special_tokens=True)
    assert report["exports"][name]["decoded"] == answers
    states = answer_states(LocalGenerator(model, tok), media["messages"], _per_sample(media), answers)
    codes = speak(model, states, model.config.talker.max_frames)
    assert report["exports"][name]["sample_rate"] == model.codec.sample_rate
    assert report["exports"][name]["codec_class"].endswith(("TinyCodebooks", "MimiCodec"))
    got = arrays[name]
    for i, c in enumerate(codes):
        assert c.shape[0] == model.config.talker.codebooks and 0 < c.shape[1] <= SPEECH_FRAMES
        assert np.array_equal(got[f"codes_{i}"], c.numpy()), i
        wave = model.codec.decode(c)
        assert got[f"wave_{i}"].shape == wave.shape and np.abs(wave).max() > 0
        np.testing.assert_allclose(got[f"wave_{i}"], wave, rtol=0, atol=1e-5)
        print(f"[{name}] answer {answers[i]!r}: {c.shape[1]} frames equal; wave {wave.shape[0]} samples, "
              f"max abs diff {float(np.abs(got[f'wave_{i}'] - wave).max()):.3g}")
    files = {p.name for p in export_dir.iterdir()}
    assert ({"tiny_codec.json", "tiny_codec.safetensors"} <= files) == (codec == "tiny")
    config = json.loads((export_dir / "config.json").read_text())["talker_config"]
    assert config["codec"] == codec and config["max_frames"] == SPEECH_FRAMES
    card = (export_dir / "README.md").read_text()
    assert "text and speech out" in card and "| talker (speech out) |" in card and "generate_speech" in card
    again, _ = load_model(export_dir)  # omni reads the export back with its talker and codec
    assert type(again.codec) is type(model.codec)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# ---- 1: what the folder holds -------------------------------------------------------------
def test_export_folder_is_hub_ready(exported, run):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "README.md",
            "configuration_omni.py", "modeling_omni.py", "processing_omni.py"} <= files
    shards = sorted(f for f in files if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) > 1
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "omni_mllm" and config["architectures"] == ["OmniForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_omni.OmniConfig",
                                  "AutoModel": "modeling_omni.OmniForCausalLM",
                                  "AutoModelForCausalLM": "modeling_omni.OmniForCausalLM"}
    assert config["vision_config"]["vision_cfg"]["image_size"] == 32
    assert config["audio_config"]["n_mels"] == 80 and config["text_config"]["model_type"] == "qwen2"
    assert config["max_z_loss"] == 0.0 and config["norm_head"] is False
    gen = json.loads((exported / "generation_config.json").read_text())
    tok = json.loads((exported / "tokenizer_config.json").read_text())
    assert gen["eos_token_id"] == 3 and gen["do_sample"] is False and tok["eos_token"] == "<|im_end|>"
    assert not {"local_files_only", "is_local"} & set(tok)
    assert "{% generation %}" in (exported / "chat_template.jinja").read_text()
    processor = json.loads((exported / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_omni.OmniProcessor"}
    assert processor["image_config"]["preprocess"]["size"] == 32 and processor["video_config"]["max_frames"] == 4
    assert processor["audio_config"]["projector"] == {"kind": "conv_gmlp", "options": {"stride": 4}}

    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card and "library_name: transformers" in card
    for expected in ("## Architecture", "stage1-image-projector", "stage2-sft", "image_colour", "## Evaluation",
                     "| image |", "## Intended use", "## License", "trust_remote_code=True"):
        assert expected in card, expected


def test_remote_code_is_the_repository_code_with_rewritten_imports(exported):
    import ast

    for f in exported.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] in ("omni", "encoders", "projectors") for n in names), (f.name, names)
    shipped = (exported / "omni_encoders_image.py").read_text().splitlines()
    original = (ROOT / "encoders/image.py").read_text().splitlines()
    assert shipped[2:] == original  # two header lines, then the file itself (no omni imports in it)
    shipped = (exported / "omni_projectors.py").read_text().splitlines()[2:]
    original = (ROOT / "projectors/__init__.py").read_text().splitlines()
    assert [a for a, b in zip(shipped, original) if a != b] == [
        "from .omni_projectors_conv_gmlp import ConvGMLPProjector", "from .omni_projectors_mlp import MLPProjector"]


# ---- 5: overwrite protection, atomic writes, no pickles ----------------------------------
def test_export_refuses_a_non_empty_folder_without_force(run, exported, tmp_path):
    with pytest.raises(ExportError, match="not empty; pass --force"):
        export_model(run, exported)
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="not empty"):
        export_model(run, out)
    export_model(run, out, force=True)
    assert not (out / "stale.txt").exists() and is_exported_dir(out)
    with pytest.raises(ExportError, match="contains the model"):
        export_model(run / "final", run, force=True)
    with pytest.raises(ExportError, match="holds training outputs"):
        export_model(run, run / "stage1-image-projector", force=True)  # a sibling stage: never replaced


def test_a_failed_export_leaves_the_target_untouched(run, tmp_path, monkeypatch):
    import omni.export.remote_code

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")

    def boom(_):
        raise RuntimeError("disk full")
    monkeypatch.setattr(omni.export.remote_code, "write_remote_code", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(run, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


def test_export_reads_and_writes_no_pickles(run, tmp_path, monkeypatch):
    import pickle

    ckpt = run / "stage2-sft" / "checkpoints" / "step-00000001"
    assert (ckpt / "trainer_state.pt").is_file()  # a pickle sits next to the weights: never opened

    def no_pickles(*args, **kwargs):
        raise AssertionError("unpickling during export")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, no_pickles)
    out = export_model(ckpt, tmp_path / "from-checkpoint")
    load_model(out)
    for f in out.iterdir():
        assert f.suffix in (".json", ".safetensors", ".py", ".md", ".jinja"), f.name
        assert f.read_bytes()[:1] != b"\x80" and f.read_bytes()[:4] != b"PK\x03\x04", f.name
    card = (out / "README.md").read_text()
    assert "(checkpoint)" in card and "exported at step-00000001" in card


# ---- 4: an export is a starting point for more training ----------------------------------
def test_init_from_an_export_continues_training(run, exported, tiny_corpus, tmp_path):
    model, tok = load_model(exported)
    ref, _ = load_model(run / "final")
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert tok.get_vocab() == _.get_vocab()

    load_model(exported)  # omni's own loader takes exports too
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     [f"data.manifest={tiny_corpus}", *SMALL, "steps=2", f"init_from={exported}"])
    final = train_stage(cfg, tmp_path / "continued", progress=False)
    after, _ = load_model(final)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed and all(k.startswith(("llm.", "encoders.", "projectors.")) for k in changed)


# ---- 3: --push-to-hub, against a local stand-in of the Hub's HTTP API ---------------------
class _FakeHub(BaseHTTPRequestHandler):
    """The Hub endpoints `create_repo` + `upload_folder` use when every file is committed inline:
    /api/repos/create, /api/validate-yaml (README.md metadata), /api/models/{repo}/preupload/{rev},
    /api/models/{repo}/commit/{rev}. Anything else is answered 404 and recorded."""
    calls: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def _reply(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.calls.append(("GET", self.path, None, self.headers.get("authorization")))
        self._reply(404, {"error": f"stand-in has no GET {self.path}"})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth, path = self.headers.get("authorization"), self.path.split("?")[0]
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if path == "/api/validate-yaml":  # the client validates README.md's metadata before uploading
            body = json.loads(raw)
            self.calls.append(("validate-yaml", path, body, auth))
            try:
                meta = yaml.safe_load(body["content"].split("---")[1])
                assert isinstance(meta, dict) and meta.get("license")
            except Exception as e:  # noqa: BLE001 - reported to the client as the Hub does
                return self._reply(400, {"errors": [{"message": f"invalid model card metadata: {e!r}"}]})
            return self._reply(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            body = json.loads(raw)
            self.calls.append(("create", path, body, auth))
            return self._reply(200, {"url": f"{base}/{body['organization']}/{body['name']}"})
        if "/preupload/" in path:
            body = json.loads(raw)
            self.calls.append(("preupload", path, body, auth))
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in body["files"]]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            self.calls.append(("commit", path, lines, auth))
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                     "pullRequestUrl": None})
        self.calls.append(("POST?", path, raw[:200], auth))
        self._reply(404, {"error": f"stand-in has no POST {path}"})


@pytest.fixture()
def fake_hub():
    _FakeHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeHub.calls
    server.shutdown()
    server.server_close()


def test_push_to_hub_uploads_the_export_with_the_real_client(run, tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    url, calls = fake_hub
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    out = export_model(run, tmp_path / "pushed", push_to_hub="me/omni-tiny", private=True,
                       commit_message="omni tiny export", api=HfApi(endpoint=url), max_shard_size="2MB")
    kinds = [c[0] for c in calls]
    assert kinds[0] == "create" and {"validate-yaml", "preupload"} <= set(kinds) and kinds[-1] == "commit", kinds
    assert all(c[3] == "Bearer hf_standin_token" for c in calls)
    create = calls[0][2]
    assert (create["organization"], create["name"], create["visibility"]) == ("me", "omni-tiny", "private")
    commit = calls[-1]
    assert commit[1].startswith("/api/models/me/omni-tiny/commit/main")
    header, files = commit[2][0], {f["value"]["path"]: f["value"] for f in commit[2][1:]}
    assert header == {"key": "header", "value": {"summary": "omni tiny export", "description": ""}}
    local = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(files) == local
    for name, f in files.items():
        assert base64.b64decode(f["content"]) == (out / name).read_bytes(), name

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ExportError, match="needs a Hugging Face token"):
        export_model(run, tmp_path / "nope", push_to_hub="me/x", api=HfApi(endpoint=url))
    assert not (tmp_path / "nope").exists()


# ---- the command line --------------------------------------------------------------------
def test_export_command_line(run, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="omni")
    add_export_command(parser.add_subparsers(dest="command", required=True))
    help_text = parser._subparsers._group_actions[0].choices["export"].format_help()
    for flag in ("--ckpt", "--out", "--force", "--push-to-hub", "--private", "--commit-message", "--license"):
        assert flag in help_text
    args = parser.parse_args(["export", "--ckpt", str(run), "--out", str(tmp_path / "cli"), "--license", "mit"])
    args.func(args)
    assert "license: mit" in (tmp_path / "cli" / "README.md").read_text()
    assert f"export: {tmp_path / 'cli'}" in capsys.readouterr().out
    args = parser.parse_args(["export", "--ckpt", str(run), "--out", str(tmp_path / "cli")])
    with pytest.raises(SystemExit, match="export error: .* not empty"):
        args.func(args)
    shutil.rmtree(tmp_path / "cli")
