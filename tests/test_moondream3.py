"""Moondream 3 beyond the end-to-end conformance cases (tests/test_conformance.py):
each decoder block against the reference's per-block tensors, the MoE dispatch, the
coord-or-EOS rule, the model's defaults, and what is refused (at load and per request)."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpu_worker import model as M
from gpu_worker import moondream3 as MD3
from gpu_worker.checkpoint import ModelConfig, ModelLoadError, load_checkpoint
from gpu_worker.engine import Engine
from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import PromptTooLong, Scheduler
from gpu_worker.variants import VariantsUnsupported
from shared.protocol import CaptionParams, DetectParams, PointParams, QueryParams, SamplingSettings
from tests.engine_helpers import CONFORMANCE, fixture_engine, fixture_image, run_requests

MAIN = os.path.join(CONFORMANCE, "md3-main")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(got, ref):
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(scope="module")
def unit():
    with open(os.path.join(MAIN, "expected.json")) as f:
        exp = json.load(f)
    return exp["unit"], exp["cases"][exp["unit"]["case"]], load_file(os.path.join(MAIN, "expected_tensors.safetensors"))


def test_family_and_sizes_come_from_the_config():
    engine = fixture_engine("md3-main")
    cfg = engine.config
    assert cfg.is_moondream3 and cfg.revision == "moondream3-preview"
    assert (cfg.n_experts, cfg.moe_start_layer, cfg.experts_per_token, cfg.expert_inner_dim) == (8, 2, 3, 64)
    assert cfg.rope_theta == 1.5e6 and cfg.region_inner_dim == 0 and cfg.max_context == 1024
    real = ModelConfig.from_json({"model": "moondream3", "config": {}}, "2025-06-21")  # the hub's empty config
    assert (real.max_context, real.n_experts, real.experts_per_token, real.moe_start_layer) == (4096, 64, 8, 4)
    shapes = real.weight_shapes()
    assert shapes["text.blocks.4.mlp.fc1.weight"] == (64, 2048, 2048)
    assert shapes["text.blocks.23.mlp.fc2.weight"] == (64, 2048, 1024)
    assert shapes["text.blocks.3.mlp.fc1.weight"] == (8192, 2048)
    assert shapes["text.blocks.0.attn.tau.wq"] == (32, 6144)
    assert shapes["region.size_decoder.weight"] == (2048, 2048)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert 9.2e9 < total < 9.35e9  # the spec's ~9.27 B parameters
    assert not fixture_engine("main").config.is_moondream3


def _run_blocks(engine, block_inputs, positions, cache_kv=None):
    """Each block on the reference's own input for it: (attn_out, mlp_out, route) per block,
    and the keys/values each block stored (for the decode step)."""
    w, cfg = engine.weights, engine.config
    cos = engine.rope[0][positions].view(1, 1, len(positions), -1)
    sin = engine.rope[1][positions].view(1, 1, len(positions), -1)
    log_pos = MD3.log_positions(positions.view(1, -1))
    out, stored = [], []
    for i, x in enumerate(block_inputs):
        b = f"text.blocks.{i}"
        h = M._layer_norm(x.unsqueeze(0), w, b + ".ln")

        def attend(q, k, v, layer=i):
            stored.append((k, v))
            if cache_kv is not None:
                k = torch.cat([cache_kv[layer][0], k], dim=2)
                v = torch.cat([cache_kv[layer][1], v], dim=2)
                return F.scaled_dot_product_attention(q, k, v)  # one query at the end: sees everything
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def tau(qkv, name=b + ".attn"):
            return MD3.tau_scale(qkv, w, name, cfg, log_pos)

        attn = M._text_attention(h, w, b + ".attn", cfg, cos, sin, attend, None, tau)[0]
        if cfg.is_moe_layer(i):
            mlp = MD3.moe_mlp(h, w, b + ".mlp", cfg)[0]
            routed = MD3.route(h[0], w, b + ".mlp", cfg)
        else:
            mlp, routed = M._mlp(h, w, b + ".mlp")[0], None
        out.append((attn, mlp, routed))
    return out, stored


def test_every_block_matches_the_reference_prefill_and_decode(unit):
    """Per block: attention (tau, rotary theta) and the dense or MoE branch, with the experts
    picked and their weights, for the text-only prefill and its first decode step."""
    info, case, ref = unit
    engine = fixture_engine("md3-main")
    cfg = engine.config
    start, end = info["prefill_positions"]
    prefill_pos = torch.arange(start, end + 1)
    embeds = engine.embed_tokens(case["prompt_tokens"])
    assert rel_err(embeds, ref["unit.prefill.block0.in"]) == 0.0
    prefill_inputs = [ref[f"unit.prefill.block{i}.in"] for i in range(cfg.n_layers)]
    results, stored = _run_blocks(engine, prefill_inputs, prefill_pos)
    decode_inputs = [ref[f"unit.decode0.block{i}.in"] for i in range(cfg.n_layers)]
    assert rel_err(engine.embed_tokens([info["decode0_token"]]), ref["unit.decode0.block0.in"]) == 0.0
    decode_results, _ = _run_blocks(engine, decode_inputs, torch.tensor([info["decode0_position"]]), stored)
    stages = [("prefill", results), ("decode0", decode_results)]
    for stage, per_block in stages:
        for i, (attn, mlp, routed) in enumerate(per_block):
            name = f"unit.{stage}.block{i}"
            assert rel_err(attn, ref[name + ".attn_out"]) <= 1e-5, name
            assert rel_err(mlp, ref[name + ".mlp_out"]) <= 1e-5, name
            if routed is not None:
                experts, weights = routed
                assert torch.equal(experts, ref[name + ".moe_topk_idx"]), name
                assert rel_err(weights, ref[name + ".moe_topk_weight"]) <= 1e-5, name
            if i + 1 < cfg.n_layers:  # the branches add up to the next block's input
                x = (prefill_inputs if stage == "prefill" else decode_inputs)[i]
                assert rel_err(x + attn + mlp, ref[f"unit.{stage}.block{i + 1}.in"]) <= 1e-5, name


def test_engine_forward_reproduces_the_last_block(unit):
    """The serving path (KV blocks, batched forward) ends where the reference's last block ends."""
    info, case, ref = unit
    engine = fixture_engine("md3-main")
    last = engine.config.n_layers - 1
    cache = engine.new_cache(8)
    seq = cache.open_sequence(None, info["decode0_position"] + 1)
    embeds = engine.embed_tokens(case["prompt_tokens"]).unsqueeze(0)
    hidden = engine.forward(embeds, [0], [seq], cache)
    want = sum(ref[f"unit.prefill.block{last}.{part}"][-1] for part in ("in", "attn_out", "mlp_out"))
    assert rel_err(hidden[0], want) <= 1e-5
    step = engine.forward(engine.embed_tokens([info["decode0_token"]]).unsqueeze(0), [info["decode0_position"]], [seq], cache)
    want = sum(ref[f"unit.decode0.block{last}.{part}"][0] for part in ("in", "attn_out", "mlp_out"))
    assert rel_err(step[0], want) <= 1e-5


