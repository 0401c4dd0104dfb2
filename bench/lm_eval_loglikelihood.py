"""lm-eval (PyPI ``lm-eval``) scores a loglikelihood task through ``sluice serve``,
and its loglikelihoods equal the ones Sluice computes in process (issue 24).

lm-eval is heavy (datasets, pandas, pyarrow, scikit-learn, nltk: about 4 minutes
to install here), so it is not a test dependency; install it into a virtual
environment of its own that also sees Sluice's, and run this from the repository
root with that environment's Python::

    .venv/bin/python -m venv /tmp/lmeval
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/lmeval/lib/python3.11/site-packages/zz_sluice.pth  # sees Sluice's packages
    /tmp/lmeval/bin/pip install "lm-eval[api]"
    /tmp/lmeval/bin/python bench/lm_eval_loglikelihood.py [--model tiny]

No Hugging Face hub is reachable, so the task is defined by a local YAML file over
a local JSON-lines file (`DOCS`, written to a temporary directory) and everything
runs offline. lm-eval's ``local-completions`` model sends each document's context
plus continuation as token ids (tokenized by the server itself:
``tokenizer_backend=remote`` reads ``/tokenizer_info`` and calls ``/tokenize``)
with ``echo``, ``logprobs: 1``, ``max_tokens: 1`` and temperature 0, and sums the
continuation tokens' ``token_logprobs``. The reference is the same sum from
``SamplingParams(prompt_logprobs=1)`` through `sluice.runtime.LLM` in this
process, over the same token ids; for a packaged real model, also Hugging Face
transformers' (float32, from the same GGUF file), reported beside it. Writes bench/results/lm_eval_loglikelihood_MODEL.json
and exits 1 if any loglikelihood differs by more than `TOLERANCE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, served  # noqa: E402  (the same server launcher)

TOLERANCE = 1e-4  # float32 sums of ~10 log-probs; batching may differ between the two
TASK = "sluice_local_loglikelihood"
DOCS = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "One, two, three,", "continuation": " four"},
    {"context": "Water boils at one hundred degrees", "continuation": " Celsius"},
    {"context": "The quick brown fox jumps over the", "continuation": " lazy dog"},
    {"context": "def add(a, b):\n    return", "continuation": " a + b"},
    {"context": "Roses are red, violets are", "continuation": " blue"},
]
TASK_YAML = """task: TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{continuation}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""


def write_task(folder: Path) -> Path:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.replace("TASK", TASK).replace("DATA", str(data)))
    return folder


def lm_eval_loglikelihoods(url: str, model_name: str, tasks: Path) -> list[dict]:
    """Run lm-eval's local-completions against ``url``; per document its context and
    continuation token ids and lm-eval's (loglikelihood, is_greedy)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"model={model_name},base_url={url}/v1/completions,"
                    "tokenizer_backend=remote,num_concurrent=1,max_retries=1"),
        tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        batch_size=1)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [{"doc": s["doc"], "lm_eval": list(s["resps"][0][0])} for s in samples]


def transformers_reference(model: str, docs: list[dict]) -> list[float] | None:
    """For a packaged real model: the same loglikelihoods from Hugging Face
    transformers (float32, loaded from the same GGUF file), an implementation
    independent of Sluice's; None for other models."""
    from sluice.runtime.loader import PACKAGED_MODELS
    if model not in PACKAGED_MODELS:
        return None
    import torch
    import transformers

    gguf = PACKAGED_MODELS[model]()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32)
    out = []
    for d in docs:
        ids = torch.tensor([d["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        n = d["context_tokens"]
        out.append(float(sum(logp[p - 1, d["token_ids"][p]] for p in range(n, ids.shape[1]))))
    return out


def in_process(model: str, docs: list[dict]) -> list[float]:
    """The same loglikelihoods from prompt log-probs in this process, tokenized as
    lm-eval does (context and context + continuation encoded without special
    tokens; the continuation is what the whole adds past the context)."""
    from sluice.runtime import LLM, SamplingParams

    llm = LLM(model, max_model_len=256, warmup=False)
    tok = llm.model.tokenizer
    prompts, ctxlens = [], []
    for d in docs:
        context, continuation = d["context"], d["continuation"]
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctxlens.append(len(tok.encode(context, add_special_tokens=False)))
        prompts.append({"prompt_token_ids": whole})
        d["token_ids"], d["context_tokens"] = whole, ctxlens[-1]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0,
                                                prompt_logprobs=1))
    return [sum(lp.logprob for lp in out.prompt_logprobs[n:])
            for out, n in zip(outs, ctxlens)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_task(Path(tmp))
        t0 = time.monotonic()
        with served(args.model, Path(tmp) / "cache", ["--no-warmup"], max_model_len=256) \
                as (url, _):
            scored = lm_eval_loglikelihoods(url, args.model, tasks)
        lm_eval_s = time.monotonic() - t0
    reference = in_process(args.model, [s["doc"] for s in scored])  # adds token ids
    docs = [s["doc"] for s in scored]
    hf = transformers_reference(args.model, docs) or [None] * len(docs)
    rows = [{"context": d["context"], "continuation": d["continuation"],
             "lm_eval": s["lm_eval"][0], "is_greedy": s["lm_eval"][1], "in_process": ref,
             "abs_diff": abs(s["lm_eval"][0] - ref), "transformers": t}
            for d, s, ref, t in zip(docs, scored, reference, hf)]
    worst = max(r["abs_diff"] for r in rows)
    worst_hf = None if hf[0] is None else max(abs(r["lm_eval"] - r["transformers"])
                                              for r in rows)
    from importlib.metadata import version
    result = {"model": args.model, "lm_eval_version": version("lm-eval"),
              "documents": len(rows), "max_abs_diff": worst,
              "max_abs_diff_vs_transformers": worst_hf,
              "tolerance": TOLERANCE, "lm_eval_wall_s": round(lm_eval_s, 1), "rows": rows}
    out = ROOT / "bench" / "results" / f"lm_eval_loglikelihood_{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['lm_eval']:12.6f} {r['in_process']:12.6f}  {r['context']!r} + "
              f"{r['continuation']!r}")
    print(f"max |lm-eval - in-process| = {worst:.2e} over {len(rows)} documents "
          f"(tolerance {TOLERANCE:g}); wrote {out.relative_to(ROOT)}")
    if worst_hf is not None:
        print(f"max |lm-eval - transformers| = {worst_hf:.2e} (float32; reported, not gated)")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
