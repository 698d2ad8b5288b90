"""Twenty API clients at once: every job completes, one generation at a time, each sees its place in line."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.utils import Status

from ui.server import launch_app

CLIENTS = 20
# One torch thread: with two, on a 2-core machine where the server's and the clients' threads also want
# the cores, every op of the tiny model waits for the second OpenMP thread (the test took 125 s in a
# full run on an AVX2-only 2-core CPU against 10-13 s alone); it checks the queue, not the kernels.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def url(tiny_session):
    running = launch_app(tiny_session, quiet=True)
    yield running.local_url
    running.close()


def _client(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False)


def _watch(job, seen: list, stop: threading.Event) -> None:
    """Record every (code, rank) the client reports until its job is done."""
    while not job.done() and not stop.is_set():
        status = job.status()
        seen.append((status.code, status.rank, status.queue_size))
        time.sleep(0.05)  # 20 watchers polling every 5 ms also compete with the generations for the GIL


def test_twenty_clients_queue_up_and_never_overlap(tiny_session, url):
    unet = tiny_session.warm.pipe.unet
    active, peak, lock = [0], [0], threading.Lock()

    def enter(_module, _args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def leave(_module, _args, _out):
        with lock:
            active[0] -= 1

    hooks = [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave)]
    stop_watching = threading.Event()
    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = list(pool.map(lambda _: _client(url), range(CLIENTS + 1)))
    blocker_client, clients = clients[0], clients[1:]
    try:
        # A long job holds the GPU first, so all twenty wait in line for a while and can see their rank.
        blocker = blocker_client.submit("hold", "", 0, 200, 5.0, 128, 128, "Euler", 1, api_name="/generate")
        deadline = time.time() + 60
        while time.time() < deadline and not tiny_session.status()["busy"]:
            time.sleep(0.02)
        jobs = [c.submit(f"job {i}", "", 1000 + i, 2, 5.0, 128, 128, "Euler", 1, api_name="/generate")
                for i, c in enumerate(clients)]
        seen: list[list] = [[] for _ in jobs]
        watchers = [threading.Thread(target=_watch, args=(job, log, stop_watching), daemon=True)
                    for job, log in zip(jobs, seen)]
        for w in watchers:
            w.start()
        deadline = time.time() + 30
        while time.time() < deadline and blocker_client.predict(api_name="/status")["queued"] < CLIENTS:
            time.sleep(0.05)
        assert blocker_client.predict(api_name="/status")["queued"] == CLIENTS  # shown in the status line too
        time.sleep(0.3)  # let every client receive its estimation message
        assert blocker_client.predict(api_name="/stop").startswith("⏹")
        assert blocker.result(timeout=60)[2].startswith("**Stopped**")
        results = [job.result(timeout=120) for job in jobs]
    finally:
        stop_watching.set()
        for h in hooks:
            h.remove()
    assert [r[1] for r in results] == [f"Seeds: {1000 + i}" for i in range(CLIENTS)]  # every job completed
    assert peak[0] == 1  # never two UNet forwards at once
    ranks = [{rank for code, rank, _ in log if code == Status.IN_QUEUE and rank is not None} for log in seen]
    assert all(ranks), f"clients that never saw a queue position: {[i for i, r in enumerate(ranks) if not r]}"
    assert max(max(r) for r in ranks) >= CLIENTS - 2  # the last ones saw they were far back
    status = tiny_session.status()
    assert status["busy"] is False and status["waiting"] == 0