def test_routing_ties_go_to_the_lower_expert_index():
    cfg = ModelConfig(n_experts=6, experts_per_token=3, family="moondream3", dim=4)
    w = {"mlp.router.weight": torch.zeros(6, 4), "mlp.router.bias": torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 2.0])}
    experts, weights = MD3.route(torch.ones(2, 4), w, "mlp", cfg)
    assert experts.tolist() == [[1, 2, 4], [1, 2, 4]]  # four experts tie at 2.0 for three places
    assert torch.allclose(weights, torch.full((2, 3), 1 / 3))


class CountingExperts:
    """Wraps stacked expert weights to count how often each expert runs and on how many rows."""

    def __init__(self, stacked, calls):
        self.stacked, self.calls = stacked, calls

    def __getitem__(self, expert):
        def run(x):
            self.calls.append((expert, x.shape[0]))
            return F.linear(x, self.stacked[expert])
        return run


def test_each_active_expert_runs_once_per_step_on_all_its_rows():
    engine = fixture_engine("md3-main")
    cfg, name = engine.config, "text.blocks.2.mlp"
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(5, 7, cfg.dim, generator=gen)
    calls = []
    w = {**engine.weights, name + ".fc1.weight": CountingExperts(engine.weights[name + ".fc1.weight"], calls)}
    out = MD3.moe_mlp(h, w, name, cfg)
    experts, weights = MD3.route(h.reshape(-1, cfg.dim), engine.weights, name, cfg)
    counts = torch.bincount(experts.reshape(-1), minlength=cfg.n_experts)
    assert sorted(calls) == [(e, int(n)) for e, n in enumerate(counts.tolist()) if n]  # once each, all its rows
    # the same sum computed token by token, expert by expert (the spec's formula)
    x = h.reshape(-1, cfg.dim)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, weight in zip(experts[t].tolist(), weights[t]):
            u = x[t] @ engine.weights[name + ".fc1.weight"][e].T
            a = F.gelu(u[:cfg.expert_inner_dim]) * (u[cfg.expert_inner_dim:] + 1)
            want[t] += weight * (a @ engine.weights[name + ".fc2.weight"][e].T)
    assert rel_err(out.reshape(-1, cfg.dim), want) <= 1e-5


