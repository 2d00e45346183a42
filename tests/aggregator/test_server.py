"""A real aggregator gRPC server on 127.0.0.1 (port 0), driven by real gRPC clients.

The clients here play the node's side of the protocol with hand-made updates, so the
aggregator's checks (federation, round, stage, duplicates, non-finite values, chunking) are
exercised without training a network.  ``tests/test_simulate.py`` runs the real node daemons.
"""

import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.server import AggregatorCore, run_server
from fedbrats import wire
from fedbrats.config import Config, with_overrides

FED = "test-fed"


def _cfg(tmp_path, **fed):
    return with_overrides(Config(), federation={"name": FED, "sites": 2, "min_sites": 2,
                                                "rounds": 2, "secure_aggregation": "none", **fed},
                          aggregator={"out_dir": str(tmp_path)}, training={"local_steps": 3})


def _npz_saver(path, tensors, rnd):
    np.savez(path.with_suffix(".npz"), **tensors)


@pytest.fixture
def served(tmp_path):
    def start(model, **fed):
        core = AggregatorCore(_cfg(tmp_path, **fed), model, save_model=_npz_saver)
        ctx = run_server(core)
        port = ctx.__enter__()
        started.append(ctx)
        # Default channel options: gRPC's 4 MiB receive limit applies.
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return core, wire.aggregator_stub(channel), channel

    started, channels = [], []
    yield start
    for c in channels:
        c.close()
    for ctx in started:
        ctx.__exit__(None, None, None)


def env(site, rnd=0, stage="unspecified", fed=FED):
    return wire.Envelope(fed, site, rnd, stage)


def join(stub, site, n=10):
    return wire.decode_join_response(
        stub.Join(wire.join_request(env(site, stage="joining"), wire.JoinInfo(n, 2, "cpu"))))


def task(stub, site, last=0, wait_ms=5000):
    return wire.decode_task_response(stub.GetTask(wire.task_request(env(site), last, wait_ms)))


def submit(stub, site, rnd, delta, base_sha, n=10):
    meta = wire.UpdateMetadata(n, 3, 0.5, base_sha)
    return wire.decode_submit_response(stub.SubmitUpdate(
        wire.update_stream(env(site, rnd, "training"), meta, wire.pack_tensors(delta))))


def small_model():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=(4,)).astype(np.float32)}


def test_two_sites_complete_a_round_with_weighted_fedavg(served, tmp_path):
    model = small_model()
    core, stub, channel = served(model, rounds=1)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert join(stub, "site-1", 10).accepted
    assert join(stub, "site-2", 30).accepted
    t = task(stub, "site-1")
    assert (t.stage, t.round, t.local_steps) == ("training", 1, 3)
    got = wire.unpack_tensors(wire.receive_model(stub.FetchModel(
        wire.fetch_model_request(env("site-1", 1, "training")))))
    for k in model:
        np.testing.assert_array_equal(got[k], model[k])
    rng = np.random.default_rng(1)
    d1 = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}
    d2 = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}
    assert submit(stub, "site-1", 1, d1, t.model_sha256, 10).accepted
    again = submit(stub, "site-1", 1, d1, t.model_sha256, 10)
    assert again.accepted and again.duplicate  # resubmission counts once
    assert submit(stub, "site-2", 1, d2, t.model_sha256, 30).accepted
    r = task(stub, "site-2")
    assert (r.stage, r.round) == ("result", 1)
    result = wire.unpack_tensors(wire.receive_model(stub.FetchResult(
        wire.fetch_result_request(env("site-2", 1, "result")))))
    for k in model:
        expect = model[k] + (10 * d1[k] + 30 * d2[k]) / 40
        np.testing.assert_allclose(result[k], expect, atol=1e-6)
    for site in ("site-1", "site-2"):
        stub.ReportMetrics(wire.metrics_request(env(site, 1, "result"), wire.MetricsReport(
            dice={"wt": 0.9, "tc": 0.8, "et": 0.7, "mean": 0.8}, num_val_cases=2)))
    d = task(stub, "site-1", last=1)
    assert d.stage == "done" and not d.failed
    assert core.finished.is_set()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {(x["round"], x["site"]) for x in lines} == {(1, "site-1"), (1, "site-2")}
    assert (tmp_path / "checkpoints" / "round-0001.npz").exists()


def test_payload_over_4_mib_streams_with_default_channel_options(served):
    big = {"w": np.random.default_rng(0).normal(size=(6 * 1024 * 1024,)).astype(np.float32)}
    assert wire.pack_tensors(big).info.total_bytes == 24 * 1024 * 1024
    core, stub, _ = served(big)
    join(stub, "site-1")
    join(stub, "site-2")
    t = task(stub, "site-1")
    payload = wire.receive_model(stub.FetchModel(
        wire.fetch_model_request(env("site-1", 1, "training"))))
    assert payload.info.sha256 == t.model_sha256 and payload.num_chunks == 24
    np.testing.assert_array_equal(wire.unpack_tensors(payload)["w"], big["w"])
    delta = {"w": np.ones_like(big["w"])}
    assert submit(stub, "site-1", 1, delta, t.model_sha256).accepted
    assert core.state.submitted == ("site-1",)


def test_wrong_federation_unknown_site_stale_round_are_refused_by_name(served):
    model = small_model()
    _, stub, _ = served(model)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Join(wire.join_request(env("site-1", fed="other-fed"), wire.JoinInfo(1, 1, "cpu")))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "other-fed" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        task(stub, "site-9")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "site-9" in ei.value.details()
    join(stub, "site-1")
    join(stub, "site-2")
    t = task(stub, "site-1")
    zero = {k: np.zeros_like(v) for k, v in model.items()}
    with pytest.raises(grpc.RpcError) as ei:
        submit(stub, "site-1", 0, zero, t.model_sha256)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale round 0" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        submit(stub, "site-1", 1, zero, b"\0" * 32)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another global model" in ei.value.details()


