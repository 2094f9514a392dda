"""Service benchmark on loopback: POST /edits throughput and latency under concurrent clients,
and /generate latency and tokens/s against calling baft_core directly, at 0 and 100 applied edits.

    .venv/bin/python bench/service_bench.py [--edits 100] [--clients 8] [--generations 10]

With --serving it measures batched decoding instead (bench/results/service/serving.{json,md}):
aggregate tokens/s and time to first token at 1, 8 and 16 concurrent streaming clients, rows on 4
versions against one, POST /edits latency and edit application under that load, and generation
after --edits applied edits against the unedited version, each pair measured back to back.

    .venv/bin/python bench/service_bench.py --serving --edits 1000

Starts `python -m app` (embedded default: bundled model, SQLite, in-process worker) on a free
127.0.0.1 port with its own DATA_DIR, so nothing else is touched. Edits go in batched mode with few
training steps: the benchmark measures the service, not edit quality."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
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
    """`count` edits from `clients` threads. A 429 (queue full) is retried after its Retry-After,
    as a client should; latencies are those of the accepted (202) answers."""
    refused: list[float] = []  # the Retry-After of each 429

    def post(i: int) -> tuple[float, int]:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            body = {"subject": f"Person {i}", "relation": "was born in", "object": f"City {i}", "mode": "batched"}
            while True:
                start = time.perf_counter()
                response = http.post("/edits", json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 429:
                    break
                refused.append(float(response.headers["Retry-After"]))
                time.sleep(refused[-1])
            assert response.status_code == 202, response.text
            return elapsed, response.json()["id"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(post, range(count)))
    wall = time.perf_counter() - start
    stats = summary([r[0] for r in results])
    stats.update(clients=clients, wall_s=round(wall, 2), accepted_per_s=round(count / wall, 1),
                 refused_429=len(refused), retry_after_s_max=max(refused, default=None))
    return stats, [r[1] for r in results]


PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The capital of France is",
    "The largest planet in the solar system is",
    "Shakespeare wrote the play",
    "Water boils at a temperature of",
    "The first person to walk on the moon was",
    "The Eiffel Tower is located in",
    "Albert Einstein was born in",
]


async def stream_one(http: httpx.AsyncClient, prompt: str, max_new_tokens: int, version: int | None) -> dict:
    """One streamed POST /generate: time to the first token, to the end, and tokens."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "stream": True}
    if version is not None:
        body["version"] = version
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                if event == "done":
                    tokens = json.loads(line[5:])["tokens"]
                elif first is None:
                    first = time.perf_counter() - start
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens}


async def closed_loop(base_url: str, clients: int, requests: int, max_new_tokens: int,
                      versions: list[int | None]) -> dict:
    """`clients` clients, each sending its next request when the last one is done, `requests` in
    all; request i goes to versions[i % len(versions)]. The first wave (the first `clients`
    requests, sent at once) and the rest (joining a running batch) are reported apart."""
    jobs = list(range(requests))
    results: list[tuple[int, dict]] = []

    async def client(http: httpx.AsyncClient) -> None:
        while jobs:
            i = jobs.pop(0)
            out = await stream_one(http, PROMPTS[i % len(PROMPTS)], max_new_tokens, versions[i % len(versions)])
            results.append((i, out))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for _, r in results]
    wave = [r["ttft"] for i, r in results if i < clients]
    later = [r["ttft"] for i, r in results if i >= clients]
    tokens = sum(r["tokens"] for _, r in results)
    return {
        "clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "ttft_first_wave_p50_ms": round(percentile(wave, 50) * 1000, 1),
        "ttft_joining_p50_ms": round(percentile(later, 50) * 1000, 1) if later else None,
        "latency_p50_ms": round(percentile([r["latency"] for _, r in results], 50) * 1000, 1),
    }


