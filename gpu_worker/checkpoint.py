"""Finding and loading a Moondream 2 or Moondream 3 checkpoint: config, tokenizer, weights.

The family comes from config.json (`"model": "moondream3"` or a `text.moe` object; the hub's
Moondream 3 preview by its repo id).  Sources:
- a local directory with config.json, model.safetensors, tokenizer.json (the
  conformance fixtures use this form; a top-level "revision" in config.json
  selects revision behaviour);
- the hub id `vikhyatk/moondream2` at a pinned revision, fetched with
  huggingface_hub (honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE);
- the hub id `moondream/moondream3-preview` (gated; sharded weights) at a pinned commit;
- `random:full` / `random:tiny` (`random:md3-full` / `random:md3-tiny` for Moondream 3):
  seeded random weights with the real (or tiny) geometry, for benchmarks without the checkpoint.
Moondream's own engine's layout (Moondream 3.1) is mapped on load (engine_layout.py).

Every failure is a `ModelLoadError` with a one-line message saying what is wrong.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

HUB_REPO = "vikhyatk/moondream2"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
KNOWN_REVISIONS = ("2025-06-21", "2025-04-14")
# Where each revision's tokenizer lives on the hub (the checkpoint repo does not ship it).
TOKENIZER_SOURCES = {
    "2025-06-21": ("moondream/starmie-v1", None),
    "2025-04-14": ("vikhyatk/moondream2", "2025-01-09"),
}


# Moondream 3: how a config names the family, its revision label and the defaults that differ
# from Moondream 2's (the hub's config.json is empty: these are the real model's sizes).
MOONDREAM3 = "moondream3"
MOONDREAM3_REVISION = "moondream3-preview"
# The preview on the hub: gated (access is granted on accepting the licence), sharded weights,
# an empty config.json, the tokenizer of moondream/starmie-v1.  MOONDREAM_REVISION set to
# anything but a Moondream 2 revision replaces the pinned commit.
MOONDREAM3_HUB_REPO = "moondream/moondream3-preview"
MOONDREAM3_HUB_COMMIT = "5112966d1a723413b1c9a1e8bea272b72e647b35"
MOONDREAM3_LICENSE_PAGE = "https://huggingface.co/moondream/moondream3-preview/blob/main/LICENSE.md"
MOONDREAM3_DEFAULTS = {
    "revision": MOONDREAM3_REVISION, "family": MOONDREAM3, "max_context": 4096, "rope_theta": 1.5e6,
    "n_experts": 64, "moe_start_layer": 4, "experts_per_token": 8, "expert_inner_dim": 1024, "region_inner_dim": 0,
}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; str(err) is one line naming the cause."""


# Prompt templates and special ids of the real checkpoints, per revision.
_TOKENIZER_2025_06_21 = {
    "bos_id": 0, "eos_id": 0, "answer_id": 3, "thinking_id": 4, "coord_id": 5, "size_id": 6,
    "start_ground_points_id": 7, "end_ground_id": 9,
    "templates": {
        "caption": {"short": [1, 32708, 2, 12492, 3], "normal": [1, 32708, 2, 6382, 3], "long": [1, 32708, 2, 4059, 3]},
        "query": {"prefix": [1, 15381, 2], "suffix": [3]},
        "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
        "point": {"prefix": [1, 2581, 2], "suffix": [3]},
    },
}
_TOKENIZER_2025_04_14 = {
    "bos_id": 50256, "eos_id": 50256,
    "templates": {
        "caption": {"short": [198, 198, 16438, 8305, 25], "normal": [198, 198, 24334, 1159, 25], "long": [198, 198, 14617, 8305, 25]},
        "query": {"prefix": [198, 198, 24361, 25], "suffix": [198, 198, 33706, 25]},
        "detect": {"prefix": [198, 198, 47504, 25], "suffix": [628]},
        "point": {"prefix": [198, 198, 12727, 25], "suffix": [628]},
    },
}


