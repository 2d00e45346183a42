"""Homomorphic aggregation with CKKS over real gRPC (mutual TLS, real TenSEAL).

Sites run the real node protocol loop with fixed updates; the aggregator holds the public
context from provisioning and only adds.  Each site decrypts the aggregate and must find the
plaintext FedAvg within 1e-4; the aggregator cannot decrypt; a site with another federation's
context is refused.
"""

import numpy as np
import pytest
from federation_harness import SHAPES, federate, model

from crypto import ckks
from fedbrats.errors import FedbratsError
from fedbrats.provision import provision

FED = "ckks-fed"
SITES = [f"site-{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckks") / "federation"
    provision(out, federation=FED, sites=SITES, aggregator="127.0.0.1:0", localhost=True)
    return out


def test_sites_decrypt_plaintext_fedavg_and_the_aggregator_sees_only_ciphertexts(kits, tmp_path):
    record = []
    core, workers, deltas, weights, codes, errors = federate(
        kits, tmp_path, SITES, fed_name=FED, mode="ckks", record=record)
    assert errors == {} and set(codes.values()) == {0}, errors
    w = sum(weights.values())
    expected = {k: model()[k] + sum(weights[s] * deltas[s][k] for s in SITES) / w for k in SHAPES}
    for s in SITES:
        for k in SHAPES:
            np.testing.assert_allclose(workers[s].results[1][k], expected[k], atol=1e-4)
    # What the aggregator received: ciphertext chunks only, no plaintext weight anywhere.
    received = [msg for _, stage, msg in record]
    assert len(received) == len(SITES)
    for msg in received:
        assert all(name.startswith("ct.") and t.dtype == np.uint8 for name, t in msg.items())
    # The aggregator's context cannot decrypt the aggregate it computed.
    agg_ctx = core._sum.ctx
    aggregate = core._result_payloads[1]
    from aggregator.ckks import tensors_to_chunks
    from fedbrats import wire

    chunks = tensors_to_chunks(wire.unpack_tensors(aggregate), "aggregate")
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    with pytest.raises(FedbratsError):
        ckks.decrypt_aggregate(chunks, agg_ctx, n)


def test_site_with_another_federations_context_is_refused(kits, tmp_path):
    rogue = tmp_path / "rogue"
    provision(rogue, federation=FED, sites=SITES, aggregator="127.0.0.1:0", localhost=True)
    core, workers, deltas, weights, codes, errors = federate(
        kits, tmp_path, SITES[:3], fed_name=FED, mode="ckks",
        site_ckks={"site-2": {"context": str(rogue / "site-2" / "ckks-secret.ctx")}})
    # site-2's update (fingerprint mismatch) is refused by name; it leaves with an error.
    assert "site-2" in errors and "INVALID_ARGUMENT" in str(errors["site-2"])
    assert "site-2" in str(errors["site-2"])
    # The others complete the round without it (min_sites 2 at the deadline).
    assert core.state.completed_round == 1 and not core.state.failed
    two = ["site-1", "site-3"]
    w = sum(weights[s] for s in two)
    expected = {k: model()[k] + sum(weights[s] * deltas[s][k] for s in two) / w for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(workers["site-1"].results[1][k], expected[k], atol=1e-4)


def test_site_refusing_a_non_finite_update_withdraws_and_the_round_goes_on(kits, tmp_path):
    import json

    rng = np.random.default_rng(3)
    deltas = {s: {k: rng.uniform(-0.2, 0.2, v).astype(np.float32) for k, v in SHAPES.items()}
              for s in SITES}
    first = next(iter(SHAPES))
    deltas["site-2"][first].flat[0] = np.nan  # case K10 under CKKS: the site refuses to encrypt
    core, workers, deltas, weights, codes, errors = federate(
        kits, tmp_path, SITES, fed_name=FED, mode="ckks", deltas=deltas, rounds=1)
    assert set(errors) == {"site-2"} and "non-finite" in str(errors["site-2"])
    assert all(codes[s] == 0 for s in SITES if s != "site-2")
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    withdrew = [e for e in events if e["event"] == "site_withdrew"]
    assert len(withdrew) == 1 and withdrew[0]["site"] == "site-2" and withdrew[0]["round"] == 1
    assert "non-finite" in withdrew[0]["reason"]
    agg = [e for e in events if e["event"] == "round_aggregated"]
    assert agg and agg[0]["sites"] == [s for s in SITES if s != "site-2"]
    # the survivors decrypted the FedAvg of the four finite updates
    total = sum(weights[s] for s in SITES if s != "site-2")
    for k in SHAPES:
        want = sum(weights[s] * deltas[s][k].astype(np.float64) for s in SITES if s != "site-2") / total
        got = workers["site-1"].results[1][k] - model()[k]
        assert np.max(np.abs(got - want)) < 1e-4
