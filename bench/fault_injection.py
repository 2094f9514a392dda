"""Fault injection: two workers and two API processes on PostgreSQL and Redis, a client sending
edits and restores while processes are killed; then the history is checked.

    .venv/bin/python bench/fault_injection.py [--edits 300] [--restores 4] [--kill-every 4]

Everything runs on loopback with its own throwaway PostgreSQL cluster (initdb, run as the
`postgres` user, port 8150) and Redis (port 8151), so the shared ones are never touched and this
script may kill both. Each process has its own DATA_DIR, as if on its own machine: checkpoints
reach the others through the database (CHECKPOINT_STORAGE=database). The model is the tests' tiny
random Llama (4 layers, d=64, the SmolLM2 tokenizer) so that an edit trains in well under a second. A supervisor restarts a killed process
after a second or two, as a restart policy would.

At the end (after everything is back and the queue is empty) it checks:
- the version chain is linear, every accepted edit is applied exactly once in it, in acceptance
  order, restores where they were accepted, and each version's checkpoint holds exactly the
  edits its rows say (`app.audit`);
- every edit the client saw accepted (202) is applied, and no edit exists that it never sent;
- a replay of the head's lineage on a fresh editor gives the same adapter (sha256) and the same
  generations as the service;
- the client saw no 5xx other than 503.
Results go to bench/results/fault_injection/."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
from sqlalchemy.exc import OperationalError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app import crud  # noqa: E402
from app.audit import audit  # noqa: E402
from app.db import make_engine, make_sessionmaker  # noqa: E402
from app.models import Edit, Version  # noqa: E402
from app.store import CheckpointStore  # noqa: E402
from baft_core import EditConfig, Editor, EditRequest, load_model  # noqa: E402
from baft_core.models import _dequantised_cache, bundled_gguf  # noqa: E402

OUT = REPO / "bench" / "results" / "fault_injection"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT, REDIS_PORT, API_PORTS = 8150, 8151, (8152, 8153)
EDIT_CONFIG = {"max_steps": 8, "max_steps_batched": 8, "layers": [1, 2], "rank": 4}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, init_std=0.3, seed=0)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def tiny_model(directory: Path) -> Path:
    """The tests' tiny Llama (tests/conftest.py), random weights, the bundled tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir, _ = _dequantised_cache(bundled_gguf(), REPO / "var" / "models")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_hidden_layers"], num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_key_value_heads"], max_position_embeddings=TINY["max_position_embeddings"],
        tie_word_embeddings=True, initializer_range=TINY["init_std"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY["seed"])
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Postgres:
    """A throwaway cluster owned by the `postgres` user (the server refuses to run as root)."""

    def __init__(self, root: Path):
        self.data = root / "pgdata"
        self.logfile = root / "postgres.log"
        root.mkdir(parents=True, exist_ok=True)
        shutil.chown(root, "postgres")
        self._as_postgres([PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres"], quiet=True)
        self.start()
        self._as_postgres([PG_BIN / "createdb", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "baft"])

    def _as_postgres(self, command, quiet=False) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], check=True,
                       stdout=subprocess.DEVNULL if quiet else None)

    def start(self) -> None:
        self._as_postgres([PG_BIN / "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-o",
                           f"-p {PG_PORT} -c listen_addresses=127.0.0.1 -k /tmp", "start"], quiet=True)

    def crash(self) -> None:
        """Stop with `immediate`: every backend killed at once, no checkpoint; recovery on start."""
        self._as_postgres([PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "stop"], quiet=True)

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                        "-m", "fast", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{PG_PORT}/baft"


class Fleet:
    """The service's processes, restarted after a kill like a restart policy would."""

    def __init__(self, env: dict[str, str], logs: Path, machines: Path):
        self.env, self.logs, self.machines = env, logs, machines
        self.specs = {
            "worker-1": ["worker"], "worker-2": ["worker"],
            **{f"api-{i + 1}": ["serve", "--host", "127.0.0.1", "--port", str(p), "--log-level", "warning"]
               for i, p in enumerate(API_PORTS)},
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()
        self.redis: subprocess.Popen | None = None

    def start(self, name: str) -> None:
        handle = open(self.logs / f"{name}.log", "ab")
        # Each process keeps its own DATA_DIR, as on its own machine: they share only PostgreSQL
        # (rows and checkpoint blobs) and Redis.
        env = {**self.env, "DATA_DIR": str(self.machines / name)}
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "app", *self.specs[name]], cwd=REPO,
                                            env=env, stdout=handle, stderr=subprocess.STDOUT)
        self.started[name] = time.monotonic()

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)

    def kill(self, name: str, sig: int) -> None:
        with self.lock:
            process = self.procs[name]
            process.send_signal(sig)
        process.wait()

    def restart_dead(self) -> None:
        with self.lock:
            for name, process in self.procs.items():
                if process.poll() is not None:
                    self.start(name)

    def stop_all(self) -> None:
        for process in self.procs.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.procs.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.redis is not None:
            self.redis.kill()