@dataclass(frozen=True)
class ModelConfig:
    revision: str = "2025-06-21"
    # text
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32
    prefix_attn: int = 730
    # vision
    enc_dim: int = 1152
    patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_inner_dim: int = 8192
    crop_size: int = 378
    max_crops: int = 12
    overlap_margin: int = 4
    # region
    coord_feat_dim: int = 256
    size_feat_dim: int = 512
    region_inner_dim: int = 8192
    coord_out_dim: int = 1024
    size_out_dim: int = 2048
    # tokenizer ids and prompt templates
    tokenizer: dict = field(default_factory=lambda: _TOKENIZER_2025_06_21)
    # Moondream 3 (family "moondream3"): tau attention in every layer, mixture-of-experts
    # MLPs from `moe_start_layer` on, single-linear region decoders (region_inner_dim 0)
    family: str = "moondream2"
    rope_theta: float = 10000.0
    n_experts: int = 0  # 0: every text layer has a dense MLP
    moe_start_layer: int = 0
    experts_per_token: int = 0
    expert_inner_dim: int = 0
    tau_gelu: str = "erf"  # the GELU of the tau features: "erf" (the preview's reference) or "tanh"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def reasoning_supported(self) -> bool:
        return self.revision != "2025-04-14"

    @property
    def is_moondream3(self) -> bool:
        return self.family == "moondream3"

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.moe_start_layer

    @classmethod
    def from_json(cls, raw: dict, revision: str) -> "ModelConfig":
        """Moondream's config.json layout: {"text": {..}, "vision": {..}, "region": {..},
        "tokenizer": {..}}; the hub's files carry {"config": {}} = all defaults.  A top-level
        `"model": "moondream3"` (or a `text.moe` object) selects Moondream 3 and its defaults."""
        inner = raw.get("config", raw)
        text, vision, region = inner.get("text", {}), inner.get("vision", {}), inner.get("region", {})
        moondream3 = raw.get("model") == MOONDREAM3 or inner.get("model") == MOONDREAM3 or "moe" in text
        revision = raw.get("revision", MOONDREAM3_REVISION if moondream3 else revision)
        default_tok = _TOKENIZER_2025_04_14 if revision == "2025-04-14" else _TOKENIZER_2025_06_21
        d = cls(**MOONDREAM3_DEFAULTS) if moondream3 else cls()
        moe = text.get("moe") or {}
        return cls(
            revision=revision,
            dim=text.get("dim", d.dim), ff_dim=text.get("ff_dim", d.ff_dim),
            n_layers=text.get("n_layers", d.n_layers), vocab_size=text.get("vocab_size", d.vocab_size),
            max_context=text.get("max_context", d.max_context), n_heads=text.get("n_heads", d.n_heads),
            n_kv_heads=text.get("n_kv_heads", d.n_kv_heads), prefix_attn=text.get("prefix_attn", d.prefix_attn),
            enc_dim=vision.get("enc_dim", d.enc_dim), patch_size=vision.get("enc_patch_size", d.patch_size),
            enc_n_layers=vision.get("enc_n_layers", d.enc_n_layers), enc_ff_dim=vision.get("enc_ff_dim", d.enc_ff_dim),
            enc_n_heads=vision.get("enc_n_heads", d.enc_n_heads), proj_inner_dim=vision.get("proj_inner_dim", d.proj_inner_dim),
            crop_size=vision.get("crop_size", d.crop_size), max_crops=vision.get("max_crops", d.max_crops),
            overlap_margin=vision.get("overlap_margin", d.overlap_margin),
            coord_feat_dim=region.get("coord_feat_dim", d.coord_feat_dim), size_feat_dim=region.get("size_feat_dim", d.size_feat_dim),
            region_inner_dim=region.get("inner_dim", d.region_inner_dim),
            coord_out_dim=region.get("coord_out_dim", d.coord_out_dim), size_out_dim=region.get("size_out_dim", d.size_out_dim),
            tokenizer=inner.get("tokenizer", default_tok),
            family=d.family, rope_theta=float(text.get("rope_theta", d.rope_theta)),
            n_experts=moe.get("num_experts", d.n_experts), moe_start_layer=moe.get("start_layer", d.moe_start_layer),
            experts_per_token=moe.get("experts_per_token", d.experts_per_token),
            expert_inner_dim=moe.get("expert_inner_dim", d.expert_inner_dim),
            tau_gelu=text.get("tau_gelu", d.tau_gelu),
        )

    def weight_shapes(self) -> dict[str, tuple]:
        """Every expected weight (checkpoint key minus "model.") and its shape."""
        s: dict[str, tuple] = {}

        def lin(name, out_f, in_f):
            s[name + ".weight"] = (out_f, in_f)
            s[name + ".bias"] = (out_f,)

        def norm(name, n):
            s[name + ".weight"] = (n,)
            s[name + ".bias"] = (n,)

        e = self.enc_dim
        lin("vision.patch_emb", e, 3 * self.patch_size ** 2)
        s["vision.pos_emb"] = (1, (self.crop_size // self.patch_size) ** 2, e)
        for i in range(self.enc_n_layers):
            b = f"vision.blocks.{i}"
            norm(b + ".ln1", e)
            norm(b + ".ln2", e)
            lin(b + ".attn.qkv", 3 * e, e)
            lin(b + ".attn.proj", e, e)
            lin(b + ".mlp.fc1", self.enc_ff_dim, e)
            lin(b + ".mlp.fc2", e, self.enc_ff_dim)
        norm("vision.post_ln", e)
        lin("vision.proj_mlp.fc1", self.proj_inner_dim, 2 * e)
        lin("vision.proj_mlp.fc2", self.dim, self.proj_inner_dim)

        d, hd = self.dim, self.head_dim
        s["text.wte"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            b = f"text.blocks.{i}"
            norm(b + ".ln", d)
            lin(b + ".attn.qkv", (self.n_heads + 2 * self.n_kv_heads) * hd, d)
            lin(b + ".attn.proj", d, d)
            if self.is_moondream3:  # per-head temperatures over the whole qkv output
                qkv_dim = (self.n_heads + 2 * self.n_kv_heads) * hd
                s[b + ".attn.tau.wq"] = (self.n_heads, qkv_dim)
                s[b + ".attn.tau.wv"] = (self.n_heads, qkv_dim)
                s[b + ".attn.tau.alpha"] = (self.n_heads,)
            if self.is_moe_layer(i):  # experts stacked: fc1 [expert, 2 x inner, dim], fc2 [expert, dim, inner]
                lin(b + ".mlp.router", self.n_experts, d)
                s[b + ".mlp.fc1.weight"] = (self.n_experts, 2 * self.expert_inner_dim, d)
                s[b + ".mlp.fc2.weight"] = (self.n_experts, d, self.expert_inner_dim)
            else:
                lin(b + ".mlp.fc1", self.ff_dim, d)
                lin(b + ".mlp.fc2", d, self.ff_dim)
        norm("text.post_ln", d)
        lin("text.lm_head", self.vocab_size, d)

        s["region.coord_features"] = (1, self.coord_feat_dim // 2)
        lin("region.coord_encoder", d, self.coord_feat_dim)
        s["region.size_features"] = (2, self.size_feat_dim // 2)
        lin("region.size_encoder", d, self.size_feat_dim)
        for decoder, out_dim in (("region.coord_decoder", self.coord_out_dim), ("region.size_decoder", self.size_out_dim)):
            if self.region_inner_dim:  # Moondream 2: two-layer MLPs
                lin(decoder + ".fc1", self.region_inner_dim, d)
                lin(decoder + ".fc2", out_dim, self.region_inner_dim)
            else:  # Moondream 3: one linear on the hidden state
                lin(decoder, out_dim, d)
        return s


TINY_CONFIG = {
    "text": {"dim": 128, "ff_dim": 256, "n_layers": 3, "vocab_size": 512, "n_heads": 2, "n_kv_heads": 2},
    "vision": {"enc_dim": 32, "enc_ff_dim": 64, "enc_n_heads": 2, "proj_inner_dim": 128},
    "region": {"inner_dim": 128},
    # the conformance models' template ids, which fit the tiny vocabulary
    "tokenizer": {**_TOKENIZER_2025_06_21, "templates": {
        "caption": {"short": [1, 300, 2, 301, 3], "normal": [1, 300, 2, 302, 3], "long": [1, 300, 2, 303, 3]},
        "query": {"prefix": [1, 304, 2], "suffix": [3]},
        "detect": {"prefix": [1, 305, 306, 2], "suffix": [3]},
        "point": {"prefix": [1, 307, 2], "suffix": [3]},
    }},
}


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict  # name -> tensor on the target device, in the serving dtype
    tokenizer: object  # tokenizers.Tokenizer
    source: str  # what was loaded, for /health
    test_model: bool  # random or fixture weights: answers are gibberish


def resolve_device(device: str) -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"MOONDREAM_DEVICE={device} but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, revision: str) -> torch.dtype:
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype in ("", "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if revision == "2025-04-14" else torch.bfloat16
    if dtype not in names:
        raise ModelLoadError(f"MOONDREAM_DTYPE={dtype} is not one of auto, {', '.join(sorted(names))}")
    return names[dtype]


def load_checkpoint(model: str, revision: str, device: str = "auto", dtype: str = "auto",
                    hf_token: str = "", convert=None) -> Checkpoint:
    """Load from a local directory, the hub, or random weights (see module doc).
    `convert(config)`, when given, returns a hook called after each tensor is added
    (`hook(weights, name)`), which may replace tensors (int8: gpu_worker/quantize.py)."""
    if model.startswith("random:"):
        return _random_checkpoint(model, revision, device, dtype, convert)
    if os.path.isdir(model):
        return _load_directory(model, revision, device, dtype, source=model, convert=convert)
    if model == MOONDREAM3_HUB_REPO:
        pin = MOONDREAM3_HUB_COMMIT if revision in KNOWN_REVISIONS else revision
        directory = _download_moondream3(model, pin, hf_token)
        return _load_directory(directory, MOONDREAM3_REVISION, device, dtype, source=f"{model}@{pin}", convert=convert)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"MOONDREAM_MODEL={model} is not a directory here, nor a hub id like vikhyatk/moondream2 "
                             "(a checkpoint directory holds config.json, model.safetensors and tokenizer.json)")
    directory = _download(model, revision, hf_token)
    return _load_directory(directory, revision, device, dtype, source=f"{model}@{revision}", convert=convert)


def _download(repo: str, revision: str, hf_token: str) -> str:
    """Fetch config, weights and the revision's tokenizer into the HF cache; returns a
    directory laid out like a local checkpoint."""
    if revision not in KNOWN_REVISIONS:
        raise ModelLoadError(f"revision {revision!r} is not supported (known: {', '.join(KNOWN_REVISIONS)})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise ModelLoadError(f"huggingface_hub is not installed: {err}") from None
    token = hf_token or None
    try:
        weights = hf_hub_download(repo, "model.safetensors", revision=revision, token=token)
        config = hf_hub_download(repo, "config.json", revision=revision, token=token)
        tok_repo, tok_rev = TOKENIZER_SOURCES[revision]
        tokenizer = hf_hub_download(tok_repo, "tokenizer.json", revision=tok_rev, token=token)
    except Exception as err:  # network, auth, offline mode, missing file: all one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not fetch {repo}@{revision} from the Hugging Face hub ({type(err).__name__}: {reason}); "
            "check network access and HF_TOKEN, or set MOONDREAM_MODEL to a local checkpoint directory"
        ) from None
    return _assemble_directory(config, weights, tokenizer, revision)


def _download_moondream3(repo: str, pin: str, hf_token: str) -> str:
    """Fetch the Moondream 3 preview (config, every weight shard, the tokenizer) into the HF
    cache; returns a directory laid out like a local checkpoint.  A refusal of the gated
    repository is one line naming the licence page."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise ModelLoadError(f"huggingface_hub is not installed: {err}") from None
    token = hf_token or None
    try:
        config = hf_hub_download(repo, "config.json", revision=pin, token=token)
        try:
            index = hf_hub_download(repo, WEIGHTS_INDEX, revision=pin, token=token)
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except EntryNotFoundError:
            index, shards = None, [WEIGHTS_FILE]
        shard_paths = {name: hf_hub_download(repo, name, revision=pin, token=token) for name in shards}
        tok_repo, tok_rev = TOKENIZER_SOURCES["2025-06-21"]
        tokenizer = hf_hub_download(tok_repo, "tokenizer.json", revision=tok_rev, token=token)
    except GatedRepoError:
        raise ModelLoadError(
            f"access to {repo} was refused: the repository is gated; accept the Moondream 3 licence at "
            f"{MOONDREAM3_LICENSE_PAGE} with your Hugging Face account and set HF_TOKEN to a token of that account"
        ) from None
    except Exception as err:  # network, auth, offline mode, missing file: all one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not fetch {repo}@{pin} from the Hugging Face hub ({type(err).__name__}: {reason}); "
            "check network access and HF_TOKEN, or set MOONDREAM_MODEL to a local checkpoint directory"
        ) from None
    base = os.path.join(os.path.dirname(os.path.dirname(config)), f"moondream-serving-{MOONDREAM3_REVISION}")
    os.makedirs(base, exist_ok=True)
    links = {**shard_paths, "tokenizer.json": tokenizer, **({WEIGHTS_INDEX: index} if index else {})}
    for name, src in links.items():
        dst = os.path.join(base, name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.realpath(src), dst)
    with open(config) as f:
        raw = json.load(f)
    with open(os.path.join(base, "config.json"), "w") as f:  # the hub's file does not say which model it is
        json.dump({**raw, "model": MOONDREAM3, "revision": MOONDREAM3_REVISION}, f)
    return base


def _assemble_directory(config_path: str, weights_path: str, tokenizer_path: str, revision: str) -> str:
    """Link the three cached files into one directory (the hub keeps them in different repos)."""
    base = os.path.join(os.path.dirname(os.path.dirname(weights_path)), f"moondream-serving-{revision}")
    os.makedirs(base, exist_ok=True)
    for name, src in (("config.json", config_path), ("model.safetensors", weights_path), ("tokenizer.json", tokenizer_path)):
        dst = os.path.join(base, name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.realpath(src), dst)
    with open(config_path) as f:
        raw = json.load(f)
    if "revision" not in raw:
        raw = {"revision": revision, **raw}
        os.remove(os.path.join(base, "config.json"))
        with open(os.path.join(base, "config.json"), "w") as f:
            json.dump(raw, f)
    return base


def _load_directory(path: str, revision: str, device: str, dtype: str, source: str, convert=None) -> Checkpoint:
    files = {name: os.path.join(path, name) for name in ("config.json", WEIGHTS_FILE, "tokenizer.json")}
    sharded = not os.path.isfile(files[WEIGHTS_FILE]) and os.path.isfile(os.path.join(path, WEIGHTS_INDEX))
    if sharded:  # the hub's large checkpoints: model.safetensors.index.json names the shards
        files[WEIGHTS_FILE] = os.path.join(path, WEIGHTS_INDEX)
    for name, full in files.items():
        if not os.path.isfile(full):
            raise ModelLoadError(f"checkpoint directory {path} has no {name}")
    try:
        with open(files["config.json"]) as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{files['config.json']} is not valid JSON: {err}") from None
    config = ModelConfig.from_json(raw, revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, config.revision)
    weights = _read_weights(files[WEIGHTS_FILE], config, dev, dt, convert(config) if convert else None)
    tokenizer = _read_tokenizer(files["tokenizer.json"])
    # Decided from the model itself, never its path: anything narrower than Moondream 2's
    # real text width (2048) is one of the tiny random-weight test models.
    test_model = config.dim < ModelConfig().dim
    return Checkpoint(config, weights, tokenizer, source, test_model)


def _read_weights(path: str, config: ModelConfig, device: torch.device, dtype: torch.dtype, hook=None) -> dict:
    """Tensor by tensor from safetensors (one file, or the shards an index names) straight
    to the device in the serving dtype, so the host never holds a float32 copy of the whole
    model.  A missing or misshapen tensor is one line naming it."""
    import contextlib

    from safetensors import safe_open

    from gpu_worker import engine_layout

    expected = config.weight_shapes()
    weights = {}
    try:
        with contextlib.ExitStack() as stack:
            handles = {}  # checkpoint key -> the open file holding it
            for file in _weight_files(path):
                f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                handles.update((key, f) for key in f.keys())
            # our name -> (checkpoint key, loader): the reference's keys, or Moondream's engine's mapped
            if engine_layout.is_engine_layout(handles):
                mapped = engine_layout.sources(handles, lambda key: handles[key].get_tensor(key))
            else:
                mapped = {key[len("model."):]: (key, lambda key=key: handles[key].get_tensor(key))
                          for key in handles if key.startswith("model.")}
            if "region.ln.weight" in mapped:  # Moondream 3.1: a LayerNorm before the region decoders
                expected = {**expected, "region.ln.weight": (config.dim,), "region.ln.bias": (config.dim,)}
            for name, shape in expected.items():
                if name not in mapped:
                    raise ModelLoadError(f"{path}: missing weight model.{name}")
                key, load = mapped[name]
                actual = tuple(handles[key].get_slice(key).get_shape()) if key == "model." + name else None
                tensor = None
                if actual is None:  # a mapped tensor: its shape once in our layout
                    tensor = load()
                    actual = tuple(tensor.shape)
                if actual != shape:
                    raise ModelLoadError(f"{path}: weight {key} has shape {actual}, expected {shape}")
                weights[name] = (tensor if tensor is not None else load()).to(device=device, dtype=dtype)
                if hook is not None:
                    hook(weights, name)
    except ModelLoadError:
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path} is not a readable safetensors file: {reason}") from None
    return weights


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: the file itself, or the shards its index names."""
    if not path.endswith(".json"):
        return [path]
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(os.path.dirname(path), shard) for shard in shards]


def _read_tokenizer(path: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as err:
        raise ModelLoadError(f"{path} is not a valid tokenizer.json: {err}") from None


RANDOM_CONFIGS = {
    "full": {}, "tiny": TINY_CONFIG,
    # Moondream 3's real geometry, and a tiny one shaped like its conformance models
    "md3-full": {"model": MOONDREAM3},
    "md3-tiny": {**TINY_CONFIG, "model": MOONDREAM3, "text": {
        **TINY_CONFIG["text"], "n_layers": 4, "max_context": 1024,
        "moe": {"num_experts": 8, "start_layer": 2, "experts_per_token": 3, "expert_inner_dim": 64}}, "region": {}},
}


def _random_checkpoint(model: str, revision: str, device: str, dtype: str, convert=None) -> Checkpoint:
    """Seeded random weights with the full (or tiny) geometry, built directly on the device,
    tensor by tensor (each through `convert`'s hook when given)."""
    size = model.split(":", 1)[1]
    if size not in RANDOM_CONFIGS:
        raise ModelLoadError(f"MOONDREAM_MODEL={model}: use one of " + ", ".join(f"random:{s}" for s in RANDOM_CONFIGS))
    raw = {"revision": revision, **RANDOM_CONFIGS[size]}
    if raw.get("model") == MOONDREAM3:
        raw["revision"] = MOONDREAM3_REVISION
    config = ModelConfig.from_json(raw, revision)
    hook = convert(config) if convert else None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, config.revision)
    gen = torch.Generator(device=dev).manual_seed(1234)
    weights = {}
    for name, shape in config.weight_shapes().items():
        if name.endswith(".weight") and (".ln" in name or "post_ln" in name):
            t = torch.ones(shape, device=dev, dtype=dt)
        elif name.endswith(".bias") and (".ln" in name or "post_ln" in name):
            t = torch.zeros(shape, device=dev, dtype=dt)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = 0.02 if len(shape) == 1 else min(0.02, 1.0 / math.sqrt(fan_in))
            t = torch.empty(shape, device=dev, dtype=dt)
            t.normal_(0.0, std, generator=gen)
        weights[name] = t
        if hook is not None:
            hook(weights, name)
    tokenizer = _byte_level_tokenizer(config.vocab_size)
    return Checkpoint(config, weights, tokenizer, model, test_model=True)


def _byte_level_tokenizer(vocab_size: int):
    """A stand-in tokenizer for random weights: byte-level BPE with an empty merge
    list, padded to the vocabulary size.  Ids decode to bytes; enough for benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