def test_non_finite_update_is_excluded_naming_site_and_tensor(served):
    model = small_model()
    core, stub, _ = served(model, min_sites=1)
    join(stub, "site-1")
    join(stub, "site-2")
    t = task(stub, "site-2")
    bad = {k: np.zeros_like(v) for k, v in model.items()}
    bad["conv.bias"][1] = np.inf
    bad["conv.weight"][0, 0, 0] = np.nan
    with pytest.raises(grpc.RpcError) as ei:
        submit(stub, "site-2", 1, bad, t.model_sha256)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "site-2" in ei.value.details() and "conv.bias" in ei.value.details()
    assert "conv.weight" in ei.value.details()  # every bad tensor is named, not just the first
    assert core.state.submitted == ()
    # The round does not wait for the excluded site: site-1's update closes it at once.
    assert core.state.expected == ("site-1",)
    assert submit(stub, "site-1", 1, {k: np.zeros_like(v) for k, v in model.items()},
                  t.model_sha256).accepted
    assert core.state.completed_round == 1


def test_record_dir_keeps_exactly_what_the_aggregator_received(tmp_path):
    model = small_model()
    cfg = with_overrides(_cfg(tmp_path), aggregator={"record_dir": str(tmp_path / "rec")})
    core = AggregatorCore(cfg, model, save_model=_npz_saver)
    with run_server(core) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = wire.aggregator_stub(ch)
        join(stub, "site-1")
        join(stub, "site-2")
        t = task(stub, "site-1")
        delta = {k: np.full_like(v, 0.5) for k, v in model.items()}
        submit(stub, "site-1", 1, delta, t.model_sha256)
    saved = np.load(tmp_path / "rec" / "round-0001" / "site-1-training.npz")
    for k in model:
        np.testing.assert_array_equal(saved[k], delta[k])


def test_second_aggregator_on_the_same_port_fails_clearly(tmp_path):
    from fedbrats.errors import FedbratsError

    a = AggregatorCore(_cfg(tmp_path / "a"), small_model(), save_model=_npz_saver)
    b = AggregatorCore(_cfg(tmp_path / "b"), small_model(), save_model=_npz_saver)
    with run_server(a) as port:
        with pytest.raises(FedbratsError, match=f"cannot listen on 127.0.0.1:{port}"):
            with run_server(b, port=port):
                pass


def test_join_refuses_a_site_configured_for_another_mode_or_model(served):
    model = small_model()
    _, stub, _ = served(model)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Join(wire.join_request(env("site-1", stage="joining"),
                                    wire.JoinInfo(5, 1, "cpu", "mask")))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'mask'" in ei.value.details() and "'none'" in ei.value.details()
    other = {"conv.weight": np.zeros((16, 3, 3), np.float32), "conv.bias": np.zeros(16, np.float32)}
    with pytest.raises(grpc.RpcError) as ei:
        stub.Join(wire.join_request(env("site-1", stage="joining"),
                                    wire.JoinInfo(5, 1, "cpu", "none", wire.model_signature(other))))
    assert "different network" in ei.value.details()
    ok = wire.JoinInfo(5, 1, "cpu", "none", wire.model_signature(model))
    assert wire.decode_join_response(stub.Join(wire.join_request(env("site-1", stage="joining"), ok))).accepted


def test_overflowing_fedavg_aborts_the_round_and_keeps_the_model_finite():
    from aggregator.aggregate import PlainFedAvg
    from fedbrats.errors import RoundAborted

    agg = PlainFedAvg()
    agg.begin_round(2, {"w": np.full(2, 3e38, np.float32), "b": np.zeros(2, np.float32)})
    agg.add("site-1", 1, {"w": np.full(2, 1e38, np.float32), "b": np.ones(2, np.float32)})
    with pytest.raises(RoundAborted, match=r"round 2: .*non-finite.*tensor\(s\) w;"):
        agg.finalize(("site-1",))


def test_a_site_that_withdraws_is_not_waited_for(served, tmp_path):
    model = small_model()
    core, stub, _ = served(model, sites=3, min_sites=2)
    for s in ("site-1", "site-2", "site-3"):
        join(stub, s)
    t = task(stub, "site-2")
    assert t.stage == "training" and t.round == 1
    reply = stub.Withdraw(wire.withdraw_request(env("site-2", 1, "training"),
                                                "privacy budget: epsilon 9.1 would exceed 8"))
    assert reply.accepted
    assert core.state.expected == ("site-1", "site-3")
    zero = {k: np.zeros_like(v) for k, v in model.items()}
    submit(stub, "site-1", 1, zero, t.model_sha256)
    submit(stub, "site-3", 1, zero, t.model_sha256)
    assert core.state.completed_round == 1  # at once, not at the round deadline
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    w = [e for e in events if e["event"] == "site_withdrew"]
    assert w == [{**w[0], "round": 1, "site": "site-2", "stage": "training",
                  "reason": "privacy budget: epsilon 9.1 would exceed 8"}]
    # a stale withdrawal changes nothing; an over-long reason and an unknown site are refused
    assert not stub.Withdraw(wire.withdraw_request(env("site-1", 1, "training"), "late")).accepted
    long = wire.withdraw_request(env("site-1", 2, "training"), "")
    long.reason = "x" * 5000  # a peer that does not cut its reason
    with pytest.raises(grpc.RpcError) as ei:
        stub.Withdraw(long)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "5000 characters" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        stub.Withdraw(wire.withdraw_request(env("site-9", 2, "training"), "who?"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(wire.withdraw_request(env("site-1"), "y" * 5000).reason) == wire.MAX_REASON_CHARS
