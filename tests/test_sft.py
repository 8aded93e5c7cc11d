"""Tokenizers, SFT records -> loss-masked packed rows, and experiments that start from a Hugging Face
model directory (`model.path`) on SFT data (`data.path`)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from error_bounds import config_depth, gamma, network_tolerance
from model_testing import jit_logits

from ktjax.evaluate import main as evaluate_main
from ktjax.experiment import DataConfig, ExperimentConfig, load_run, resolve, run_experiment
from ktjax.generate import main as generate_main
from ktjax.models import qwen3_moe
from ktjax.models.hf_export import export_hf
from ktjax.params import split_model
from ktjax.sft import SFTData, pack, tokenize_record
from ktjax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ktjax.train import TrainConfig

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def trained_text(tokenizer, record) -> str:
    ids, trained = tokenize_record(tokenizer, record)
    return tokenizer.decode(ids[trained])


def make_hf_tokenizer(directory):
    """A word-level tokenizer.json plus a tokenizer_config.json with special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "[", "]", "system", "user", "assistant", "Be", "brief", ".", "hi"]
    words += ["hello", "2", "+", "?", "4", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)


def test_byte_tokenizer_round_trips_text():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    text = "héllo, wörld"
    assert tok.decode(tok.encode(text)) == text and min(tok.encode(text)) >= 3


def test_chat_loss_is_on_assistant_turns_only(tmp_path):
    tok = make_hf_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.bos_id == 1 and tok.eos_id == 2
    ids, trained = tokenize_record(tok, CHAT)
    full = tok.encode(tok.render_chat(CHAT["messages"]))
    assert ids.tolist() == full  # the pieces tokenize to the whole conversation
    assert trained_text(tok, CHAT).split() == ["hello", "</s>", "4", "</s>"]
    byte = ByteTokenizer()
    assert trained_text(byte, CHAT) == "hello\n4\n"


def test_prompt_completion_loss_is_on_the_completion_and_eos():
    tok = ByteTokenizer()
    ids, trained = tokenize_record(tok, {"prompt": "Q: 1+1 ", "completion": "2"})
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert trained.tolist() == [False] * 8 + [True, True]


def test_held_out_prompts_end_where_the_trained_answer_begins(tmp_path):
    records = [CHAT, {"prompt": "Q: 2+2?", "completion": "4"}] * 5
    data = SFTData(
        str(write_jsonl(tmp_path / "d.jsonl", records)), ByteTokenizer(), seq_len=64, eval_fraction=0.5
    )
    tok = ByteTokenizer()
    for prompt, answer in data.eval_prompts(10):
        text = tok.decode(prompt)
        if text.startswith("Q: 2+2?"):  # prompt/completion: <bos> prompt | completion <eos>
            assert prompt[0] == tok.BOS and answer == tok.encode("4") + [tok.EOS]
        else:  # a chat: everything up to the first assistant turn | that turn
            assert text.endswith("<|assistant|>\n") and tok.decode(answer) == "hello\n"


def test_packing_keeps_records_apart():
    a = (np.array([10, 11, 12, 13]), np.array([False, False, True, True]))
    b = (np.array([20, 21, 22]), np.array([False, True, True]))
    c = (np.array(list(range(30, 40))), np.ones(10, bool))
    rows, truncated = pack([a, b, c], seq_len=6)
    assert truncated == 1 and len(rows["input_ids"]) == 2
    np.testing.assert_array_equal(rows["input_ids"][0], [10, 11, 12, 20, 21, 0])
    np.testing.assert_array_equal(rows["targets"][0], [11, 12, 13, 21, 22, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows["input_ids"][1], range(30, 36))  # truncated to seq_len


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    records = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(30)]
    data = SFTData(str(write_jsonl(tmp_path / "d.jsonl", records)), ByteTokenizer(), seq_len=16, seed=3)
    again = SFTData(str(tmp_path / "d.jsonl"), ByteTokenizer(), seq_len=16, seed=3)
    assert data.n_eval == 3 and data.n_rows > 4
    for step in (0, 5, 2):
        for key, value in data.batch(step, 4).items():
            np.testing.assert_array_equal(value, again.batch(step, 4)[key])
    one_epoch = np.concatenate([data.batch(s, 1)["input_ids"] for s in range(data.n_rows)])
    assert len({r.tobytes() for r in one_epoch}) == data.n_rows  # every row once per epoch
    held_out = {r.tobytes() for r in data.eval_batch(100)["input_ids"]}
    assert not held_out & {r.tobytes() for r in data.rows["input_ids"]}


