"""Offline throughput: Sluice vs Hugging Face transformers on CPU, with the bounds
of the issue 21 goals measured in the same run.

Run from the repository root::

    .venv/bin/python bench/throughput.py [--quick] [--model NAME_OR_PATH]
    .venv/bin/python bench/throughput.py --points 1x128+32,8x128+32  # only these points

All in one process, on the same weights:

1. ``smollm2-135m-random`` (float32; ``--model`` picks any Llama-family model
   `load_model` accepts, e.g. the real ``smollm2-135m-instruct`` or a ``.gguf``
   file, dequantized to float32) is loaded by Sluice, written as a Hugging Face
   checkpoint (`sluice.runtime.export.save_hf_checkpoint`) and loaded by
   transformers' ``LlamaForCausalLM`` (torch float32, sdpa, all CPU threads).
   Sanity check: the greedy first token of both agrees on a few prompts.
2. The sweep: 1, 8, 32 and 64 concurrent requests of 128 random prompt tokens and
   32 or 128 generated tokens, plus one prompt-heavy request of 512 + 32
   (``--quick``: the 128 + 32 points and 512 + 32 only). Greedy, ignore_eos.
   Sluice: `sluice.runtime.benchmark.throughput` (every step shape compiled at
   start-up). transformers: ``generate()`` on the prompts as one tensor (static
   batching, its best case; min_new_tokens = max_new_tokens) after an untimed
   warm-up call. Generated tokens/s of both, their ratio, and the ratio of the
   CPU-seconds each used (less distorted by other load than wall time).
3. Bounds, measured here: the copy bandwidth (a 512 MiB float32 ``numpy.copyto``,
   bytes read + written over the time, best of 5, STREAM's convention) and the
   float32 matmul rate (jitted 2048^3 jnp matmul, best of 8). Sluice's pure-decode
   steps are timed (``engine.step()``; ``runner.execute``, the model call, too)
   at batch 1 and batch 32: the batch-1 step against the bandwidth bound (weight
   bytes read per step over the copy bandwidth), the batch-32 step's FLOP/s
   against the matmul rate. Decode FLOPs per token = 2 * (non-embedding matmul
   params + lm-head params) + 4 * layers * q_heads * head_dim * context.
4. Writes bench/out/throughput.{json,png} (tokens/s vs batch size, both systems,
   the batch-1 bandwidth bound drawn) and copies them to
   bench/results/ (``throughput-<model>.*`` for another ``--model``).

``--points`` runs only those points (requests x prompt + output tokens), both
systems in the same process, and writes bench/out/throughput-points.json
(``max_model_len`` grows to fit the longest point): the quick check of one
change against transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from sluice.runtime.benchmark import random_prompts, throughput
from sluice.runtime.export import save_hf_checkpoint
from sluice.runtime.llm import LLM
from sluice.runtime.loader import load_model
from sluice.runtime.sampling_params import SamplingParams

MODEL = "smollm2-135m-random"
SWEEP = [(n, 128, o) for o in (32, 128) for n in (1, 8, 32, 64)] + [(1, 512, 32)]
QUICK_SWEEP = [p for p in SWEEP if p[2] == 32]
ENGINE_KW = dict(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=256, warmup=True)
ROOT = Path(__file__).resolve().parent


# -- systems -----------------------------------------------------------------

def load_hf(model, tmp: Path):
    """Export the Sluice model and load it in transformers (float32, sdpa, eval)."""
    path = save_hf_checkpoint(model, tmp / "ckpt")
    torch.set_num_threads(os.cpu_count())
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(path), torch_dtype=torch.float32, attn_implementation="sdpa")
    return hf.eval()


def sanity_check(llm: LLM, hf, vocab: int) -> list[dict]:
    """Greedy first token of Sluice's engine vs transformers on a few prompts."""
    prompts = random_prompts(3, 128, vocab, seed=123)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    rows = []
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            hf_tok = int(hf(torch.tensor([p])).logits[0, -1].argmax())
            rows.append({"sluice": o.outputs[0].token_ids[0], "transformers": hf_tok,
                         "agree": o.outputs[0].token_ids[0] == hf_tok})
    return rows


