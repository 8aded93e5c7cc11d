"""Hugging Face checkpoint I/O without torch: export -> from_hf round trips, sharding, PEFT adapters,
streaming safetensors against the safetensors library, memory use, and bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from error_bounds import config_depth, gamma, network_tolerance
from model_testing import jit_logits

from ktjax.models import build_model, deepseek_v3, from_hf, mixtral, qwen3_moe
from ktjax.models.hf_export import export_hf
from ktjax.models.peft_adapter import export_peft, read_peft, read_peft_config
from ktjax.models.safetensors_io import read_header, read_into, to_jax, write_file
from ktjax.params import is_lora, merge_model, split_model

SMALL = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=16)
CONFIGS = {
    "qwen3_moe": lambda **kw: qwen3_moe(**SMALL, head_dim=8, **kw),
    "mixtral": lambda **kw: mixtral(**SMALL, head_dim=8, **kw),
    "deepseek_v3": lambda **kw: deepseek_v3(
        **SMALL, n_group=2, topk_group=1, q_lora_rank=8, kv_lora_rank=8, intermediate_size=24, **kw
    ),
}
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)


def randomised(cfg, seed=0):
    """Params of a random model with every adapter non-zero (B starts at zero otherwise)."""
    defn, params = split_model(build_model(cfg, seed))
    rng = np.random.default_rng(seed)
    for name in params:
        if is_lora(name):
            params[name] = jnp.asarray(rng.normal(0, 0.3, params[name].shape), params[name].dtype)
    return defn, params


@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_export_then_from_hf_gives_the_same_model(style, tmp_path):
    cfg = CONFIGS[style](lora_rank=2, lora_targets=("experts", "o_proj"))
    defn, params = randomised(cfg)
    want = jit_logits(merge_model(defn, params), IDS)
    export_hf(params, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == style
    loaded = from_hf(tmp_path, dtype="float32", progress=False)
    got = jit_logits(loaded, IDS)
    # The export merges each adapter (W + s B A: r products and an add, in f32) where the model adds
    # the adapter's products to W x: the same model a few roundings apart on every path.
    tolerance = network_tolerance(config_depth(cfg, IDS.shape[1]) + cfg.lora_rank + 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tolerance, atol=tolerance)
    assert loaded.config.num_experts == cfg.num_experts and loaded.config.lora_rank == 0


def test_large_exports_are_sharded_with_an_index(tmp_path):
    cfg = CONFIGS["qwen3_moe"]()
    defn, params = randomised(cfg)
    export_hf(params, cfg, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "model.safetensors").exists()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    # The same weights (no adapters to merge) in the same program: the same bits.
    np.testing.assert_array_equal(
        np.asarray(jit_logits(from_hf(tmp_path, dtype="float32", progress=False), IDS)),
        np.asarray(jit_logits(merge_model(defn, params), IDS)),
    )


@pytest.mark.parametrize("style", ["qwen3_moe", "mixtral"])
def test_peft_adapters_reproduce_the_merged_weights(style, tmp_path):
    cfg = CONFIGS[style](lora_rank=3, lora_alpha=6.0, lora_targets=("experts", "q_proj"))
    _, params = randomised(cfg)
    export_peft(params, cfg, tmp_path / "peft", layout="per_expert")
    export_hf(params, cfg, tmp_path / "merged")
    export_hf({n: v for n, v in params.items() if not is_lora(n)}, cfg, tmp_path / "base")
    adapter = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    merged = safetensors.numpy.load_file(tmp_path / "merged" / "model.safetensors")
    base = safetensors.numpy.load_file(tmp_path / "base" / "model.safetensors")
    expert = "block_sparse_moe.experts.3.w2" if style == "mixtral" else "mlp.experts.3.down_proj"
    assert f"base_model.model.model.layers.1.{expert}.lora_B.weight" in adapter
    import re

    modules = {k[len("base_model.model.") : -len(".lora_A.weight")] for k in adapter if "lora_A" in k}
    assert len(modules) == 2 * (1 + 3 * cfg.num_experts)
    assert all(re.fullmatch(config["target_modules"], m) for m in modules)
    assert not re.fullmatch(config["target_modules"], "model.layers.0.self_attn.k_proj")
    scale = config["lora_alpha"] / config["r"]
    for module in modules:
        a, b = (
            adapter[f"base_model.model.{module}.lora_A.weight"],
            adapter[f"base_model.model.{module}.lora_B.weight"],
        )
        want = base[module + ".weight"] + scale * b @ a
        # Both sides compute W + s (B A) in f32 (r products summed, scaled, added): each within
        # gamma(r + 2) of the exact value relative to the terms' magnitude.
        bound = (
            2 * gamma(config["r"] + 2) * (np.abs(base[module + ".weight"]) + scale * np.abs(b) @ np.abs(a))
        )
        assert np.all(np.abs(merged[module + ".weight"] - want) <= bound), module


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_peft_adapters_read_back_exactly_and_refuse_another_base_model(layout, tmp_path):
    cfg = CONFIGS["deepseek_v3"](
        lora_rank=3, lora_alpha=6.0, lora_targets=("experts", "kv_b_proj", "q_a_proj")
    )
    _, params = randomised(cfg)
    export_peft(params, cfg, tmp_path / "peft", layout=layout)
    assert read_peft_config(tmp_path / "peft") == (3, 6.0, ("experts", "kv_b_proj", "q_a_proj"))
    adapters = {n: v for n, v in params.items() if is_lora(n)}
    back = read_peft(tmp_path / "peft", cfg, adapters)
    assert set(back) == set(adapters)
    for name, value in adapters.items():
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(value), err_msg=name)
    # a model with another expert width, or without one of the adapted projections
    wider = cfg.replace(moe_intermediate_size=8)
    _, other = randomised(wider)
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        read_peft(tmp_path / "peft", wider, {n: v for n, v in other.items() if is_lora(n)})
    fewer = {n: v for n, v in adapters.items() if "q_a_proj" not in n}
    with pytest.raises(ValueError, match=r"tensor .*q_a_proj.* has no place in the model"):
        read_peft(tmp_path / "peft", cfg, fewer)


def test_streaming_safetensors_agrees_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
    }
    layout = {n: (v.dtype, v.shape) for n, v in tensors.items()}
    write_file(tmp_path / "ours.safetensors", tensors.items(), layout)
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name], value)
    safetensors.numpy.save_file({"a": tensors["a"], "c": tensors["c"]}, tmp_path / "lib.safetensors")
    header = read_header(tmp_path / "lib.safetensors")
    out = np.empty((3, 5), np.float64)  # dtype converted on read
    read_into(header["a"], out)
    np.testing.assert_array_equal(out, tensors["a"])
    shared = to_jax(np.asarray(tensors["b"]))
    assert shared.dtype == jnp.bfloat16 and np.array_equal(np.asarray(shared), tensors["b"])


def test_a_header_length_past_the_formats_limit_is_refused_before_it_is_read(tmp_path):
    import struct

    from ktjax.models.safetensors_io import MAX_HEADER_BYTES

    path = tmp_path / "huge_header.safetensors"
    n = MAX_HEADER_BYTES + 1
    with path.open("wb") as f:  # a sparse file: the declared header fits in it, but is never read
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 16)
    with pytest.raises(
        ValueError, match=r"huge_header\.safetensors: corrupt safetensors header \(declared length"
    ):
        read_header(path)


def test_bad_checkpoints_fail_naming_the_tensor(tmp_path):
    cfg = CONFIGS["qwen3_moe"]()
    _, params = randomised(cfg)
    export_hf(params, cfg, tmp_path)
    weights = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())

    def rewrite(tensors, **config_changes):
        safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps({**config, **config_changes}))

    missing = dict(weights)
    del missing["model.layers.1.mlp.experts.2.up_proj.weight"]
    rewrite(missing)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight.*missing"):
        from_hf(tmp_path, progress=False)
    wrong = {**weights, "model.layers.0.self_attn.k_proj.weight": np.zeros((3, 32), np.float32)}
    rewrite(wrong)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape \[3, 32\]"):
        from_hf(tmp_path, progress=False)
    rewrite({**weights, "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"q_proj\.bias.*attention_bias"):
        from_hf(tmp_path, progress=False)
    rewrite(weights, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        from_hf(tmp_path, progress=False)
    rewrite(weights, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(NotImplementedError, match="longrope"):
        from_hf(tmp_path, progress=False)
    rewrite(weights)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match="outside the file"):
        from_hf(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nowhere", progress=False)


def test_bad_model_files_are_one_line_naming_the_file_and_field(tmp_path):
    cfg = CONFIGS["qwen3_moe"]()
    _, params = randomised(cfg)
    export_hf(params, cfg, tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    config = json.loads(config_text)
    bad_configs = {
        config_text[:-5]: r"config\.json: not valid JSON",
        "[1, 2]": r"config\.json: expected a JSON object, got list",
        json.dumps({k: v for k, v in config.items() if k != "hidden_size"}): (
            r"config\.json: required field 'hidden_size' is missing"
        ),
        json.dumps({**config, "num_experts": "8"}): r"config\.json: num_experts must be an integer, got '8'",
        json.dumps(
            {**config, "rms_norm_eps": True}
        ): r"config\.json: rms_norm_eps must be a number, got True",
    }
    for text, message in bad_configs.items():
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            from_hf(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(config_text)

    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])

    def with_header(value) -> None:
        text = json.dumps(value).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])

    name = "model.norm.weight"
    entry = header[name]
    bad_headers = {
        "list": ([1, 2], r"model\.safetensors: corrupt safetensors header \(a JSON list"),
        "no offsets": (
            {**header, name: {k: v for k, v in entry.items() if k != "data_offsets"}},
            r"model\.safetensors: tensor 'model\.norm\.weight': header entry has no 'data_offsets'",
        ),
        "float shape": (
            {**header, name: {**entry, "shape": [32.5]}},
            r"norm\.weight': shape \[32\.5\] is not",
        ),
        "string offsets": (
            {**header, name: {**entry, "data_offsets": ["0", "64"]}},
            r"norm\.weight': data_offsets \['0', '64'\] are not two non-negative integers",
        ),
        "entry not an object": ({**header, name: 7}, r"norm\.weight': header entry is int"),
    }
    for value, message in bad_headers.values():
        with_header(value)
        with pytest.raises(ValueError, match=message):
            from_hf(tmp_path, progress=False)
    with_header(header)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index\.json: no 'weight_map'"):
        from_hf(tmp_path, progress=False)
    index.write_text("{")
    with pytest.raises(ValueError, match=r"index\.json: not a JSON object"):
        from_hf(tmp_path, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("expert_quant", [None, "int4"])
def test_realistic_layer_loads_within_1_3x_its_weights(expert_quant, tmp_path):
    """One layer at H=2048, I=768, E=64 (604 MB of bf16 experts): the loading process's peak memory
    above its baseline stays within 1.3x the weights' bytes; with int4 experts (each expert quantized
    as it is read), within the loaded model's bytes plus one expert's temporaries."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys, numpy as np, ml_dtypes
        from ktjax.models import qwen3_moe
        from ktjax.models.hf_config import hf_config
        from ktjax.models.hf_load import abstract_model, hf_names
        from ktjax.models.safetensors_io import write_file
        cfg = qwen3_moe(vocab_size=1024, hidden_size=2048, num_hidden_layers=1, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
                        moe_intermediate_size=768, param_dtype="bfloat16")
        out = {str(tmp_path)!r}
        json.dump(hf_config(cfg), open(out + "/config.json", "w"))
        _, params = abstract_model(cfg)
        shapes = {{}}
        for name, value in params.items():
            targets = hf_names(cfg, name)
            for target in targets:
                shapes[target] = value.shape if len(targets) == 1 else value.shape[1:]
        layout = {{n: (np.dtype(ml_dtypes.bfloat16), s) for n, s in shapes.items()}}
        rng = np.random.default_rng(0)
        bf16 = ml_dtypes.bfloat16
        tensors = ((n, rng.standard_normal(s, np.float32).astype(bf16)) for n, s in shapes.items())
        write_file(out + "/model.safetensors", tensors, layout)
        print(sum(int(np.prod(s)) * 2 for s in shapes.values()))
        """
    )
    weight_bytes = int(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    # Peak anonymous memory (sampled every 2 ms): file-backed pages of the shared libraries count in
    # ru_maxrss too, and how many of them are mapped depends on the page cache, not on ktjax.
    load = textwrap.dedent(
        f"""
        import threading, time, jax, jax.numpy as jnp
        from flax import nnx
        from ktjax.models import from_hf
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        jnp.ones(4).block_until_ready()
        base, peak, done = anon(), [0], []
        def watch():
            while not done:
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        watcher = threading.Thread(target=watch)
        watcher.start()
        model = from_hf({str(tmp_path)!r}, expert_quant={expert_quant!r}, progress=False)
        done.append(1)
        watcher.join()
        w = model.model.layers[0].mlp.experts.gate_proj.weight.get_value()
        assert w.shape == (64, 768, 2048)
        assert w.format == "int4" if {expert_quant!r} else w.dtype == jnp.bfloat16
        loaded = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
        print(base, max(peak[0], anon()), loaded)
        """
    )
    run = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True)
    base, peak, loaded = map(int, run.stdout.split())
    assert weight_bytes > 600e6
    print(
        f"weights {weight_bytes / 1e6:.0f} MB, loaded {loaded / 1e6:.0f} MB; peak anonymous RSS above "
        f"baseline {(peak - base) / weight_bytes:.2f}x the weights"
    )
    if expert_quant:
        # int4 at G=128 keeps 0.53125 of a byte a parameter, so the loaded layer is about a third of the
        # bf16 one; on top of it at most one expert [768, 2048] in f32 and the quantizer's temporaries
        # of it (a few copies of 6.3 MB) exist at a time.
        assert loaded < 0.4 * weight_bytes
        assert peak - base <= loaded + 64e6, (peak - base - loaded) / 1e6
        return
    # Each expert tensor is read into its slot of the stacked arrays and handed to JAX without a copy:
    # the weights once, plus at most one stacked [E, I, H] tensor in flight (a third of the layer's
    # expert bytes: gate, up and down are the same size).
    assert peak - base <= (1 + 1 / 3) * weight_bytes, (peak - base) / weight_bytes