class Load:
    """The client: edits (with idempotency keys, so a retry after a lost answer is not a second
    edit) and a few restores, through either API, retrying on refusals and 503s."""

    def __init__(self, edits: int, restores: int, seed: int):
        self.rng = random.Random(seed)
        self.todo = list(range(edits))
        self.restore_at = set(self.rng.sample(range(edits // 10, edits), restores))
        self.accepted: dict[str, int] = {}  # idempotency key -> edit id
        self.restores: list[dict] = []
        self.codes: Counter = Counter()
        self.errors: Counter = Counter()
        self.post_ms: list[float] = []
        self.lock = threading.Lock()

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.rng.choice(API_PORTS)}", timeout=30)

    def send(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        """One try; None on a transport error (a process that was just killed)."""
        try:
            with self._client() as client:
                began = time.perf_counter()
                response = client.request(method, path, **kwargs)
                elapsed = time.perf_counter() - began
        except httpx.TransportError as err:
            with self.lock:
                self.errors[type(err).__name__] += 1
            return None
        with self.lock:
            self.codes[response.status_code] += 1
            if method == "POST" and path == "/edits" and response.status_code == 202:
                self.post_ms.append(elapsed * 1000)
        return response

    def run(self, workers: int = 2) -> None:
        threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self.lock:
                if not self.todo:
                    return
                i = self.todo.pop(0)
            if i in self.restore_at:
                self._restore()
            self._edit(i)

    def _edit(self, i: int) -> None:
        key = f"fi-{i}"
        mode = "batched" if i % 5 == 0 else "continual"
        body = {"subject": f"Person {i}", "relation": "was born in", "object": f"City {i}", "mode": mode}
        while True:
            response = self.send("POST", "/edits", json=body, headers={"Idempotency-Key": key})
            if response is not None and response.status_code == 202:
                with self.lock:
                    self.accepted[key] = response.json()["id"]
                return
            if response is not None and response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After", "1")))
            else:
                time.sleep(0.3)

    def _restore(self) -> None:
        response = None
        while response is None or response.status_code >= 500:
            versions = self.send("GET", "/versions", params={"limit": 500})
            if versions is None or versions.status_code != 200:
                time.sleep(0.5)
                continue
            items = versions.json()["items"]
            target = self.rng.choice(items[max(0, len(items) - 20):])["id"]
            # Not idempotent: a restore whose answer is lost is retried only on a 503 or refusal
            # (it was then not accepted); a transport error mid-request is counted, not retried.
            response = self.send("POST", f"/versions/{target}/restore", json={})
            if response is None:
                with self.lock:
                    self.restores.append({"target": target, "answer": "lost"})
                return
            if response.status_code >= 500:
                time.sleep(0.5)
        with self.lock:
            self.restores.append({"target": target, "status": response.status_code, "body": response.json()})


def chaos(fleet: Fleet, pg: Postgres, stop: threading.Event, every: float, rng: random.Random, events: list,
          min_uptime: float, seconds: float) -> None:
    """For `seconds`, every `every` s (jittered) kill something; Redis once, PostgreSQL once. A
    process is killed again only after `min_uptime` s (a start takes tens of seconds on the two
    shared cores here; killing processes that never finished starting tests nothing)."""
    rounds = 0
    until = time.monotonic() + seconds
    while not stop.wait(every * rng.uniform(0.6, 1.4)) and time.monotonic() < until:
        rounds += 1
        if rounds == 4:
            events.append((time.time(), "kill redis"))
            log("chaos: SIGKILL redis")
            fleet.redis.kill()
            fleet.redis.wait()
            time.sleep(2)
            fleet.start_redis()
        elif rounds == 8:
            events.append((time.time(), "crash postgres"))
            log("chaos: postgres immediate stop")
            pg.crash()
            time.sleep(3)
            pg.start()
        else:
            grown = [n for n in sorted(fleet.procs) if time.monotonic() - fleet.started[n] > min_uptime]
            if not grown:
                continue
            name = rng.choice(grown)
            sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
            events.append((time.time(), f"{signal.Signals(sig).name} {name}"))
            log(f"chaos: {signal.Signals(sig).name} {name}")
            fleet.kill(name, sig)
        time.sleep(rng.uniform(1, 2))
        if not stop.is_set():
            fleet.restart_dead()


def replay(model_dir: Path, models_dir: Path, database: str, checkpoints: Path, prompts: list[str]) -> dict:
    """Two replays of the log on a fresh editor. `stored`: the head's checkpoint (fetched from
    the database like a new replica would) loaded and asked the same prompts. `retrained`: the
    head's lineage trained again, version by version as the service grouped it, in one process
    that never reloads. Both states are saved whole (the head is stored as additions to its
    parent): identical states give identical bytes, so equal sha256 means the same adapter."""
    engine = make_engine(database)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        head = crud.current_version(session)
        versions = {v.id: v for v in session.query(Version)}
        lineage = []
        current = head.id
        while current is not None:
            v = versions[current]
            if v.kind == "restore":
                current = v.restored_from_id
                continue
            if v.kind != "base":
                edits = session.query(Edit).filter(Edit.version_id == v.id).order_by(Edit.id).all()
                lineage.append((v.kind, [EditRequest.from_dict(e.request) for e in edits]))
            current = v.parent_id
    loaded = load_model(str(model_dir), device="cpu", dtype="float32", cache_dir=models_dir)
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig.from_dict(EDIT_CONFIG))
    store = CheckpointStore(checkpoints, loaded.identity, "cpu", sessions=sessions)
    state = store.load(head.checkpoint_sha256)
    editor.load_state(state.interventions, state.history)
    stored = {
        "sha256": editor.save(Path(tempfile.mkdtemp()), base_model=loaded.identity)["sha256"],
        "texts": editor.generate(prompts, max_new_tokens=6),
        "edits": [r.to_dict() for r in state.history],
    }
    editor.reset()
    editor.prepare()
    for kind, requests in reversed(lineage):
        editor.edit_batch(requests) if kind == "batch" else editor.edit(requests[0])
    sha256 = editor.save(Path(tempfile.mkdtemp()), base_model=loaded.identity)["sha256"]
    retrained = {"sha256": sha256, "texts": editor.generate(prompts, max_new_tokens=6), "versions": len(lineage)}
    engine.dispose()
    return {"stored": stored, "retrained": retrained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--restores", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--min-uptime", type=float, default=30.0)
    parser.add_argument("--chaos-seconds", type=float, default=300.0, help="then the queue drains unharmed")
    parser.add_argument("--max-queue", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=27)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="baft-fi-"))
    shutil.chown(root, "postgres")
    os.chmod(root, 0o755)
    logs = OUT / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    model_dir = tiny_model(root / "tiny-llama")
    pg = Postgres(root / "pg")
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "READ_API_KEYS")}
    env.update(
        DATABASE_URL=pg.url, REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0",
        MODEL=str(model_dir), MODELS_DIR=str(root / "models"), DEVICE="cpu", DTYPE="float32",
        EDIT_CONFIG=json.dumps(EDIT_CONFIG),
        EVALUATE_ON_APPLY="false", LEASE_TTL_S="3", POLL_INTERVAL_S="0.2", BATCH_WAIT_MS="200",
        CHECKPOINT_STORAGE="database", MAX_QUEUE=str(args.max_queue), RESTORE_WAIT_S="20", PYTHONUNBUFFERED="1",
    )
    fleet = Fleet(env, logs, root / "machines")
    try:
        run(args, root, model_dir, pg, env, fleet)
    finally:  # whatever failed: no process, cluster or directory of this run is left behind
        fleet.stop_all()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path, model_dir: Path, pg: Postgres, env: dict[str, str], fleet: Fleet) -> None:
    fleet.start_redis()
    subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=REPO, env={**env, "DATA_DIR": str(root / "migrate")},
                   check=True)
    for name in fleet.specs:
        fleet.start(name)
    for port in API_PORTS:
        deadline = time.monotonic() + 900  # two cores shared with other jobs: starts are slow
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"API on {port} never ready"
            time.sleep(0.5)
    log(f"fleet ready; {args.edits} edits, {args.restores} restores, a kill every ~{args.kill_every} s")

    load = Load(args.edits, args.restores, args.seed)
    stop, events = threading.Event(), []
    killer = threading.Thread(
        target=chaos, args=(fleet, pg, stop, args.kill_every, random.Random(args.seed), events, args.min_uptime,
              args.chaos_seconds),
        daemon=True,
    )
    began = time.time()
    killer.start()
    try:
        load.run()
    except BaseException:
        stop.set()
        raise
    sent_s = time.time() - began
    log(f"all {len(load.accepted)} edits accepted in {sent_s:.0f} s")
    killer.join()  # the chaos runs its course (it also hits the draining)
    fleet.restart_dead()
    log("chaos over; draining")

    engine = make_engine(pg.url)
    sessions = make_sessionmaker(engine)
    deadline = time.monotonic() + 600
    while True:
        try:
            with sessions() as session:
                depth = crud.queue_depth(session)
                restores_waiting = crud.first_queued_restore(session) is not None
        except OperationalError:  # PostgreSQL restarting
            depth, restores_waiting = -1, True
        if not depth and not restores_waiting:
            break
        assert time.monotonic() < deadline, f"{depth} edits still waiting"
        time.sleep(1)
    drained_s = time.time() - began
    log(f"queue drained after {drained_s:.0f} s")

    with sessions() as session:
        report = audit(session, root / "auditor")  # no local files: it reads the database's
        rows = {e.id: e for e in session.query(Edit)}
        keys = {e.idempotency_key for e in rows.values()}
        head = crud.current_version(session)
        prompts = [rows[i].request["prompt"] for i in sorted(rows)[-8:]]
        in_head = crud.state_versions(session, head.id)
        log_edits = [rows[i].request for i in sorted(rows) if rows[i].version_id in in_head]
    engine.dispose()
    accepted_ids = set(load.accepted.values())
    lost = sorted(i for i in accepted_ids if rows[i].status != "applied")
    unknown = sorted(i for i, e in rows.items() if e.idempotency_key not in load.accepted)

    service_texts = []
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORTS[0]}", timeout=60) as client:
        for prompt in prompts:
            answer = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 6}).json()
            service_texts.append(answer["text"])
            assert answer["version"] == head.id
    fleet.stop_all()
    fresh_dir = root / "replica"  # an empty local store: the head comes from the database
    replayed = replay(model_dir, root / "models", pg.url, fresh_dir, prompts)

    five_xx = {code: n for code, n in load.codes.items() if code >= 500 and code != 503}
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/fault_injection.py", *sys.argv[1:]]),
        "config": {"edits": args.edits, "restores": args.restores, "kill_every_s": args.kill_every, "min_uptime_s": args.min_uptime,
                   "chaos_s": args.chaos_seconds, "max_queue": args.max_queue,
                   "seed": args.seed, "model": TINY, "edit_config": EDIT_CONFIG,
                   "service": {k: env[k] for k in ("DTYPE", "LEASE_TTL_S", "POLL_INTERVAL_S", "BATCH_WAIT_MS",
                                                   "CHECKPOINT_STORAGE", "MAX_QUEUE", "EVALUATE_ON_APPLY")},
                   "processes": sorted(fleet.specs) + ["redis-server", "postgres 15 (own cluster)"]},
        "faults": [{"t_s": round(t - began, 1), "what": what} for t, what in events],
        "seconds": {"sending": round(sent_s, 1), "until_drained": round(drained_s, 1)},
        "client": {"accepted": len(load.accepted), "status_codes": dict(sorted(load.codes.items())),
                   "transport_errors": dict(load.errors), "restores": load.restores,
                   "post_edits_accepted_ms": {"n": len(load.post_ms)} | _quantiles(load.post_ms)},
        "audit": report,
        "checks": {
            "audit_ok": report["ok"],
            "accepted_not_applied": lost,
            "edits_nobody_sent": unknown,
            "one_row_per_key": len(keys) == len(rows),
            "stored_head_holds_the_log": replayed["stored"]["edits"] == log_edits,
            "stored_head_generations_match_service": replayed["stored"]["texts"] == service_texts,
            "retrained_sha256_matches_head": replayed["retrained"]["sha256"] == replayed["stored"]["sha256"],
            "retrained_generations_match_service": replayed["retrained"]["texts"] == service_texts,
            "five_xx_other_than_503": five_xx,
        },
        "head": {"version": head.id, "sha256": head.checkpoint_sha256, "edit_count": head.edit_count},
        "replay": replayed,
        "service_generations": service_texts,
    }
    result["ok"] = (report["ok"] and not lost and not unknown and result["checks"]["one_row_per_key"]
                    and result["checks"]["stored_head_holds_the_log"]
                    and result["checks"]["stored_head_generations_match_service"]
                    and result["checks"]["retrained_sha256_matches_head"]
                    and result["checks"]["retrained_generations_match_service"] and not five_xx)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=2, default=str))
    log(f"ok={result['ok']} checks={json.dumps(result['checks'])}")


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0)}


if __name__ == "__main__":
    main()
