"""The night lease: of two takers exactly one gets it; the other sees who holds it; an expired lease is
taken over; a holder that lost its lease can neither renew nor release it. Locally and on a real S3
server."""

from __future__ import annotations

import json
import threading
import time

import pytest

from jobs.lease import Lease


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "leases" / "night.json")
    return request.getfixturevalue("s3_bucket") + "/leases/night.json"


def test_one_taker_wins_and_the_other_sees_the_holder(lease_uri):
    a, b = Lease(lease_uri, "job-a", ttl_s=60), Lease(lease_uri, "job-b", ttl_s=60)
    assert a.acquire() is None
    held = b.acquire()
    assert held["holder"] == "job-a" and held["expires_at"] > time.time()
    assert a.renew() and not b.renew()
    b.release()  # not its lease: nothing happens
    assert Lease(lease_uri, "job-c", ttl_s=60).acquire()["holder"] == "job-a"
    a.release()
    assert b.acquire() is None


def test_an_expired_lease_is_taken_over_and_its_old_holder_loses_it(lease_uri):
    a, b = Lease(lease_uri, "job-a", ttl_s=0.5), Lease(lease_uri, "job-b", ttl_s=60)
    assert a.acquire() is None
    time.sleep(0.6)
    assert b.acquire() is None  # a crashed night blocks the next one for at most ttl_s
    assert not a.renew()
    a.release()
    assert Lease(lease_uri, "job-c", ttl_s=60).acquire()["holder"] == "job-b"


def test_racing_takers_of_a_free_lease_get_it_exactly_once(lease_uri):
    takers = [Lease(lease_uri, f"job-{i}", ttl_s=60) for i in range(6)]
    results, start = {}, threading.Barrier(len(takers))

    def take(lease):
        start.wait()
        results[lease.holder] = lease.acquire()

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [h for h, held in results.items() if held is None]
    assert len(winners) == 1
    assert all(held["holder"] == winners[0] for held in results.values() if held is not None)


def test_renewing_pushes_the_expiry_out_while_the_night_runs(lease_uri):
    a = Lease(lease_uri, "job-a", ttl_s=2.0)
    assert a.acquire() is None
    with a.renewing(every_s=0.2):  # a renewal may be up to 1.8 s late before the lease lapses
        time.sleep(3.0)  # longer than ttl_s: without renewals job-b would take it over
        assert Lease(lease_uri, "job-b", ttl_s=60).acquire()["holder"] == "job-a"
    a.release()


def test_the_holder_is_named_by_the_ray_job_submission_id(monkeypatch):
    """Ray gives a submitted driver its submission id only in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    from jobs.lease import holder_name

    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}))
    assert holder_name().startswith("raysubmit_abc@")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert "@" not in holder_name()


def test_a_taker_reading_while_the_holder_renews_sees_the_holder(lease_uri):
    """The lease is rewritten between the reader's HEAD and GET (s3fs reads If-Match the ETag it saw
    first, so the GET finds another version): the reader reads again, never fails."""
    a = Lease(lease_uri, "job-a", ttl_s=60)
    assert a.acquire() is None
    stop = threading.Event()

    def renew_nonstop():
        while not stop.is_set():
            assert a.renew()

    renewer = threading.Thread(target=renew_nonstop)
    renewer.start()
    try:
        holders = [Lease(lease_uri, "job-b", ttl_s=60).acquire()["holder"] for _ in range(60)]
    finally:
        stop.set()
        renewer.join()
    assert holders == ["job-a"] * 60