def _engine_with_lm_head(change) -> Engine:
    checkpoint = load_checkpoint(MAIN, "", "cpu", "float32")
    change(checkpoint.weights["text.lm_head.weight"], checkpoint.weights["text.lm_head.bias"])
    return Engine(checkpoint)


def test_after_an_object_coord_wins_a_tie_with_eos():
    """The first decision is the whole vocabulary's argmax (token 300 here: not EOS, so an object
    starts); after each object only coord (5) and EOS (0) compete, and coord wins a tie."""
    def rows_tied(margin):
        def change(weight, bias):
            weight[0] = weight[5]
            bias[0] = bias[5] + margin
            bias[300] = 1000.0  # wins the first, full-vocabulary decision; plays no part later
        return change

    image = fixture_image("md3-main", "square_378.png")
    found = {}
    for label, margin in (("tie", 0.0), ("eos", 1e-3)):
        sched = Scheduler(_engine_with_lm_head(rows_tied(margin)), max_batch=1)
        req = EngineRequest(label, "point", PointParams(object="cat"), SamplingSettings(max_objects=4), image)
        found[label] = run_requests(sched, [req])[label].output["points"]
    assert len(found["tie"]) == 4  # coord on every tie, up to max_objects
    assert len(found["eos"]) == 1  # EOS a hair ahead: one object, then stop


def test_moondream3_defaults_and_reasoning_by_default():
    engine = fixture_engine("md3-main")
    sched = Scheduler(engine, max_batch=2)
    plain = EngineRequest("d", "point", PointParams(object="cat"), SamplingSettings(), fixture_image("md3-main", "small_96x64.png"))
    sched.add(plain)
    assert plain.settings.top_p == 0.9 and plain.settings.max_objects == 150
    assert plain.settings.temperature == 0.5 and plain.settings.max_tokens == 768
    sched.abort("d")
    query = EngineRequest("q", "query", QueryParams(question="What is in the image?"), SamplingSettings(temperature=0, max_tokens=4),
                          fixture_image("md3-main", "small_96x64.png"))
    out = run_requests(sched, [query])["q"]
    assert out.error is None and "reasoning" in out.output
    no = EngineRequest("n", "query", QueryParams(question="What is in the image?", reasoning=False),
                       SamplingSettings(temperature=0, max_tokens=4), fixture_image("md3-main", "small_96x64.png"))
    assert "reasoning" not in run_requests(sched, [no])["n"].output
    moondream2 = Scheduler(fixture_engine("main"), max_batch=1)
    md2 = EngineRequest("m", "point", PointParams(object="cat"), SamplingSettings(), fixture_image("main", "small_96x64.png"))
    moondream2.add(md2)
    assert md2.settings.top_p == 0.3 and md2.settings.max_objects == 50


def test_a_variant_on_moondream3_is_refused_before_any_work():
    sched = Scheduler(fixture_engine("md3-main"), max_batch=1)
    for variant in ("ft-alpha@100", "ft-alpha"):
        req = EngineRequest("v", "caption", CaptionParams(), SamplingSettings(), fixture_image("md3-main", "small_96x64.png"), variant=variant)
        with pytest.raises(VariantsUnsupported) as err:
            sched.add(req)
        assert err.value.status == 422 and "variants are not supported" in str(err.value)
    assert not sched.has_work()


