"""Expert-parallel training over 2 processes (run by tests/test_distributed.py through
ktjax.distributed.launch, one core each), or as the reference: one process with 2 host devices, the
same mesh and the same layout. Writes what each process saw to OUT.<process>.json:

- init (the reference) and init_int4 (every process, the model with int4 routed experts): whether a
  model built on the mesh has the parameters it has built on one device;
- training: for full, LoRA and hybrid rules, 3 steps of ktjax.train (f32, 2 micro-batches): the
  logged losses, the CRC-32 checksums of every parameter's parts after training and which routed
  expert parameters changed; with 2 processes the hybrid run stops after 1 step (and its
  checkpoint) and resumes for 2 more, the reference runs it uninterrupted;
- hf: a Hugging Face directory of the tiny model loaded on the mesh equals the whole load split, and
  how many routed-expert tensors this process read;
- memory: the growth of this process's resident memory while a model with 201 MB of routed experts is
  built on the mesh, and those experts' bytes;
- with --load DIR (the reference only): the 2-process run's checkpoint read whole by one process.

    python tests/distributed_check.py OUT WORKDIR [--load DIR]
"""

from __future__ import annotations

import json
import os
import sys

if "JAX_NUM_PROCESSES" not in os.environ:  # the reference: one process, two devices
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

from ktjax import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402

from ktjax.checkpoint import checksums  # noqa: E402
from ktjax.data import SortTask  # noqa: E402
from ktjax.models import build_model, qwen3_moe  # noqa: E402
from ktjax.optim import FULL_RULES, HYBRID_RULES, LORA_RULES  # noqa: E402
from ktjax.params import split_model  # noqa: E402
from ktjax.sharding import expert_mesh, place_params  # noqa: E402
from ktjax.train import TrainConfig, load_trained, train  # noqa: E402

TASK = SortTask(length=5, num_values=6)
TINY = qwen3_moe(
    vocab_size=TASK.vocab_size,
    hidden_size=32,
    num_hidden_layers=1,
    head_dim=8,
    num_experts=4,
    moe_intermediate_size=16,
    lora_rank=4,
    lora_targets=("experts", "q_proj"),
    expert_axis="expert",
)
OPTS = dict(batch_size=8, micro_batches=2, log_every=1, eval_every=0, eval_batch_size=16, progress=False)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trained(rules, workdir: str, **kw) -> dict:
    tcfg = TrainConfig(steps=3, checkpoint_every=kw.pop("checkpoint_every", -1), rules=rules, **OPTS)
    model = build_model(TINY, seed=1, mesh=expert_mesh(TINY, {"batch": 8}))
    initial = checksums(split_model(model)[1])
    result = train(model, TASK, tcfg, workdir, **kw)
    final = checksums(result.params)
    moved = sorted(n for n in final if ".experts." in n and final[n] != initial[n])
    return {"losses": [r["loss"] for r in result.history], "checksums": final, "experts_moved": moved}


def memory() -> dict:
    """Resident memory gained while a model with 201 MB of f32 routed experts (4 layers) is built on
    the mesh, after a model of one such layer was (and is still held: compiling and the allocator's
    first pools are not counted, and no memory it freed is counted as reused)."""
    widths = dict(vocab_size=16, hidden_size=256, head_dim=16, moe_intermediate_size=256, num_experts=64)
    first = qwen3_moe(**widths, num_hidden_layers=1, expert_axis="expert")
    warm = jax.block_until_ready(split_model(build_model(first, seed=0, mesh=expert_mesh(first, {})))[1])
    cfg = first.replace(num_hidden_layers=4)
    before = resident_bytes()
    params = split_model(build_model(cfg, seed=0, mesh=expert_mesh(cfg, {})))[1]
    experts = jax.block_until_ready([p for n, p in params.items() if ".experts." in n])
    grown = resident_bytes() - before
    del warm
    return {"rss_growth": grown, "expert_bytes": sum(p.nbytes for p in experts)}


def init_matches_one_device(cfg=TINY) -> bool:
    """Whether the model built on the mesh has, part for part, the parameters of the one built whole
    on this process's default device."""
    mesh = expert_mesh(cfg, {})
    split = split_model(build_model(cfg, seed=1, mesh=mesh))[1]
    whole = place_params(split_model(build_model(cfg, seed=1))[1], mesh)
    return checksums(split) == checksums(whole)


def loads_own_experts(workdir: str) -> dict:
    """A Hugging Face directory of the tiny model (written by process 0) loaded on the mesh: whether it
    equals the whole load split over the mesh, and how many routed-expert tensors this process read."""
    import ktjax.models.hf_load as hf_load
    from ktjax.distributed import is_main, sync
    from ktjax.models.hf_export import export_hf

    path = f"{workdir}/hf"
    if is_main():
        export_hf(split_model(build_model(TINY, seed=1))[1], TINY, path)
    sync("hf checkpoint written")
    cfg, mesh = TINY.replace(path=path), expert_mesh(TINY, {})
    whole = place_params(split_model(build_model(cfg))[1], mesh)
    read, reading = [], hf_load.read_into
    hf_load.read_into = lambda info, out: (read.append(info.name), reading(info, out))[1]
    try:
        split = split_model(build_model(cfg, mesh=mesh))[1]
    finally:
        hf_load.read_into = reading
    experts = [n for n in read if ".experts." in n]
    return {"matches": checksums(split) == checksums(whole), "expert_tensors_read": len(experts)}


def main() -> None:
    out, workdir = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 2, jax.devices()
    report = {"processes": jax.process_count(), "memory": memory()}
    if jax.process_count() == 1:  # the processes' runs equal the reference's, whose model is built so
        report["init"] = init_matches_one_device()
    # int4 experts: each process draws only its own (their codes come from one stream per expert)
    report["init_int4"] = init_matches_one_device(TINY.replace(expert_quant="int4:32"))
    report["hf"] = loads_own_experts(workdir)
    for name, rules in (("full", FULL_RULES), ("lora", LORA_RULES)):
        report[name] = trained(rules, f"{workdir}/{name}")
    hybrid = f"{workdir}/hybrid"
    if jax.process_count() > 1:  # stopped after a step (and its checkpoint), then resumed
        trained(HYBRID_RULES, hybrid, checkpoint_every=1, stop_after=1)
        report["hybrid"] = trained(HYBRID_RULES, hybrid, checkpoint_every=1, resume=True)
    else:  # the reference runs uninterrupted
        report["hybrid"] = trained(HYBRID_RULES, hybrid, checkpoint_every=1)
    if "--load" in sys.argv:  # a checkpoint of 2 processes, read whole by this one
        tcfg = TrainConfig(steps=3, rules=HYBRID_RULES, **OPTS)
        model, step = load_trained(build_model(TINY, seed=1), tcfg, sys.argv[sys.argv.index("--load") + 1])
        params = place_params(split_model(model)[1], expert_mesh(TINY, {}))  # in the same parts
        report["loaded"] = {"step": step, "checksums": checksums(params)}
    with open(f"{out}.{jax.process_index()}.json", "w") as f:
        json.dump(report, f)
    print(f"process {jax.process_index()}: ok")


if __name__ == "__main__":
    main()