def hf_throughput(hf, prompts: list[list[int]], output_len: int) -> dict:
    """transformers generate() on all prompts as one batch; warm-up call first."""
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        start, cpu = time.perf_counter(), time.process_time()
        out = hf.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"num_prompts": len(prompts), "elapsed_s": elapsed, "cpu_s": cpu,
            "output_tokens": generated, "output_tokens_per_s": generated / elapsed}


# -- roofline ----------------------------------------------------------------

def matmul_roofline(n: int = 2048, repeats: int = 8) -> dict:
    """Best-of-``repeats`` float32 FLOP/s of a jitted n x n @ n x n jnp matmul."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "flops_per_s": 2 * n ** 3 / best}


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Best-of-``repeats`` bytes/s of a ``numpy.copyto`` of ``mib`` MiB, counting the
    bytes read and the bytes written (STREAM's copy convention)."""
    src = np.ones(mib * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return {"mib": mib, "repeats": repeats, "best_s": min(times),
            "bytes_per_s": 2 * src.nbytes / min(times)}


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: every layer weight, the final norm and
    the lm-head (the embedding table when tied; a lookup reads one row otherwise)."""
    p = model.params
    head = p["lm_head"] if "lm_head" in p else p["embed"]
    leaves = jax.tree_util.tree_leaves(p["layers"]) + [p["final_norm"], head]
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


def decode_flops_per_token(model, context: float) -> dict:
    """2 * (non-embedding matmul params + lm-head params) + attention at ``context``."""
    cfg, layers = model.config, model.params["layers"]
    matmul = sum(int(np.prod(w.shape)) for k, w in layers.items() if k.startswith("w"))
    head = cfg.vocab_size * cfg.hidden_size  # tied or not, one [hidden, vocab] matmul
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return {"matmul_params": matmul, "lm_head_params": head,
            "attention_flops": attn, "flops": 2 * (matmul + head) + attn}


def decode_steps(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    """Time engine.step() and runner.execute() during one generation; keep steps
    whose every row is a decode with the full batch running."""
    engine, runner = llm.engine, llm.engine.runner
    record: list[dict] = []
    orig_execute, orig_step = runner.execute, engine.step

    def execute(batch, during=None, *rest):
        info = {"rows": len(batch),
                "decode": all(r.request.is_decode(r.num_new_tokens) for r in batch),
                "context": float(np.mean([r.request.num_computed_tokens + 1 for r in batch]))}
        t = time.perf_counter()
        out = orig_execute(batch, during, *rest)
        info["execute_s"] = time.perf_counter() - t
        record.append(info)
        return out

    def step():
        t = time.perf_counter()
        out = orig_step()
        if record and "step_s" not in record[-1]:
            record[-1]["step_s"] = time.perf_counter() - t
        return out

    runner.execute, engine.step = execute, step
    try:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        total = time.perf_counter() - t
    finally:
        runner.execute, engine.step = orig_execute, orig_step
    dec = [r for r in record if r["decode"] and r["rows"] == len(prompts)]
    pre = [r for r in record if not r["decode"]]
    med = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    return {
        "batch": len(prompts), "generation_s": total, "num_steps": len(record),
        "num_full_decode_steps": len(dec), "num_prefill_steps": len(pre),
        "decode_step_s_median": med([r["step_s"] for r in dec]),
        "decode_execute_s_median": med([r["execute_s"] for r in dec]),
        "decode_context_mean": float(np.mean([r["context"] for r in dec])) if dec else None,
        "decode_steps_total_s": float(sum(r["step_s"] for r in record if r["decode"])),
        "prefill_steps_total_s": float(sum(r["step_s"] for r in pre)),
    }


# -- main --------------------------------------------------------------------

def plot(points: list[dict], bound_tok_s: float, path: Path, model: str) -> None:
    """Tokens/s vs concurrent requests, both systems, one line per prompt + output
    length; the batch-1 bandwidth bound drawn as a point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (i, o), marker in zip(sorted({(p["input_len"], p["output_len"]) for p in points}), "osd^"):
        rows = [p for p in points if (p["input_len"], p["output_len"]) == (i, o)]
        for system, style in (("sluice", "-"), ("transformers", "--")):
            ax.plot([p["requests"] for p in rows], [p[system]["output_tokens_per_s"] for p in rows],
                    style, marker=marker, label=f"{system} {i}+{o}")
    ax.plot([1], [bound_tok_s], "k*", markersize=12, label="batch-1 bandwidth bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{model}, float32, 2-core CPU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_points(text: str) -> list[tuple[int, int, int]]:
    """'8x128+32,...' -> [(requests, prompt tokens, output tokens), ...]."""
    try:
        out = []
        for item in text.split(","):
            n, rest = item.strip().split("x")
            i, o = rest.split("+")
            out.append((int(n), int(i), int(o)))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--points: expected NxIN+OUT[,...], got {text!r}") from None


def measure_points(llm: LLM, hf, points: list[tuple[int, int, int]]) -> list[dict]:
    """Both systems at each point (requests, prompt tokens, output tokens)."""
    vocab = llm.model.config.vocab_size
    rows = []
    for n, i, o in points:
        prompts = random_prompts(n, i, vocab, seed=1000 * n + i)
        c = time.process_time()
        s = throughput(llm, prompts, o, warmup_batch=False)
        s["cpu_s"] = time.process_time() - c
        h = hf_throughput(hf, prompts, o)
        ratio = s["output_tokens_per_s"] / h["output_tokens_per_s"]
        # CPU seconds each system used: on a shared, loaded machine wall time
        # mostly measures waiting for a core
        cpu_ratio = h["cpu_s"] / s["cpu_s"]
        rows.append({"requests": n, "input_len": i, "output_len": o, "sluice": s,
                     "transformers": h, "ratio": ratio, "cpu_time_ratio": cpu_ratio,
                     "load": os.getloadavg()})
        print(f"[{n:3d} x {i}+{o}] sluice {s['output_tokens_per_s']:.1f} tok/s "
              f"({s['elapsed_s']:.2f}s, {s['cpu_s']:.2f} CPU s), transformers "
              f"{h['output_tokens_per_s']:.1f} tok/s ({h['elapsed_s']:.2f}s, "
              f"{h['cpu_s']:.2f} CPU s), ratio {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def start(model_name: str, engine_kw: dict) -> tuple[LLM, float]:
    t = time.perf_counter()
    llm = LLM(load_model(model_name, dtype="float32"), **engine_kw)
    startup = time.perf_counter() - t
    print(f"sluice start-up (load + compile {len(llm.engine.runner.shapes())} shapes): "
          f"{startup:.1f}s")
    return llm, startup


def run_points(model_name: str, points: list[tuple[int, int, int]]) -> None:
    """Both systems at each point, in this process; ratios printed and saved."""
    longest = max(i + o for _, i, o in points)
    engine_kw = dict(ENGINE_KW, max_model_len=max(ENGINE_KW["max_model_len"],
                                                  -(-longest // 128) * 128))
    res: dict = {"machine": machine_info(), "model": model_name, "engine": engine_kw,
                 "load_before": os.getloadavg()}
    llm, res["sluice_startup_s"] = start(model_name, engine_kw)
    with tempfile.TemporaryDirectory() as tmp:
        res["points"] = measure_points(llm, load_hf(llm.model, Path(tmp)), points)
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "throughput-points.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out}/throughput-points.json")


def machine_info() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": " ".join([".venv/bin/python", *sys.argv])}


def decode_bounds(llm: LLM) -> dict:
    """Pure-decode steps at batch 1 against the bandwidth bound and at batch 32
    against the matmul rate, both bounds measured now."""
    vocab = llm.model.config.vocab_size
    bw, roof = copy_bandwidth(), matmul_roofline()
    weight_bytes = weight_bytes_per_step(llm.model)
    one = decode_steps(llm, random_prompts(1, 128, vocab, seed=7), 128)
    bound_s = weight_bytes / bw["bytes_per_s"]
    one.update(weight_bytes=weight_bytes, bound_step_s=bound_s,
               bandwidth_fraction=bound_s / one["decode_step_s_median"])
    wide = decode_steps(llm, random_prompts(32, 128, vocab, seed=8), 128)
    fl = decode_flops_per_token(llm.model, wide["decode_context_mean"])
    wide["flops_per_token"] = fl
    for key in ("step", "execute"):
        achieved = fl["flops"] * 32 / wide[f"decode_{key}_s_median"]
        wide[f"achieved_flops_per_s_{key}"] = achieved
        wide[f"roofline_fraction_{key}"] = achieved / roof["flops_per_s"]
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of "
          f"weights per step: bound {bound_s * 1e3:.1f} ms; batch-1 decode step median "
          f"{one['decode_step_s_median'] * 1e3:.1f} ms = {one['bandwidth_fraction'] * 100:.0f}% "
          f"of the bound (goal 85%)")
    print(f"fp32 matmul rate {roof['flops_per_s'] / 1e9:.1f} GFLOP/s; batch-32 decode step "
          f"median {wide['decode_step_s_median'] * 1e3:.1f} ms (runner.execute "
          f"{wide['decode_execute_s_median'] * 1e3:.1f} ms), {fl['flops'] / 1e6:.1f} MFLOP/token "
          f"at context {wide['decode_context_mean']:.0f}: "
          f"{wide['roofline_fraction_step'] * 100:.1f}% of the matmul rate (goal 35%)")
    return {"copy_bandwidth": bw, "matmul_roofline": roof, "batch_1": one, "batch_32": wide}


def goals(points: list[dict], bounds: dict) -> dict:
    at = {(p["requests"], p["input_len"], p["output_len"]): p["ratio"] for p in points}
    wide = [at[k] for k in ((32, 128, 128), (64, 128, 128)) if k in at]
    return {"ratio_ge_1x_everywhere": all(r >= 1.0 for r in at.values()),
            "ratio_ge_2x_at_32_64_x_128_128": bool(wide) and all(r >= 2.0 for r in wide),
            "batch_1_ge_85pct_bandwidth": bounds["batch_1"]["bandwidth_fraction"] >= 0.85,
            "batch_32_ge_35pct_matmul": bounds["batch_32"]["roofline_fraction_step"] >= 0.35}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="the 128 + 32 points and 512 + 32 only")
    ap.add_argument("--model", default=MODEL,
                    help="a Llama-family model for load_model: a name, an HF directory or a .gguf file")
    ap.add_argument("--points", type=parse_points, default=None,
                    help="only these points, e.g. 1x128+32,32x128+32,1x512+32")
    args = ap.parse_args()
    if args.points:
        return run_points(args.model, args.points)
    sweep = QUICK_SWEEP if args.quick else SWEEP
    engine_kw = dict(ENGINE_KW, max_model_len=640)  # fits 512 + 32
    res: dict = {"machine": machine_info(), "model": args.model, "dtype": "float32",
                 "engine": engine_kw, "load_before": os.getloadavg()}
    llm, res["sluice_startup_s"] = start(args.model, engine_kw)
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(llm.model, Path(tmp))
        res["sanity"] = sanity_check(llm, hf, llm.model.config.vocab_size)
        for row in res["sanity"]:
            print(f"first greedy token: sluice={row['sluice']} "
                  f"transformers={row['transformers']} agree={row['agree']}")
        res["points"] = measure_points(llm, hf, sweep)
        del hf
    res["bounds"] = decode_bounds(llm)
    res["goals"] = goals(res["points"], res["bounds"])
    print(f"goals: {res['goals']}")

    stem = "throughput" if args.model == MODEL else f"throughput-{Path(args.model).stem}"
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    plot(res["points"], 1 / res["bounds"]["batch_1"]["bound_step_s"], out / f"{stem}.png",
         args.model)
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    for name in (f"{stem}.json", f"{stem}.png"):
        shutil.copy(out / name, results / name)
    print(f"wrote {out}/{stem}.{{json,png}} and {results}/{stem}.{{json,png}}")


if __name__ == "__main__":
    main()
