"""Offline throughput: Sluice vs Hugging Face transformers on CPU, plus a decode roofline.

Run from the repository root::

    .venv/bin/python bench/throughput.py [--quick] [--model NAME_OR_PATH]

What it measures, all in one process on the same weights:

1. ``smollm2-135m-random`` (float32; ``--model`` picks any Llama-family model
   `load_model` accepts, e.g. the real ``smollm2-135m-instruct`` or a ``.gguf``
   file, dequantized to float32) is loaded by Sluice, written as a Hugging Face
   checkpoint (`sluice.runtime.export.save_hf_checkpoint`) and loaded by
   transformers' ``LlamaForCausalLM`` (torch float32, sdpa, all CPU threads).
   Sanity check: the greedy first token of both agrees on a few prompts.
2. Main point: 32 concurrent requests, 128 random prompt tokens, 128 generated
   tokens (greedy, ignore_eos). Sluice: `sluice.runtime.benchmark.throughput`
   (untimed warm-up batch, then the timed batch). transformers: ``generate()`` on
   the 32 prompts as one tensor (greedy, min_new_tokens = max_new_tokens), after an
   untimed warm-up call. Generated tokens/s of both and their ratio.
3. Sweep over batch sizes 1/8/32/64 for both (output length 32 with ``--quick``).
4. Roofline: the float32 matmul rate of the machine (jitted 2048^3 jnp matmul,
   best of several) against the achieved FLOP/s of Sluice's pure-decode steps
   at batch 32 (``engine.step()`` timed; the model call ``runner.execute`` also
   timed, to separate engine/Python overhead from the model step).
   Decode FLOPs per token = 2 * (non-embedding matmul params + lm-head params)
   + 4 * layers * q_heads * head_dim * context.
5. Writes bench/out/throughput.{json,png} and copies them to
   bench/results/throughput.{json,png} (``throughput-<model>.*`` for another
   ``--model``).

``--points 1x128+32,8x128+32,32x128+32,1x512+32`` instead runs only those
points (requests x prompt + output tokens), both systems in the same process,
and writes bench/out/throughput-points.json (``max_model_len`` grows to fit the
longest point): the quick check of one change against transformers.
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
INPUT_LEN = 128
OUTPUT_LEN = 128
MAIN_BATCH = 32
SWEEP = (1, 8, 32, 64)
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
    prompts = random_prompts(3, INPUT_LEN, vocab, seed=123)
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


def decode_flops_per_token(model, context: float) -> dict:
    """2 * (non-embedding matmul params + lm-head params) + attention at ``context``."""
    cfg, layers = model.config, model.params["layers"]
    matmul = sum(int(np.prod(layers[k].shape)) for k in
                 ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
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

def plot(sweep: dict, path: Path, output_len: int, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in sweep.items():
        ax.plot([r["num_prompts"] for r in rows], [r["output_tokens_per_s"] for r in rows],
                marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (batch size)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{model}, fp32 CPU, {INPUT_LEN} in / {output_len} out")
    ax.grid(True, alpha=0.3)
    ax.legend()
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


def run_points(model_name: str, points: list[tuple[int, int, int]]) -> None:
    """Both systems at each point, in this process; ratios printed and saved."""
    longest = max(i + o for _, i, o in points)
    engine_kw = dict(ENGINE_KW, max_model_len=max(ENGINE_KW["max_model_len"],
                                                  -(-longest // 128) * 128))
    res: dict = {"machine": machine_info(), "model": model_name, "engine": engine_kw,
                 "load_before": os.getloadavg(), "points": []}
    t = time.perf_counter()
    model = load_model(model_name, dtype="float32")
    llm = LLM(model, **engine_kw)
    res["sluice_startup_s"] = time.perf_counter() - t
    print(f"sluice start-up (load + compile {len(llm.engine.runner.shapes())} shapes): "
          f"{res['sluice_startup_s']:.1f}s")
    vocab = model.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(model, Path(tmp))
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
            res["points"].append({"requests": n, "input_len": i, "output_len": o,
                                  "sluice": s, "transformers": h, "ratio": ratio,
                                  "cpu_time_ratio": cpu_ratio, "load": os.getloadavg()})
            print(f"[{n:3d} x {i}+{o}] sluice {s['output_tokens_per_s']:.1f} tok/s "
                  f"({s['elapsed_s']:.2f}s, {s['cpu_s']:.2f} CPU s), transformers "
                  f"{h['output_tokens_per_s']:.1f} tok/s ({h['elapsed_s']:.2f}s, "
                  f"{h['cpu_s']:.2f} CPU s), ratio {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="output length 32 in the sweep")
    ap.add_argument("--model", default=MODEL,
                    help="a Llama-family model for load_model: a name, an HF directory or a .gguf file")
    ap.add_argument("--points", type=parse_points, default=None,
                    help="only these points, e.g. 1x128+32,32x128+32,1x512+32")
    args = ap.parse_args()
    if args.points:
        return run_points(args.model, args.points)
    sweep_out = 32 if args.quick else OUTPUT_LEN
    res: dict = {"machine": machine_info(), "model": args.model, "dtype": "float32", "engine": ENGINE_KW,
        "input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "sweep_output_len": sweep_out}

    t = time.perf_counter()
    model = load_model(args.model, dtype="float32")
    llm = LLM(model, **ENGINE_KW)
    res["sluice_startup_s"] = time.perf_counter() - t  # includes compiling every step shape
    print(f"sluice start-up (load + compile): {res['sluice_startup_s']:.1f}s")
    vocab = model.config.vocab_size

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(model, Path(tmp))
        res["sanity"] = sanity_check(llm, hf, vocab)
        for row in res["sanity"]:
            print(f"first greedy token: sluice={row['sluice']} "
                  f"transformers={row['transformers']} agree={row['agree']}")

        prompts = random_prompts(MAIN_BATCH, INPUT_LEN, vocab)
        s = throughput(llm, prompts, OUTPUT_LEN)
        h = hf_throughput(hf, prompts, OUTPUT_LEN)
        res["main"] = {"sluice": s, "transformers": h,
                       "ratio": s["output_tokens_per_s"] / h["output_tokens_per_s"]}
        print(f"[{MAIN_BATCH} x {INPUT_LEN}+{OUTPUT_LEN}] sluice "
              f"{s['output_tokens_per_s']:.1f} tok/s ({s['elapsed_s']:.1f}s), transformers "
              f"{h['output_tokens_per_s']:.1f} tok/s ({h['elapsed_s']:.1f}s), "
              f"ratio {res['main']['ratio']:.2f}x")

        res["sweep"] = {"sluice": [], "transformers": []}
        for bs in SWEEP:
            p = random_prompts(bs, INPUT_LEN, vocab, seed=bs)
            # every step shape was compiled at start-up; skip the extra warm-up batch
            s = throughput(llm, p, sweep_out, warmup_batch=False)
            h = hf_throughput(hf, p, sweep_out)
            res["sweep"]["sluice"].append(s)
            res["sweep"]["transformers"].append(h)
            print(f"[sweep bs={bs:3d} out={sweep_out}] sluice {s['output_tokens_per_s']:.1f} "
                  f"tok/s, transformers {h['output_tokens_per_s']:.1f} tok/s")
        del hf

    roof = matmul_roofline()
    res["matmul_roofline"] = roof
    print(f"fp32 matmul roofline: {roof['flops_per_s'] / 1e9:.1f} GFLOP/s")
    dec = decode_steps(llm, prompts, OUTPUT_LEN)
    ctx = dec["decode_context_mean"]
    fl = decode_flops_per_token(model, ctx)
    for key in ("step", "execute"):
        t_step = dec[f"decode_{key}_s_median"]
        achieved = fl["flops"] * MAIN_BATCH / t_step
        dec[f"achieved_flops_per_s_{key}"] = achieved
        dec[f"roofline_fraction_{key}"] = achieved / roof["flops_per_s"]
    dec["flops_per_token"] = fl
    res["decode"] = dec
    print(f"decode step at batch {MAIN_BATCH}: median {dec['decode_step_s_median'] * 1e3:.1f} ms "
          f"(runner.execute {dec['decode_execute_s_median'] * 1e3:.1f} ms) over "
          f"{dec['num_full_decode_steps']} steps; {fl['flops'] / 1e6:.1f} MFLOP/token at "
          f"context {ctx:.0f}; {dec['achieved_flops_per_s_step'] / 1e9:.1f} GFLOP/s = "
          f"{dec['roofline_fraction_step'] * 100:.1f}% of roofline "
          f"(execute only: {dec['roofline_fraction_execute'] * 100:.1f}%)")

    res["targets"] = {
        "ratio_ge_5x": res["main"]["ratio"] >= 5.0,
        "decode_ge_50pct_roofline": dec["roofline_fraction_step"] >= 0.5}
    print(f"targets: {res['targets']}")

    stem = "throughput" if args.model == MODEL else f"throughput-{Path(args.model).stem}"
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    plot(res["sweep"], out / f"{stem}.png", sweep_out, args.model)
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    for name in (f"{stem}.json", f"{stem}.png"):
        shutil.copy(out / name, results / name)
    print(f"wrote {out}/{stem}.{{json,png}} and {results}/{stem}.{{json,png}}")


if __name__ == "__main__":
    main()
