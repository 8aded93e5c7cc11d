"""Models whose routed experts are quantized (ModelConfig.expert_quant): the logits of the float model
built from the dequantized weights, LoRA training that never touches the quantized base and resumes
exactly, Hugging Face loading that quantizes expert by expert or keeps a block-FP8 checkpoint's bytes,
and merged exports."""

from __future__ import annotations

import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from error_bounds import config_depth, network_tolerance
from model_testing import jit_logits

from ktjax.models import build_model, deepseek_v3, from_hf, qwen3_moe
from ktjax.models.hf_export import export_hf
from ktjax.models.safetensors_io import read_header, read_into, write_file
from ktjax.optim import FULL_RULES, HYBRID_RULES, GroupConfig
from ktjax.params import merge_model, split_model
from ktjax.quant import QuantizedWeight, is_quantized, quantize, quantize_fp8, quantize_int4
from ktjax.train import TrainConfig, train

SMALL = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=16)
IDS = jax.numpy.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jax.numpy.int32)
SPECS = ["int8", "int4:32", "fp8:8x12"]  # fp8 blocks of 8 x 12: several, and ragged, over [16, 32]


def small(**kw):
    return qwen3_moe(**SMALL, head_dim=8, **kw)


def dequantized(params):
    """The parameters with every quantized weight replaced by its f32 values."""
    return {n: v.dequantize() if is_quantized(v) else v for n, v in params.items()}


def assert_same_leaves(a, b, name=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("spec", SPECS)
def test_a_quantized_model_gives_the_logits_of_the_float_model_of_its_dequantized_weights(spec):
    cfg = small(expert_quant=spec)
    defn, params = split_model(build_model(cfg))
    quantized = [n for n, v in params.items() if is_quantized(v)]
    assert len(quantized) == 3 * cfg.num_hidden_layers and all(".experts." in n for n in quantized)
    float_defn, _ = split_model(build_model(cfg.replace(expert_quant="none")))
    got = jit_logits(merge_model(defn, params), IDS)
    want = jit_logits(merge_model(float_defn, dequantized(params)), IDS)
    tolerance = network_tolerance(config_depth(cfg, IDS.shape[1]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tolerance, atol=tolerance)


def train_config(**kw):
    groups = {"full": GroupConfig(lr_peak=1e-2, schedule="constant"), "lora": GroupConfig(lr_peak=3e-2)}
    base = dict(steps=6, batch_size=4, log_every=1, eval_every=0, progress=False, groups=groups)
    return TrainConfig(**{**base, **kw})


class Tokens:
    """Random token rows, the same for every step (enough to see the loss move)."""

    def __init__(self):
        ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (4, 9)).astype(np.int32)
        self.fixed = {
            "input_ids": ids[:, :-1],
            "targets": ids[:, 1:],
            "loss_mask": np.ones((4, 8), np.float32),
            "segment_ids": np.ones((4, 8), np.int32),
            "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
        }

    def batch(self, step, batch_size):
        return self.fixed

    def eval_batch(self, batch_size):
        return self.fixed


@pytest.mark.slow
def test_lora_on_a_quantized_base_trains_resumes_exactly_and_exports_merged(tmp_path):
    cfg = small(expert_quant="int4:32", lora_rank=4, lora_alpha=8.0, lora_targets=("experts",))
    tc = train_config(checkpoint_every=2, rules=HYBRID_RULES)
    model = build_model(cfg)
    _, before = split_model(model)
    whole = train(model, Tokens(), tc, tmp_path / "whole")
    losses = [r["loss"] for r in whole.history]
    assert losses[-1] < losses[0]
    for name, value in before.items():
        if is_quantized(value):
            assert_same_leaves(whole.params[name], value, name)  # the base is never written
    train(build_model(cfg), Tokens(), tc, tmp_path / "split", stop_after=3)
    resumed = train(build_model(cfg, seed=7), Tokens(), tc, tmp_path / "split", resume=True)
    assert [r["loss"] for r in resumed.history if r["step"] > 2] == losses[2:]
    for name in whole.params:
        assert_same_leaves(whole.params[name], resumed.params[name], name)

    export_hf(whole.params, cfg, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in written
    loaded = from_hf(tmp_path / "export", dtype="float32", progress=False)
    assert not any(is_quantized(v) for v in split_model(loaded)[1].values())
    want = jit_logits(merge_model(split_model(build_model(cfg))[0], whole.params), IDS)
    tolerance = network_tolerance(config_depth(cfg, IDS.shape[1]) + cfg.lora_rank + 2)
    np.testing.assert_allclose(
        np.asarray(jit_logits(loaded, IDS)), np.asarray(want), rtol=tolerance, atol=tolerance
    )


def test_a_rule_that_would_train_a_quantized_base_is_refused_with_its_name(tmp_path):
    model = build_model(small(expert_quant="int8"))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj\.weight' is a quantized"
    ):
        train(model, Tokens(), train_config(rules=FULL_RULES), tmp_path)


def test_bad_expert_quant_values_are_refused():
    for bad in ("int5", "int4:48", "fp8:0x128", "int8:2"):
        with pytest.raises(ValueError, match="expert_quant must be none, int8, int4"):
            small(expert_quant=bad)


@pytest.mark.parametrize("spec", SPECS)
def test_from_hf_quantizes_each_expert_as_the_quantizer_does_the_stack(spec, tmp_path):
    cfg = small(param_dtype="bfloat16")
    _, params = split_model(build_model(cfg))
    export_hf(params, cfg, tmp_path)
    loaded = split_model(from_hf(tmp_path, expert_quant=spec, progress=False))[1]
    for name, value in params.items():
        if ".experts." in name:
            assert loaded[name].format == spec.split(":")[0]
            assert_same_leaves(loaded[name], quantize(np.asarray(value, np.float32), spec), name)
        else:
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), err_msg=name)