def test_prompt_plus_max_tokens_over_the_context_is_refused_before_any_work():
    engine = fixture_engine("md3-main")  # the tiny model's context: 1024 positions
    sched = Scheduler(engine, max_batch=1)
    image = fixture_image("md3-main", "small_96x64.png")
    prompt = len(engine.tokenizer.encode("Hi", add_special_tokens=False).ids) + 4  # [1, 304, 2] ... [3]
    fits = EngineRequest("ok", "query", QueryParams(question="Hi", reasoning=False), SamplingSettings(max_tokens=1024 - 730 - prompt), image)
    sched.add(fits)
    sched.abort("ok")
    over = EngineRequest("x", "query", QueryParams(question="Hi", reasoning=False), SamplingSettings(max_tokens=1024 - 730 - prompt + 1), image)
    with pytest.raises(PromptTooLong, match="context holds 1024"):
        sched.add(over)
    text_only = EngineRequest("t", "caption", CaptionParams(length="long"), SamplingSettings(max_tokens=2000), image)
    with pytest.raises(PromptTooLong):
        sched.add(text_only)
    assert not sched.has_work() and sched.stats()["image_encodes"] == 0


# ------------------------------------------------------------------------- loading
def _copy_fixture(tmp_path, change=None):
    target = tmp_path / "md3"
    os.makedirs(target)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(MAIN, name), target / name)
    tensors = load_file(os.path.join(MAIN, "model.safetensors"))
    if change is not None:
        change(tensors)
    return target, tensors


def test_a_missing_tensor_fails_at_load_naming_it(tmp_path):
    target, tensors = _copy_fixture(tmp_path, lambda t: t.pop("model.text.blocks.3.attn.tau.alpha"))
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(target), "", "cpu", "float32")
    assert "missing weight model.text.blocks.3.attn.tau.alpha" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_misshapen_expert_tensor_fails_at_load_naming_it(tmp_path):
    def drop_an_expert(t):
        t["model.text.blocks.2.mlp.fc2.weight"] = t["model.text.blocks.2.mlp.fc2.weight"][:7].contiguous()

    target, tensors = _copy_fixture(tmp_path, drop_an_expert)
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(str(target), "", "cpu", "float32")
    message = str(err.value)
    assert "model.text.blocks.2.mlp.fc2.weight has shape (7, 128, 64), expected (8, 128, 64)" in message
    assert "\n" not in message


