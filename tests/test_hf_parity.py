"""Parity with the reference implementations: tiny random Qwen3-MoE, Mixtral and DeepSeek-V3 models
built with transformers, saved, loaded with ktjax.models.from_hf. Needs the [hf] test extra."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from error_bounds import CANCELLATION, U_BF16, config_depth, network_tolerance  # noqa: E402
from hf_testing import TINY, hf_logits, make_hf_model  # noqa: E402
from model_testing import jit_logits  # noqa: E402

from ktjax.decoding import generate  # noqa: E402
from ktjax.models import from_hf  # noqa: E402
from ktjax.models.peft_adapter import export_peft  # noqa: E402
from ktjax.params import merge_model, split_model  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=sorted(TINY))
def hf_model(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 61, (2, 12))


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_f32_logits_match_transformers(hf_model):
    kind, model, path = hf_model
    ids = tokens()
    got = jit_logits(from_hf(path, dtype="float32", progress=False), jnp.asarray(ids, jnp.int32))
    assert got.dtype == jnp.float32 and got.shape == (2, 12, 61)
    # Two f32 implementations of the same model: error_bounds.network_tolerance.
    depth = config_depth(from_hf(path, dtype="float32", progress=False).config, ids.shape[1])
    assert rel_err(np.asarray(got), hf_logits(model, ids)) < network_tolerance(depth), kind


def test_bf16_logits_match_transformers_loosely(hf_model):
    kind, model, path = hf_model
    ids = tokens(1)
    want = hf_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    got = np.asarray(jit_logits(from_hf(path, dtype="bfloat16", progress=False), jnp.asarray(ids, jnp.int32)))
    # bf16 rounding differs between the implementations (and can flip a near-tie in routing), so the
    # bound is on the mean error; f32 above is the exact check. Each logit passes through about six bf16
    # roundings per layer (weights, norms' and attention's and the MLP's outputs) and two more at the
    # head; over many logits the mean of such independent relative errors of at most u_bf16 grows like
    # the square root of their count, times the networks' cancellation, for each implementation.
    bf16_roundings = 6 * len(model.model.layers) + 2
    bound = 2 * np.sqrt(bf16_roundings) * U_BF16 * CANCELLATION
    assert np.abs(got - want).mean() / np.abs(want).mean() < bound, kind


def hf_grad(model, hf_name: str, grads: dict, intermediate: int, proj: str) -> np.ndarray:
    """A ktjax-layout gradient from transformers' parameters (its experts fuse gate and up)."""
    if proj == "down":
        return grads[hf_name + "down_proj"]
    fused = grads[hf_name + "gate_up_proj"]
    return fused[:, :intermediate] if proj == "gate" else fused[:, intermediate:]