def test_bad_records_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = '{"prompt": "a", "completion": "b"}'
    cases = {  # file text -> the error, naming the file line (blank lines count)
        f'{good}\n\n{{"text": "x"}}\n': r"d\.jsonl:3: needs 'messages', or 'prompt' and 'completion'",
        f"{good}\n{{oops\n": r"d\.jsonl:2: not valid JSON",
        f"{good}\n42\n": r"d\.jsonl:2: a record must be a JSON object, got int",
        f'{good}\n{{"prompt": "a", "completion": 5}}\n': r"d\.jsonl:2: 'completion' must be a string, got 5",
        '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}\n': (
            r"d\.jsonl:1: a message's 'role' and 'content' must be strings"
        ),
        '{"messages": "hi"}\n': r"d\.jsonl:1: 'messages' must be a non-empty list",
        '{"messages": [{"role": "user", "content": "only a question"}]}\n': (
            r"d\.jsonl:1: a chat needs at least one assistant message"
        ),
        "\n\n": r"d\.jsonl: no records",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            SFTData(str(path), ByteTokenizer())
    path.write_bytes(good.encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        SFTData(str(path), ByteTokenizer())


def test_data_whose_trained_targets_are_all_truncated_away_is_refused(tmp_path):
    records = [{"prompt": "a long prompt that fills the row ", "completion": "x"} for _ in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(ValueError, match=r"training rows have no trained targets.*seq_len=8.*raise data"):
        SFTData(str(path), ByteTokenizer(), seq_len=8)
    assert SFTData(str(path), ByteTokenizer(), seq_len=64).rows["loss_mask"].sum() > 0


@pytest.mark.slow
def test_experiment_starts_from_a_model_directory(tmp_path, capsys):
    """model.path + data.path: the architecture comes from config.json, the tokenizer from the directory,
    training runs, and the adapters are exported in PEFT format plus a merged model directory."""
    from ktjax.models import build_model

    arch = qwen3_moe(vocab_size=300, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=4)
    _, params = split_model(build_model(arch))
    model_dir = export_hf(params, arch, tmp_path / "model")
    records = [{"prompt": f"{i} plus one is ", "completion": str(i + 1)} for i in range(20)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = ExperimentConfig(
        name="t",
        mode="lora",
        model=qwen3_moe(hidden_size=999, path=str(model_dir), lora_rank=2, lora_targets=("experts",)),
        data=DataConfig(path=str(data), seq_len=32, tokenizer="bytes"),
        train=TrainConfig(steps=3, batch_size=2, eval_batch_size=2, progress=False, checkpoint_every=0),
        export_merged=True,
        generate_eval=1,  # batch 1, as the generate command below: the same compiled programs
    )
    resolved = resolve(cfg)
    assert resolved.model.hidden_size == 32 and resolved.model.vocab_size == 300
    assert resolved.model.lora_rank == 2 and resolved.model.path == str(model_dir)
    assert resolved.model.expert_quant == "none"  # a bf16 checkpoint's experts stay as stored
    quantized = dataclasses.replace(cfg, model=cfg.model.replace(expert_quant="int4"))
    assert resolve(quantized).model.expert_quant == "int4"  # --set model.expert_quant reaches from_hf
    result = run_experiment(cfg, tmp_path / "run")
    assert result.evals[-1]["step"] == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["generated_exact_match_after"] <= 1  # greedy answers to the held-out prompts
    # the run directory generates: its config, its newest checkpoint, its tokenizer
    code = generate_main(
        ["--run", str(tmp_path / "run"), "--prompt", "3 plus one is ", "--max-new-tokens", "4"]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "model: t run" in err and "step 3" in err
    assert out.splitlines()[-1].startswith("3 plus one is ") and len(out.splitlines()[-1]) > 14
    assert generate_main(["--run", str(tmp_path / "nothing"), "--prompt", "x"]) == 1
    assert "has no config.json" in capsys.readouterr().err
    # the base model plus the exported adapter generates what the run does (the same f32 parameters)
    from_run = out.splitlines()[-1]
    adapter = str(tmp_path / "run" / "peft_adapter")
    with_adapter = ["--model", str(model_dir), "--adapter", adapter, "--dtype", "float32"]
    code = generate_main([*with_adapter, "--prompt", "3 plus one is ", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines()[-1] == from_run, err
    # evaluate: the packed, batched loss equals the mean over records evaluated one by one, unpacked
    code = evaluate_main(["--run", str(tmp_path / "run"), "--data", str(data), "--seq-len", "48", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out.splitlines()[-1])
    model = load_run(tmp_path / "run")[1]
    examples = [tokenize_record(ByteTokenizer(), record) for record in records]
    ids = np.zeros((len(examples), max(len(i) for i, _ in examples)), np.int32)  # padded at the end
    for row, (tokens, _) in enumerate(examples):
        ids[row, : len(tokens)] = tokens
    logp = np.asarray(jax.nn.log_softmax(jit_logits(model, jnp.asarray(ids[:, :-1])), -1))
    nll, count = 0.0, 0
    for row, (tokens, trained) in enumerate(examples):  # each record alone in its row, unpacked
        picked = logp[row, np.arange(len(tokens) - 1), tokens[1:]]
        nll, count = nll - picked[trained[1:]].sum(), count + int(trained[1:].sum())
    assert got["tokens"] == count and got["records"] == 20 and got["truncated"] == 0
    # two f32 evaluations of the network, then a sum of `count` terms
    tolerance = network_tolerance(config_depth(model.config, 48)) + float(gamma(count))
    assert abs(got["loss"] - nll / count) <= tolerance * nll / count
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]))
    other = qwen3_moe(vocab_size=300, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=8)
    other_dir = export_hf(split_model(build_model(other))[1], other, tmp_path / "other")
    assert generate_main(["--model", str(other_dir), "--adapter", adapter, "--prompt", "x"]) == 1
    assert "the model expects" in capsys.readouterr().err
    adapter = json.loads((tmp_path / "run" / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["base_model_name_or_path"] == str(model_dir)
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="token ids up to 120, the model has 100"):
        small = qwen3_moe(vocab_size=100, hidden_size=32, num_hidden_layers=1, head_dim=8, num_experts=4)
        _, p = split_model(build_model(small))
        resolve(
            ExperimentConfig(model=qwen3_moe(path=str(export_hf(p, small, tmp_path / "s"))), data=cfg.data)
        )


def test_packed_records_attend_only_within_themselves():
    """A packed row gives each record the logits it gets alone (attention, RoPE positions and expert
    routing all stay inside the record)."""
    import jax.numpy as jnp

    from ktjax.models import build_model

    model = build_model(
        qwen3_moe(vocab_size=50, hidden_size=32, num_hidden_layers=2, head_dim=8, num_experts=4)
    )
    a, b = np.array([1, 5, 6, 7, 8, 9]), np.array([1, 12, 13, 14])
    rows, _ = pack([(a, np.ones(6, bool)), (b, np.ones(4, bool))], seq_len=10)
    packed = np.asarray(
        jit_logits(model, *(jnp.asarray(rows[k]) for k in ("input_ids", "segment_ids", "positions")))
    )
    alone_a = np.asarray(jit_logits(model, jnp.asarray(a[None, :-1])))[0]
    alone_b = np.asarray(jit_logits(model, jnp.asarray(b[None, :-1])))[0]
    # The same math on another sequence length (masked scores add exact zeros): two f32 evaluations.
    tolerance = network_tolerance(config_depth(model.config, 10)) * float(np.abs(alone_a).max())
    np.testing.assert_allclose(packed[0, :5], alone_a, rtol=0, atol=tolerance)
    np.testing.assert_allclose(packed[0, 5:8], alone_b, rtol=0, atol=tolerance)
    # Without the segments, b's tokens see a's: far more than rounding apart.
    unsegmented = np.asarray(jit_logits(model, jnp.asarray(rows["input_ids"])))[0, 5:8]
    assert np.abs(packed[0, 5:8] - unsegmented).max() > 100 * tolerance