def test_sharded_weights_load_like_one_file(tmp_path):
    """The hub's layout: model.safetensors.index.json naming the shards."""
    target, tensors = _copy_fixture(tmp_path)
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in halves.items():
        save_file({k: tensors[k] for k in names}, str(target / shard))
        weight_map.update({k: shard for k in names})
    with open(target / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    sharded = load_checkpoint(str(target), "", "cpu", "float32")
    whole = fixture_engine("md3-main").weights
    assert sharded.config.is_moondream3 and sharded.weights.keys() == whole.keys()
    assert all(torch.equal(sharded.weights[k], whole[k]) for k in whole)


class GatedHub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the hub that refuses a gated repository the way the hub does."""

    def _refuse(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model moondream/moondream3-preview is restricted.")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Access to model moondream/moondream3-preview is restricted."}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_GET = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def test_a_refused_gated_repository_is_one_line_naming_the_licence_page(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_not_granted", "HF_HUB_OFFLINE": "0"}
        code = ("from gpu_worker.checkpoint import load_checkpoint, ModelLoadError\n"
                "try:\n    load_checkpoint('moondream/moondream3-preview', '2025-06-21', 'cpu', 'float32', "
                "'hf_not_granted')\nexcept ModelLoadError as err:\n    print(err)\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        server.shutdown()
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    assert "moondream/moondream3-preview" in lines[0] and "gated" in lines[0]
    assert "https://huggingface.co/moondream/moondream3-preview/blob/main/LICENSE.md" in lines[0]
    assert "HF_TOKEN" in lines[0]


def test_batched_rows_on_different_experts_equal_each_row_alone():
    """One decode-sized batch whose rows route to different experts gives each row what it gets alone."""
    engine = fixture_engine("md3-main")
    cache = engine.new_cache(4)
    prompts = [[1, 304, 2, 64, 81, 3], [1, 300, 2, 301, 3, 7], [1, 305, 306, 2, 40, 3], [1, 307, 2, 9, 9, 3]]
    embeds = torch.stack([engine.embed_tokens(p) for p in prompts])
    together = engine.forward(embeds, [0] * 4, [cache.open_sequence(None, len(p)) for p in prompts], cache)
    for i, p in enumerate(prompts):
        alone_cache = engine.new_cache(1)
        alone = engine.forward(embeds[i:i + 1], [0], [alone_cache.open_sequence(None, len(p))], alone_cache)
        assert rel_err(together[i], alone[0]) <= 1e-6, i


def test_the_served_family_decides_the_model_names():
    """moondream3-preview names Moondream 3 when it is served, and is an alias of Moondream 2 otherwise."""
    from api.models import ModelNames, ModelNotFound
    from shared.config import Config

    md3 = ModelNames(Config(model=MAIN))
    assert md3.base == "moondream3-preview" and md3.variant_of("moondream3-preview") is None
    assert md3.variant_of("moondream/moondream3-preview") is None
    with pytest.raises(ModelNotFound, match="moondream3-preview"):
        md3.variant_of("moondream2")
    md2 = ModelNames(Config(model=os.path.join(CONFORMANCE, "main")))
    assert md2.base == "moondream2" and md2.names_base("moondream3-preview") and md2.names_base("vikhyatk/moondream2")
    assert ModelNames(Config(model="moondream/moondream3-preview")).base == "moondream3-preview"
    mine = ModelNames(Config(model=MAIN, model_name="mine", model_aliases="mine,other"))
    assert mine.base == "mine" and mine.aliases == ("moondream3-preview", "other")  # the family id stays an alias


# ------------------------------------------------------------------------- Moondream's engine layout (3.1)
def to_engine_layout(tensors: dict) -> dict:
    """The fixture model's tensors renamed the way Moondream's engine stores them (written out
    by hand here, independently of gpu_worker/engine_layout.py)."""
    out = {}
    for key, t in tensors.items():
        name = key[len("model."):]
        parts = name.split(".")
        if name == "text.wte":
            out["text_model.transformer.embd.wte.weight"] = t
        elif name.startswith("text.post_ln."):
            out["text_model.lm_head.ln." + parts[-1]] = t
        elif name.startswith("text.lm_head."):
            out["text_model.lm_head.linear." + parts[-1]] = t
        elif name.startswith("text.blocks."):
            n, rest = parts[2], ".".join(parts[3:])
            h = f"text_model.transformer.h.{n}."
            renamed = {"attn.qkv.weight": "mixer.Wqkv.weight", "attn.qkv.bias": "mixer.Wqkv.bias",
                       "attn.proj.weight": "mixer.out_proj.weight", "attn.proj.bias": "mixer.out_proj.bias",
                       "attn.tau.wq": "tau_wq", "attn.tau.wv": "tau_wv", "attn.tau.alpha": "tau_alpha",
                       "mlp.router.weight": "gate.weight", "mlp.router.bias": "gate.bias"}
            if t.dim() == 3:  # stacked experts
                rest = {"mlp.fc1.weight": "mlp.experts.weight", "mlp.fc2.weight": "mlp.output_experts.weight"}[rest]
            out[h + renamed.get(rest, rest)] = t
        elif name.startswith("vision.blocks."):
            n, rest = parts[2], ".".join(parts[3:])
            rest = rest.replace("ln1.", "norm1.").replace("ln2.", "norm2.")
            out[f"vision_encoder.encoder.model.visual.blocks.{n}.{rest}"] = t
        elif name.startswith("vision."):
            renamed = {"vision.patch_emb.weight": "visual.patch_embed.linear.weight",
                       "vision.patch_emb.bias": "visual.patch_embed.linear.bias", "vision.pos_emb": "visual.pos_embed",
                       "vision.post_ln.weight": "visual.norm.weight", "vision.post_ln.bias": "visual.norm.bias"}
            if name in renamed:
                out["vision_encoder.encoder.model." + renamed[name]] = t
            else:  # vision.proj_mlp.fc1.weight ...
                out["vision_encoder.projection.mlp." + ".".join(parts[2:])] = t
        else:
            renamed = {"region.coord_encoder": "region_model.coordinate_encoder",
                       "region.coord_decoder": "region_model.coordinate_head",
                       "region.size_encoder": "region_model.size_encoder", "region.size_decoder": "region_model.size_head"}
            if name in ("region.coord_features", "region.size_features"):
                stem = "coordinate" if "coord" in name else "size"
                out[f"region_model.{stem}_features.weight"] = t.t().contiguous()  # stored transposed
            else:
                out[renamed[".".join(parts[:2])] + "." + parts[-1]] = t
    return out


def test_moondream_engine_layout_gives_the_same_answers(tmp_path):
    target, tensors = _copy_fixture(tmp_path)
    engine_tensors = to_engine_layout(tensors)
    assert not any(k.startswith("model.") for k in engine_tensors)
    save_file(engine_tensors, str(target / "model.safetensors"))
    converted = Engine(load_checkpoint(str(target), "", "cpu", "float32"))
    whole = fixture_engine("md3-main").weights
    assert converted.weights.keys() == whole.keys()
    assert all(torch.equal(converted.weights[k], whole[k]) for k in whole)
    with open(os.path.join(MAIN, "expected.json")) as f:
        cases = [c for c in json.load(f)["cases"] if c["image"] in (None, "photo_773x767.jpg")]
    from tests.engine_helpers import request_from_case

    sched = Scheduler(converted, max_batch=4)
    requests = [request_from_case(c, fixture_image("md3-main", c["image"]) if c["image"] else None) for c in cases]
    outcomes = run_requests(sched, requests)
    from tests.test_conformance import close_numbers

    for case, req in zip(cases, requests):
        assert close_numbers(outcomes[req.request_id].output, case["output"], 1e-6), case


def test_fp8_experts_fused_tau_and_the_region_layer_norm(tmp_path):
    """Moondream 3.1's file: FP8 experts with a scale per expert and output channel, tau_wq and
    tau_wv stacked as tau_wqwv, and a LayerNorm before the region decoders."""
    target, tensors = _copy_fixture(tmp_path)
    engine_tensors = to_engine_layout(tensors)
    fp8 = {}
    for key in [k for k in engine_tensors if k.endswith(("mlp.experts.weight", "mlp.output_experts.weight"))]:
        w = engine_tensors[key].float()
        scale = w.abs().amax(dim=-1) / 448.0  # e4m3's largest value
        engine_tensors[key] = (w / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
        h = key.split(".mlp.")[0]
        engine_tensors[h + (".moe_quant.up_scale" if "output" not in key else ".moe_quant.down_scale")] = scale
        fp8[key] = (engine_tensors[key], scale)
    for n in range(4):
        h = f"text_model.transformer.h.{n}."
        engine_tensors[h + "tau_wqwv"] = torch.cat([engine_tensors.pop(h + "tau_wq"), engine_tensors.pop(h + "tau_wv")])
    gen = torch.Generator().manual_seed(11)
    engine_tensors["region_model.ln.weight"] = 1 + 0.1 * torch.randn(128, generator=gen)
    engine_tensors["region_model.ln.bias"] = 0.1 * torch.randn(128, generator=gen)
    save_file(engine_tensors, str(target / "model.safetensors"))
    engine = Engine(load_checkpoint(str(target), "", "cpu", "float32"))
    w, whole = engine.weights, fixture_engine("md3-main").weights
    for key, (stored, scale) in fp8.items():
        n = key.split(".")[3]
        ours = f"text.blocks.{n}.mlp." + ("fc2" if "output" in key else "fc1") + ".weight"
        assert torch.equal(w[ours], stored.float() * scale.unsqueeze(-1))
        assert rel_err(w[ours], whole[ours]) < 0.07  # e4m3 keeps ~2 significant digits
    assert torch.equal(w["text.blocks.2.attn.tau.wv"], whole["text.blocks.2.attn.tau.wv"])
    hidden = torch.randn(3, 128, generator=gen)
    normed = F.layer_norm(hidden, (128,), w["region.ln.weight"], w["region.ln.bias"], eps=1e-5)
    assert torch.equal(M.decode_coordinate_bins(hidden, w), F.linear(normed, w["region.coord_decoder.weight"],
                                                                      w["region.coord_decoder.bias"]).argmax(-1))
    sched = Scheduler(engine, max_batch=2)
    req = EngineRequest("fp8", "detect", DetectParams(object="cat"), SamplingSettings(max_objects=2), fixture_image("md3-main", "square_378.png"))
    assert run_requests(sched, [req])["fp8"].error is None