def test_loss_gradients_match_torch_autograd(hf_model):
    kind, model, path = hf_model
    ids = tokens(2)
    model.zero_grad()
    out = model(torch.as_tensor(ids), labels=torch.as_tensor(ids))
    out.loss.backward()
    want_grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    kmodel = from_hf(path, dtype="float32", progress=False)
    cfg = kmodel.config
    defn, params = split_model(kmodel)
    x = jnp.asarray(ids, jnp.int32)

    def loss(params):
        logits = merge_model(defn, params)(x)[:, :-1]
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    depth = config_depth(cfg, ids.shape[1])
    assert abs(float(value) - out.loss.item()) < network_tolerance(depth) * max(1.0, out.loss.item())
    moe = max(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    ffn = "block_sparse_moe" if kind == "mixtral" else "mlp"
    attn = "q_a_proj" if cfg.attention == "mla" and cfg.q_lora_rank else "q_proj"
    checks = {
        f"model.layers.0.self_attn.{attn}.weight": want_grads[f"model.layers.0.self_attn.{attn}.weight"],
        f"model.layers.{moe}.{ffn}.gate.weight": want_grads[f"model.layers.{moe}.mlp.gate.weight"],
        "model.embed_tokens.weight": want_grads["model.embed_tokens.weight"],
    }
    experts = f"model.layers.{moe}.mlp.experts."
    for proj in ("gate", "up", "down"):
        checks[f"model.layers.{moe}.{ffn}.experts.{proj}_proj.weight"] = hf_grad(
            model, experts, want_grads, cfg.moe_intermediate_size, proj
        )
    for name, want in checks.items():
        got = np.asarray(grads[name])
        assert got.shape == want.shape, name
        assert np.abs(want).max() > 0, name
        assert rel_err(got, want) < network_tolerance(2 * depth), (kind, name, rel_err(got, want))


@pytest.mark.parametrize("kind", ["deepseek_v3"])
def test_lora_training_then_merged_export_loads_in_transformers(kind, tmp_path):
    """from_hf -> LoRA training (a few steps) -> export merged -> transformers reproduces the logits."""
    import transformers

    from ktjax.data import SortTask
    from ktjax.models.hf_export import export_hf
    from ktjax.optim import LORA_RULES
    from ktjax.train import TrainConfig, train

    make_hf_model(kind).save_pretrained(tmp_path / "base")
    targets = ("experts", "o_proj")
    model = from_hf(tmp_path / "base", dtype="float32", lora_rank=4, lora_targets=targets, progress=False)
    cfg = TrainConfig(steps=4, batch_size=4, eval_batch_size=4, rules=LORA_RULES, progress=False, log_every=1)
    result = train(model, SortTask(length=4, num_values=6), cfg, tmp_path / "run")
    adapters = [n for n in result.params if n.endswith(".lora_B")]
    assert adapters and all(np.abs(np.asarray(result.params[n])).max() > 0 for n in adapters)
    export_hf(result.params, model.config, tmp_path / "merged")

    ids = tokens(3)
    want = np.asarray(jit_logits(merge_model(result.defn, result.params), jnp.asarray(ids, jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    # The merged weights (W + s B A, r + 2 roundings) where ktjax adds the adapters' products.
    tolerance = network_tolerance(config_depth(model.config, ids.shape[1]) + 4 + 2)
    assert rel_err(hf_logits(hf.eval(), ids), want) < tolerance
    reloaded = jit_logits(
        from_hf(tmp_path / "merged", dtype="float32", progress=False), jnp.asarray(ids, jnp.int32)
    )
    assert rel_err(np.asarray(reloaded), want) < tolerance


def test_greedy_generation_matches_transformers_generate(hf_model):
    """Two prompts of different lengths decoded in one batch, each against transformers' own cached
    generate; Mixtral's window (5) is shorter than prompt + generation."""
    kind, model, path = hf_model
    if kind == "deepseek_v3_yarn":
        pytest.skip("the YaRN variant's attention is deepseek_v3's; its rope is checked by the f32 logits")
    prompts = [tokens(3)[0, :7].tolist(), tokens(3)[1, :3].tolist()]
    steps = 10
    kmodel = from_hf(path, dtype="float32", progress=False)
    new, logits = generate(kmodel, prompts, max_new_tokens=steps, return_logits=True)
    model.generation_config.eos_token_id = None  # random models: run every step
    depth = config_depth(kmodel.config, 7 + steps)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(
                torch.as_tensor([prompt]),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        assert new[row] == out.sequences[0, len(prompt) :].tolist(), (kind, row)
        want = torch.stack(out.scores, 1)[0].numpy()
        assert rel_err(logits[row], want) < network_tolerance(depth), (kind, row)


def test_peft_loads_exported_adapters_onto_transformers_and_gives_the_adapted_logits(hf_model, tmp_path):
    """export_peft's default layout (fused expert parameters via target_parameters, gate and up as one
    block-diagonal adapter) loaded by the real peft onto transformers' model of the same checkpoint."""
    peft = pytest.importorskip("peft")
    kind, model, path = hf_model
    if kind == "deepseek_v3_yarn":
        pytest.skip("the YaRN variant's attention is deepseek_v3's; its rope is checked by the f32 logits")
    targets = (
        ("experts", "kv_b_proj", "o_proj") if kind.startswith("deepseek") else ("experts", "q_proj", "o_proj")
    )
    kmodel = from_hf(path, dtype="float32", lora_rank=3, lora_alpha=6.0, lora_targets=targets, progress=False)
    defn, params = split_model(kmodel)
    rng = np.random.default_rng(5)
    for name in [n for n in params if n.endswith(("lora_A", "lora_B"))]:
        params[name] = jnp.asarray(rng.normal(0, 0.3, params[name].shape), jnp.float32)
    export_peft(params, kmodel.config, tmp_path / "adapter")
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    ids = tokens(4)
    want = hf_logits(adapted, ids)
    got = np.asarray(jit_logits(merge_model(defn, params), jnp.asarray(ids, jnp.int32)))
    plain = hf_logits(model, ids)
    assert rel_err(plain, want) > 0.05, kind  # the adapters change the logits (peft applied them all)
    depth = config_depth(kmodel.config, ids.shape[1]) + 2 * 3 + 2
    assert rel_err(got, want) < network_tolerance(depth), kind
