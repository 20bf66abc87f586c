"""Held-out perplexity of each example adapter's target data, with and without it, as served.

Starts `python -m server` on the base model with the example adapters, then scores the held-out
windows that train_adapters.py evaluated (same split, same length) through the scoring API
(`/v1/completions`, `echo` + `logprobs`, `max_tokens: 0`) under the base model and under the adapter.
Prints a Markdown table (README's) and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tokenizers import Tokenizer

from scripts.train_adapters import KINDS, Data


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("default_model"))
    p.add_argument("--examples", type=Path, default=Path("examples"))
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", type=Path)
    return p.parse_args()


def serve(args: argparse.Namespace, store: Path) -> subprocess.Popen:
    flags = [f"--adapter={r.name}={args.examples / r.name}" for r in KINDS.values()]
    cmd = [sys.executable, "-m", "server", "--model", str(args.base), "--store", str(store), "--port", str(args.port),
           "--no-examples", *flags]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def perplexity(client: httpx.Client, model: str, windows) -> float:
    """exp(-mean log p) over every token after the first of each window, as the server scores it."""
    total, count = 0.0, 0
    for window in windows.tolist():
        body = {"model": model, "prompt": window, "max_tokens": 0, "echo": True, "logprobs": 0}
        scores = client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]["logprobs"]
        logprobs = scores["token_logprobs"][1:]
        total, count = total + sum(logprobs), count + len(logprobs)
    return math.exp(-total / count)


def main() -> None:
    args = parse_args()
    tokenizer = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    rows = []
    with tempfile.TemporaryDirectory() as store:
        proc = serve(args, Path(store))
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600) as client:
                base = client.get("/v1/models").json()["data"][0]["id"]
                for r in KINDS.values():
                    windows = Data(r.subcorpus, tokenizer, r.context).held_out
                    rows.append({"adapter": r.name, "held_out": r.subcorpus, "tokens": windows.numel(),
                                 "window": r.context, "ppl_base": round(perplexity(client, base, windows), 2),
                                 "ppl_adapter": round(perplexity(client, r.name, windows), 2)})
        finally:
            proc.terminate()
            proc.wait(60)
    print("| adapter | held-out data | tokens (window) | ppl, base model | ppl, with the adapter |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['adapter']}` | {r['held_out']} | {r['tokens']} ({r['window']}) | {r['ppl_base']} | {r['ppl_adapter']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
