"""Service benchmark on loopback: POST /edits throughput and latency under concurrent clients,
and /generate latency and tokens/s against calling baft_core directly, at 0 and 100 applied edits.

    .venv/bin/python bench/service_bench.py [--edits 100] [--clients 8] [--generations 10]

Starts `python -m app` (embedded default: bundled model, SQLite, in-process worker) on a free
127.0.0.1 port with its own DATA_DIR, so nothing else is touched. Edits go in batched mode with few
training steps: the benchmark measures the service, not edit quality."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app.client import Client  # noqa: E402
from baft_core import Editor, load_model  # noqa: E402

PROMPT = "The mother tongue of Danielle Darrieux is"
OUT = REPO / "bench" / "results" / "service"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float], tokens: list[int] | None = None) -> dict:
    out = {
        "n": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "mean_ms": round(statistics.mean(latencies) * 1000, 1),
    }
    if tokens is not None:
        out["tokens_per_s"] = round(sum(tokens) / sum(latencies), 1)
    return out


def bench_generate(client: Client, n: int, max_new_tokens: int) -> dict:
    client.generate(PROMPT, max_new_tokens=max_new_tokens)  # warm-up
    latencies, tokens = [], []
    for _ in range(n):
        start = time.perf_counter()
        out = client.generate(PROMPT, max_new_tokens=max_new_tokens)
        latencies.append(time.perf_counter() - start)
        tokens.append(out["tokens"])
    return {**summary(latencies, tokens), "version": out["version"]}


def bench_direct(n: int, max_new_tokens: int) -> dict:
    """baft_core in this process, same model and adapter shape, no HTTP."""
    loaded = load_model("smollm2", device="cpu", cache_dir=REPO / "var" / "models")
    editor = Editor(loaded.model, loaded.tokenizer)
    editor.generate([PROMPT], max_new_tokens)
    latencies, tokens = [], []
    for _ in range(n):
        start = time.perf_counter()
        [text] = editor.generate([PROMPT], max_new_tokens)
        latencies.append(time.perf_counter() - start)
        tokens.append(len(loaded.tokenizer(text, add_special_tokens=False).input_ids))
    return summary(latencies, tokens)


def bench_edits(base_url: str, count: int, clients: int) -> tuple[dict, list[int]]:
    def post(i: int) -> tuple[float, int]:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            body = {"subject": f"Person {i}", "relation": "was born in", "object": f"City {i}", "mode": "batched"}
            start = time.perf_counter()
            response = http.post("/edits", json=body)
            elapsed = time.perf_counter() - start
            assert response.status_code == 202, response.text
            return elapsed, response.json()["id"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(post, range(count)))
    wall = time.perf_counter() - start
    stats = summary([r[0] for r in results])
    stats.update(clients=clients, wall_s=round(wall, 2), accepted_per_s=round(count / wall, 1))
    return stats, [r[1] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    command = "python bench/service_bench.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(2)

    data = Path(tempfile.mkdtemp(prefix="service-bench-"))
    port = 18000 + os.getpid() % 1000
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "API_KEYS")},
        "DATA_DIR": str(data),
        "MODELS_DIR": str(REPO / "var" / "models"),
        "DEVICE": "cpu",
        "BATCH_SIZE": "50",
        "BATCH_WAIT_MS": "1000",
        "EDIT_CONFIG": json.dumps({"max_steps": 5, "max_steps_batched": 5}),
        "EVALUATE_ON_APPLY": "false",
    }
    log = open(data / "server.log", "wb")
    # Direct first, while no server competes for the two cores.
    results: dict = {"direct_baft_core": bench_direct(args.generations, args.max_new_tokens)}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=300)
        client.wait_ready(300)
        results["generate_0_edits"] = bench_generate(client, args.generations, args.max_new_tokens)
        results["post_edits"], ids = bench_edits(f"http://127.0.0.1:{port}", args.edits, args.clients)
        start = time.perf_counter()
        statuses = [client.wait(i, timeout=1800)["status"] for i in ids]
        results["apply_all_s"] = round(time.perf_counter() - start, 1)
        assert statuses == ["applied"] * len(ids), statuses
        results["generate_100_edits"] = bench_generate(client, args.generations, args.max_new_tokens)
        results["generate_100_edits"]["applied_edits"] = len(ids)
    finally:
        server.terminate()
        server.wait(60)

    report = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "settings": {"edits": args.edits, "clients": args.clients, "generations": args.generations,
                     "max_new_tokens": args.max_new_tokens, "model": "smollm2 (bundled, CPU)"},
        "results": results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "service_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    r = results
    rows = [
        f"Command: `{command}`  ",
        f"Date: {report['date']}; {report['machine']}; loopback 127.0.0.1",
        "",
        "| measurement | n | p50 ms | p99 ms | throughput |",
        "|---|---|---|---|---|",
        f"| POST /edits, {args.clients} concurrent clients | {r['post_edits']['n']} | {r['post_edits']['p50_ms']} "
        f"| {r['post_edits']['p99_ms']} | {r['post_edits']['accepted_per_s']} edits accepted/s |",
    ]
    for name, label in [("direct_baft_core", "Editor.generate (baft_core, no HTTP)"),
                        ("generate_0_edits", "POST /generate, 0 applied edits"),
                        ("generate_100_edits", f"POST /generate, {args.edits} applied edits")]:
        g = r[name]
        rows.append(f"| {label}, {args.max_new_tokens} new tokens | {g['n']} | {g['p50_ms']} | {g['p99_ms']} "
                    f"| {g['tokens_per_s']} tokens/s |")
    rows.append("")
    rows.append(f"Applying the {args.edits} edits (batched, BATCH_SIZE=50, 5 steps) took {r['apply_all_s']} s "
                "after the last was accepted.")
    (OUT / "service_bench.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