FP8_LINEAR = re.compile(r"(_proj|_proj_with_mqa)\.weight$")  # what DeepSeek's FP8 release quantizes


def fp8_checkpoint(tmp_path, block=(8, 12)):
    """A block-FP8 checkpoint of a random DeepSeek-V3-shaped model (as the released checkpoints store
    it: every linear projection FP8 with its weight_scale_inv, routers, norms and embeddings not), and
    a float checkpoint of exactly its dequantized weights."""
    cfg = deepseek_v3(**SMALL, n_group=2, topk_group=1, q_lora_rank=8, kv_lora_rank=8, intermediate_size=24)
    _, params = split_model(build_model(cfg))
    export_hf(params, cfg, tmp_path / "float")
    tensors = safetensors.numpy.load_file(tmp_path / "float" / "model.safetensors")
    fp8, dequant = {}, {}
    for name, w in tensors.items():
        if not FP8_LINEAR.search(name):
            fp8[name] = dequant[name] = w
            continue
        q = quantize_fp8(w[None].astype(np.float32), block)
        fp8[name], fp8[name + "_scale_inv"] = np.asarray(q.data[0]), np.asarray(q.scales[0])
        dequant[name] = np.asarray(q.dequantize()[0])
    for directory, arrays in (("fp8", fp8), ("dequantized", dequant)):
        out = tmp_path / directory
        out.mkdir()
        write_file(
            out / "model.safetensors", arrays.items(), {n: (a.dtype, a.shape) for n, a in arrays.items()}
        )
        config = json.loads((tmp_path / "float" / "config.json").read_text())
        if directory == "fp8":
            config["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(block),
            }
        (out / "config.json").write_text(json.dumps(config))
    return cfg, fp8


def test_a_block_fp8_checkpoint_keeps_its_expert_bytes_and_gives_the_dequantized_models_logits(tmp_path):
    cfg, stored = fp8_checkpoint(tmp_path)
    model = from_hf(tmp_path / "fp8", dtype="float32", progress=False)
    assert model.config.expert_quant == "fp8:8x12"
    _, params = split_model(model)
    gate = params["model.layers.1.mlp.experts.gate_proj.weight"]
    assert isinstance(gate, QuantizedWeight) and gate.format == "fp8" and gate.block == (8, 12)
    for e in range(cfg.num_experts):  # the checkpoint's bytes and scales, not a conversion
        name = f"model.layers.1.mlp.experts.{e}.gate_proj.weight"
        np.testing.assert_array_equal(np.asarray(gate.data[e]).view(np.uint8), stored[name].view(np.uint8))
        np.testing.assert_array_equal(np.asarray(gate.scales[e]), stored[name + "_scale_inv"])
    # attention, the dense layer and the shared experts are dequantized into float arrays
    assert not is_quantized(params["model.layers.0.self_attn.kv_b_proj.weight"])
    reference = from_hf(tmp_path / "dequantized", dtype="float32", progress=False)
    tolerance = network_tolerance(config_depth(cfg, IDS.shape[1]))
    np.testing.assert_allclose(
        np.asarray(jit_logits(model, IDS)),
        np.asarray(jit_logits(reference, IDS)),
        rtol=tolerance,
        atol=tolerance,
    )
    # asked for int4, the FP8 experts are dequantized and requantized expert by expert
    requantized = split_model(
        from_hf(tmp_path / "fp8", dtype="float32", expert_quant="int4:32", progress=False)
    )
    want = quantize_int4(np.asarray(gate.dequantize()), 32)
    assert_same_leaves(requantized[1]["model.layers.1.mlp.experts.gate_proj.weight"], want)


def test_fp8_tensors_without_scales_and_other_quantizations_are_refused_by_name(tmp_path):
    _, tensors = fp8_checkpoint(tmp_path)
    path = tmp_path / "fp8" / "model.safetensors"
    name = "model.layers.0.self_attn.o_proj.weight"
    del tensors[name + "_scale_inv"]
    write_file(path, tensors.items(), {n: (a.dtype, a.shape) for n, a in tensors.items()})
    with pytest.raises(ValueError, match=rf"FP8 tensor '{re.escape(name)}' needs .*weight_scale_inv"):
        from_hf(tmp_path / "fp8", progress=False)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json: quantization_config: quant_method 'gptq' is not supported"
    ):
        from_hf(tmp_path / "fp8", progress=False)


def test_an_fp8_tensor_is_never_cast_without_its_scales(tmp_path):
    data = np.arange(16, dtype=np.float32).reshape(4, 4).astype(ml_dtypes.float8_e4m3fn)
    write_file(tmp_path / "t.safetensors", [("w", data)], {"w": (data.dtype, data.shape)})
    info = read_header(tmp_path / "t.safetensors")["w"]
    with pytest.raises(ValueError, match="'w' cannot be converted without its block scales"):
        read_into(info, np.empty((4, 4), np.float32))
    same = np.empty((4, 4), ml_dtypes.float8_e4m3fn)
    read_into(info, same)
    np.testing.assert_array_equal(same.view(np.uint8), data.view(np.uint8))
