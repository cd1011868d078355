"""Weights and output folders can be trusted: every weights file's sha256 is recorded at save and
export time and checked on load, NaN/inf weights and tensors of another dtype are refused naming
the file and the tensor, a truncated file names itself (also through `omni`'s main, in one line),
output folders get the user's umask, a killed write's temporaries are removed by the next one,
and an export never lands inside the folder it exports."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni.config import ConfigError
from omni.export.writer import ExportError, export_model
from omni.files import atomic_dir, file_sha256
from omni.model.load import load_model, save_model_dir
from omni.model.integrity import CHECKSUMS
from omni.model.omni_model import CONFIG, WEIGHTS
from tests.helpers import cli_error

@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    return save_model_dir(model, tok, tmp_path_factory.mktemp("m") / "final")


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    return export_model(folder, tmp_path_factory.mktemp("e") / "export", max_shard_size="2MB")



def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _relabel(path: Path, key: str, old: str, new: str) -> None:
    """Change one tensor's dtype in the safetensors header, bytes untouched (what a forger would do)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header[key]["dtype"] == old
    header[key]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def _drop_checksums(config: Path) -> None:
    data = json.loads(config.read_text())
    data.pop(CHECKSUMS)
    config.write_text(json.dumps(data))


def test_model_folders_and_exports_record_the_sha256_of_every_weights_file(folder, exported):
    assert json.loads((folder / CONFIG).read_text())[CHECKSUMS] == {WEIGHTS: file_sha256(folder / WEIGHTS)}
    recorded = json.loads((exported / "config.json").read_text())[CHECKSUMS]
    shards = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(recorded) == shards
    assert all(recorded[name] == file_sha256(exported / name) for name in shards)
    load_model(folder), load_model(exported)  # verified loads of both kinds


def test_transformers_loads_an_export_with_checksums_and_does_not_carry_them_on(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    assert not hasattr(model.config, CHECKSUMS)
    model.config.save_pretrained(tmp_path)
    assert CHECKSUMS not in json.loads((tmp_path / "config.json").read_text())


def test_a_truncated_weights_file_is_refused_naming_it(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    weights = bad / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=f"{weights}: sha256 differs .* OMNI_VERIFY_WEIGHTS=0"):
        load_model(bad)
    with pytest.raises(ConfigError, match=f"{weights}: not a readable safetensors file"):
        load_model(bad, verify=False)  # unchecked, the reader's own error still names the file


def test_the_cli_reports_a_damaged_weights_file_in_one_line(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    weights = bad / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = cli_error("-q", "export", "--ckpt", str(bad), "--out", str(tmp_path / "out"))
    assert message.startswith(f"config error: {weights}: sha256 differs") and "\n" not in message


def test_a_tampered_export_shard_is_refused_naming_it(exported, tmp_path):
    bad = _copy(exported, tmp_path)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one value changed, the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"{shard}: sha256 differs"):
        load_model(bad)


def test_a_relabelled_dtype_is_refused(folder, exported, tmp_path):
    bad = _copy(folder, tmp_path)
    key = "llm.model.norm.weight"
    _relabel(bad / WEIGHTS, key, "F32", "I32")
    with pytest.raises(ConfigError, match=f"{bad / WEIGHTS}: sha256 differs"):
        load_model(bad)
    _drop_checksums(bad / CONFIG)  # an older folder: no hashes, the dtype check still stands
    with pytest.raises(ConfigError, match=f"{bad / WEIGHTS}: tensor {key} is stored as torch.int32, not a floating"):
        load_model(bad)
    # an export's config.json names its dtype: a floating tensor of another one is refused, naming it
    bad = _copy(exported, tmp_path)
    _drop_checksums(bad / "config.json")
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    state = load_file(shard)
    name = sorted(state)[0]
    state[name] = state[name].half()
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"{shard}: tensor {name} is float16 but the config says float32"):
        load_model(bad)


def test_nan_weights_are_refused_naming_the_tensor_and_the_file(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = sorted(k for k in state if k.startswith("projectors.image"))[0]
    state[name].view(-1)[0] = float("nan")
    out = save_model_dir(model, tok, tmp_path / "nan", state_dict=state)  # hashes recorded: the file is intact
    with pytest.raises(ConfigError, match=f"{out / WEIGHTS}: tensor {name} holds NaN or inf"):
        load_model(out)
    loaded, _ = load_model(out, verify=False)  # the opt-out for speed skips the scan
    monkeypatch.setenv("OMNI_VERIFY_WEIGHTS", "0")
    loaded, _ = load_model(out)
    assert torch.isnan(dict(loaded.named_parameters())[name]).any()


def test_output_folders_and_files_get_the_users_umask(tiny_model, tmp_path):
    model, tok = tiny_model
    old = os.umask(0o022)
    try:
        out = save_model_dir(model, tok, tmp_path / "final")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777, (out / WEIGHTS).stat().st_mode & 0o777) == (0o755, 0o644)
    assert (out / "tokenizer").stat().st_mode & 0o777 == 0o755


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_run(folder, tmp_path):
    host = socket.gethostname()
    stale = tmp_path / f".export.tmp-{host}-{_dead_pid()}"
    live = tmp_path / f".export.tmp-{host}-{os.getppid()}"  # a running process's: left alone
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    export_model(folder, tmp_path / "export")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_a_write_killed_between_its_renames_gets_the_previous_folder_back(tmp_path):
    target = tmp_path / "final"
    old = tmp_path / f".final.old-{socket.gethostname()}-{_dead_pid()}"
    old.mkdir()
    (old / "kept.txt").write_text("previous")
    with atomic_dir(target) as tmp:  # the previous folder is back before the new one replaces it
        assert (target / "kept.txt").read_text() == "previous"
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "new.txt").is_file()


def test_export_out_inside_the_source_folder_is_refused(folder, tmp_path):
    run = _copy(folder, tmp_path)
    with pytest.raises(ExportError, match="lies inside the folder being exported"):
        export_model(run, run / "export")
    message = cli_error("-q", "export", "--ckpt", str(run), "--out", str(run / "sub" / "export"))
    assert message.startswith(f"export error: --out {run / 'sub' / 'export'} lies inside the folder being exported")
    assert not (run / "export").exists() and not (run / "sub").exists()
