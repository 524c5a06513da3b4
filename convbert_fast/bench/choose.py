"""`bench --choose OPS_RECORD`: MEASURED_CUDA_CHOICE from the op benchmarks' JSON (pytest-benchmark's, as
tools/gpu_check.sh writes it): per op, the backend whose fwd+bwd medians, summed over the op's benchmark groups
(with and without the multiplier, the activation), are the least."""

from __future__ import annotations

CHOICE_BACKENDS = ("cpp", "triton")


def op_medians(record: dict) -> dict[tuple[str, str], float]:
    """(benchmark group, provider) -> median ms, from pytest-benchmark's JSON."""
    return {(b["group"], b["params"]["provider"]): b["stats"]["median"] * 1e3 for b in record["benchmarks"]}


def measured_choices(record: dict) -> dict[str, dict]:
    """op -> {"backend": the fastest of CHOICE_BACKENDS that ran every group of the op, "ms": {backend: summed
    median ms}, "groups": [group names]} for each op both backends ran; ops with one backend are left out."""
    from ..ops.backend import OP_NAMES

    by_op: dict[str, dict[str, dict[str, float]]] = {}  # op -> backend -> group -> median ms
    for (group, provider), ms in op_medians(record).items():
        op = next((name for name in OP_NAMES if group.startswith(name)), None)
        if op is not None and provider in CHOICE_BACKENDS:
            by_op.setdefault(op, {}).setdefault(provider, {})[group] = ms
    choices = {}
    for op, by_backend in by_op.items():
        groups = sorted(set().union(*(g.keys() for g in by_backend.values())))
        complete = {b: sum(g.values()) for b, g in by_backend.items() if sorted(g) == groups}
        if len(complete) > 1:
            choices[op] = {"backend": min(complete, key=complete.get), "ms": complete, "groups": groups}
    return choices


def choose_main(path: str) -> int:
    from ..data import UsageError, read_json

    record = read_json(path, "--choose record")
    if not isinstance(record, dict) or not isinstance(record.get("benchmarks"), list):
        raise UsageError(f"--choose record {path} is not a pytest-benchmark JSON (no list of `benchmarks`)")
    families = {b.get("extra_info", {}).get("gpu_family") for b in record["benchmarks"]}
    if None in families or len(families) != 1:
        raise UsageError(f"--choose record {path}: not a CUDA op-benchmark record of one GPU family (pytest benchmarks "
                         f"--bench-device cuda --benchmark-json=...); families found: {sorted(map(str, families))}")
    (family,) = families
    print(f"# MEASURED_CUDA_CHOICE entries from {path} ({record['benchmarks'][0]['extra_info']['device']}, "
          f"{record.get('datetime', 'date unknown')[:10]}): fwd+bwd medians summed over each op's groups")  # fmt: skip
    for op, choice in measured_choices(record).items():
        times = ", ".join(f"{b} {ms:.3f} ms" for b, ms in sorted(choice["ms"].items()))
        print(f'("{family}", "{op}"): "{choice["backend"]}",  # {times}')
    # the two sets of CUDA kernels (README): the slower goes once a GPU has run both
    medians = op_medians(record)
    for group in dict.fromkeys(g for g, provider in medians if provider == "cpp-v1"):
        if (group, "cpp") in medians:
            v1, v2 = medians[group, "cpp-v1"], medians[group, "cpp"]
            print(f"# CUDA kernels, {group}: v1 {v1:.3f} ms, v2 {v2:.3f} ms: {'v2' if v2 <= v1 else 'v1'} faster")
    return 0