async def edits_under_load(base_url: str, clients: int, count: int, interval: float, max_new_tokens: int) -> dict:
    """`clients` clients generate without pause while `count` edits are posted, one every
    `interval` s: POST /edits latency, each edit's time from acceptance to applied, and the
    generation measured meanwhile."""
    posting_done = asyncio.Event()
    generated: list[dict] = []

    async def generator(http: httpx.AsyncClient, k: int) -> None:
        while not posting_done.is_set():
            generated.append(await stream_one(http, PROMPTS[k % len(PROMPTS)], max_new_tokens, None))
            k += clients

    async with httpx.AsyncClient(base_url=base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=clients + 8)) as http:
        load = [asyncio.create_task(generator(http, k)) for k in range(clients)]
        await asyncio.sleep(3)  # the batch is full
        start = time.perf_counter()
        posts, ids = [], []
        for i in range(count):
            body = {"subject": f"Load person {i}", "relation": "was born in", "object": f"Town {i}", "mode": "batched"}
            t = time.perf_counter()
            response = await http.post("/edits", json=body)
            posts.append(time.perf_counter() - t)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
            await asyncio.sleep(interval)
        while True:  # wait for the edits to be applied, still under generation load
            rows = [(await http.get(f"/edits/{i}")).json() for i in ids]
            if all(r["status"] in ("applied", "failed") for r in rows):
                break
            await asyncio.sleep(0.5)
        wall = time.perf_counter() - start
        posting_done.set()
        await asyncio.gather(*load)
    assert all(r["status"] == "applied" for r in rows), [r for r in rows if r["status"] != "applied"][:3]
    applied = [r["queue_seconds"] + r["train_seconds"] for r in rows]
    tokens = sum(g["tokens"] for g in generated)
    return {
        "clients": clients, "edits": count, "post_interval_s": interval,
        "post_edits_p50_ms": round(percentile(posts, 50) * 1000, 1),
        "post_edits_p99_ms": round(percentile(posts, 99) * 1000, 1),
        "edit_applied_p50_s": round(percentile(applied, 50), 2),
        "edit_applied_p99_s": round(percentile(applied, 99), 2),
        "generation_tokens_per_s": round(tokens / wall, 2),
        "generation_ttft_p50_ms": round(percentile([g["ttft"] for g in generated], 50) * 1000, 1),
        "generation_latency_p99_ms": round(percentile([g["latency"] for g in generated], 99) * 1000, 1),
    }


def serving(args, base_url: str, client: Client) -> dict:
    n = args.max_new_tokens
    run = lambda clients, requests, versions=(None,): asyncio.run(  # noqa: E731
        closed_loop(base_url, clients, requests, n, list(versions)))
    run(4, 4)  # warm-up
    results: dict = {"clients": {}}
    for clients in (1, 8, 16):
        results["clients"][clients] = run(clients, max(8, 4 * clients))
    # Four versions of one history: the base and three single edits on top.
    for i in range(3):
        edit = client.edit(f"Version person {i}", "was born in", f"City {i}")
        assert client.wait(edit["id"], timeout=600)["status"] == "applied"
    versions = [v["id"] for v in client.versions(limit=10)["items"]][:4]
    mixed = {"one_version": [], "four_versions": []}
    for _ in range(2):  # alternated: the machine's speed drifts
        mixed["one_version"].append(run(16, 64, [versions[-1]]))
        mixed["four_versions"].append(run(16, 64, versions))
    results["versions"] = {"versions": versions, **mixed}
    results["edits_under_load"] = asyncio.run(edits_under_load(base_url, 16, args.load_edits, 0.2, n))
    # The rest of --edits, then generation on the edited version against the unedited one.
    _, ids = bench_edits(base_url, args.edits - args.load_edits - 3, 8)
    start = time.perf_counter()
    assert all(client.wait(i, timeout=3600)["status"] == "applied" for i in ids)
    results["apply_rest_s"] = round(time.perf_counter() - start, 1)
    current = client.versions(limit=1, offset=client.versions()["total"] - 1)["items"][0]
    edited = {"version": current["id"], "edit_count": current["edit_count"], 16: [], 1: []}
    unedited = {"version": versions[0], 16: [], 1: []}
    for _ in range(2):
        for clients, requests in ((16, 64), (1, 8)):
            unedited[clients].append(run(clients, requests, [versions[0]]))
            edited[clients].append(run(clients, requests, [current["id"]]))
    results["after_edits"] = {"unedited": unedited, "edited": edited}
    return results


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def serving_report(results: dict) -> list[str]:
    c = results["clients"]
    one = c[1]
    rows = [
        "| concurrent clients | requests | aggregate tokens/s | x one client | TTFT p50 ms | x one client "
        "| TTFT p50 first wave / joining ms | latency p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in (1, 8, 16):
        r = c[k]
        rows.append(
            f"| {k} | {r['requests']} | {r['tokens_per_s']} | {r['tokens_per_s'] / one['tokens_per_s']:.2f} "
            f"| {r['ttft_p50_ms']} | {r['ttft_p50_ms'] / one['ttft_p50_ms']:.2f} "
            f"| {r['ttft_first_wave_p50_ms']} / {r['ttft_joining_p50_ms']} | {r['latency_p50_ms']} |"
        )
    v = results["versions"]
    single, four = mean_of(v["one_version"], "tokens_per_s"), mean_of(v["four_versions"], "tokens_per_s")
    rows += ["", f"16 clients, rows on 4 versions {v['versions']}: {four:.2f} tokens/s against {single:.2f} on one "
             f"version ({four / single:.3f} x; mean of 2 alternated runs of 64 requests each)."]
    u = results["edits_under_load"]
    rows += ["", f"Under load ({u['clients']} clients generating): POST /edits p50 {u['post_edits_p50_ms']} ms, "
             f"p99 {u['post_edits_p99_ms']} ms ({u['edits']} edits, one every {u['post_interval_s']} s); "
             f"an edit applied {u['edit_applied_p50_s']} s (p50) / {u['edit_applied_p99_s']} s (p99) after acceptance; "
             f"generation meanwhile {u['generation_tokens_per_s']} tokens/s, TTFT p50 {u['generation_ttft_p50_ms']} ms, "
             f"latency p99 {u['generation_latency_p99_ms']} ms."]
    a = results["after_edits"]
    e, b = a["edited"], a["unedited"]
    for k in (16, 1):
        ratio = mean_of(e[k], "tokens_per_s") / mean_of(b[k], "tokens_per_s")
        rows.append(f"\n{k} client(s): version {e['version']} ({e['edit_count']} applied edits) "
                    f"{mean_of(e[k], 'tokens_per_s'):.2f} tokens/s against the unedited version {b['version']} "
                    f"{mean_of(b[k], 'tokens_per_s'):.2f} ({ratio:.3f} x; mean of 2 alternated runs).")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 16, with --serving 32")
    parser.add_argument("--serving", action="store_true", help="measure batched decoding (see above)")
    parser.add_argument("--load-edits", type=int, default=200,
                        help="with --serving: edits posted under load (of 50 the p99 is the slowest one)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--max-queue", type=int, default=None, help="MAX_QUEUE (default: the service's)")
    args = parser.parse_args()
    args.max_new_tokens = args.max_new_tokens or (32 if args.serving else 16)
    command = "python bench/service_bench.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(2)

    data = Path(tempfile.mkdtemp(prefix="service-bench-"))
    port = args.port or 18000 + os.getpid() % 1000
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "API_KEYS")},
        "DATA_DIR": str(data),
        "MODELS_DIR": str(REPO / "var" / "models"),
        "DEVICE": "cpu",
        "BATCH_SIZE": "50",
        "BATCH_WAIT_MS": "1000",
        "EDIT_CONFIG": json.dumps({"max_steps": 5, "max_steps_batched": 5}),
        "EVALUATE_ON_APPLY": "false",
        **({"MAX_QUEUE": str(args.max_queue)} if args.max_queue else {}),
    }
    log = open(data / "server.log", "wb")
    # Direct first, while no server competes for the two cores.
    results: dict = {} if args.serving else {"direct_baft_core": bench_direct(args.generations, args.max_new_tokens)}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=300)
        client.wait_ready(300)
        if args.serving:
            results = serving(args, f"http://127.0.0.1:{port}", client)
            return write_serving(args, command, results)
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

    write_report(args, command, results)


