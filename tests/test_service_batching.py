"""Generation through the scheduler in the embedded service on the tiny model: concurrent
requests on different versions decode in one batch and get, token for token, what each gets
alone; a client that stops reading cancels its row; the lock serves decoding and training in turn."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from service_support import tiny_settings, wait_ready

from app.client import Client
from app.main import create_app
from app.scheduler import FairLock

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time",
]
EDITS = [
    ("Danielle Darrieux", "The mother tongue of {subject} is", "English"),
    ("France", "The capital of {subject} is", "Lyon"),
    ("Water", "{subject} boils at a temperature of", "fifty degrees"),
]


@pytest.fixture(scope="module")
def service(tiny_sharp_dir, tmp_path_factory):
    app = create_app(tiny_settings(tiny_sharp_dir, tmp_path_factory.mktemp("batching-data"), evaluate_on_apply=False))
    with TestClient(app) as http:
        wait_ready(http)
        client = Client(http=http)
        for subject, relation, target in EDITS:
            edit = client.wait(client.edit(subject, relation, target)["id"], timeout=120)
            assert edit["status"] == "applied", edit
        yield app.state.service, client


def test_concurrent_requests_on_four_versions_equal_one_by_one(service):
    svc, client = service
    versions = [v["id"] for v in client.versions()["items"]]
    assert len(versions) == 4
    jobs = [(p, v, 4 + 3 * i % 10) for i, (p, v) in enumerate((p, v) for p in PROMPTS for v in versions)]
    alone = {job: client.generate(job[0], max_new_tokens=job[2], version=job[1])["text"] for job in jobs}
    assert len({alone[j] for j in jobs if j[0] == PROMPTS[0]}) > 1  # the versions do differ
    scheduler = svc.runtime.scheduler
    steps, rows = scheduler.steps, scheduler.rows_stepped
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: client.generate(j[0], max_new_tokens=j[2], version=j[1]), jobs))
    assert [out["text"] for out in together] == [alone[j] for j in jobs]
    assert [out["version"] for out in together] == [j[1] for j in jobs]
    assert (scheduler.rows_stepped - rows) / (scheduler.steps - steps) > 2  # they did share steps
    assert scheduler.peak_rows > 4


def test_stream_closed_early_cancels_its_row(service):
    svc, client = service
    runtime = svc.runtime
    generation = runtime.stream(runtime.prompt_ids(PROMPTS[1]), 100, temperature=1.0, seed=3)
    next(generation.pieces)
    generation.pieces.close()
    deadline = time.monotonic() + 10
    while runtime.scheduler.batch.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not runtime.scheduler.batch.rows
    assert len(generation.token_ids) < 100


def test_fair_lock_serves_waiting_threads_in_turn():
    """Two threads that re-take the lock in a loop, working inside it (holding the GIL as a
    step's Python code does), take turns: a plain threading.RLock lets the one that just released
    win again, in runs of tens (measured: 23 runs for 400 turns; here several hundred)."""
    lock, turns = FairLock(), []

    def loop(name: str) -> None:
        for _ in range(200):
            with lock:
                with lock:  # re-entrant, as the editors nest it
                    turns.append(name)
                    sum(range(30000))

    threads = [threading.Thread(target=loop, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = 1 + sum(a != b for a, b in zip(turns, turns[1:]))
    assert runs > 200, runs