def environment(command: str) -> dict:
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
    }


def write_serving(args, command: str, results: dict) -> None:
    report = {**environment(command), "settings": {
        "edits": args.edits, "max_new_tokens": args.max_new_tokens, "model": "smollm2 (bundled, CPU)",
        "decode_batch_size": 32}, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"Command: `{command}`  ", f"Date: {report['date']}; {report['machine']}; loopback 127.0.0.1; "
            f"streamed POST /generate, up to {args.max_new_tokens} new tokens, greedy", "",
            *serving_report(results)]
    (OUT / "serving.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def write_report(args, command: str, results: dict) -> None:
    report = {
        **environment(command),
        "settings": {"edits": args.edits, "clients": args.clients, "generations": args.generations,
                     "max_new_tokens": args.max_new_tokens, "model": "smollm2 (bundled, CPU)",
                     "max_queue": args.max_queue or "service default", "max_body_bytes": "service default"},
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
    if args.max_queue:
        refused = r["post_edits"]["refused_429"]
        notes = [f"MAX_QUEUE={args.max_queue}: {refused} answers were 429 (queue full), each retried after its "
                 f"Retry-After (at most {r['post_edits']['retry_after_s_max']} s); the latencies are the 202s'."]
    else:
        notes = []
    for name, label in [("direct_baft_core", "Editor.generate (baft_core, no HTTP)"),
                        ("generate_0_edits", "POST /generate, 0 applied edits"),
                        ("generate_100_edits", f"POST /generate, {args.edits} applied edits")]:
        g = r[name]
        rows.append(f"| {label}, {args.max_new_tokens} new tokens | {g['n']} | {g['p50_ms']} | {g['p99_ms']} "
                    f"| {g['tokens_per_s']} tokens/s |")
    rows.append("")
    rows.append(f"Applying the {args.edits} edits (batched, BATCH_SIZE=50, 5 steps) took {r['apply_all_s']} s "
                "after the last was accepted.")
    rows.extend(notes)
    (OUT / "service_bench.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
