"""Provisioning and mutual TLS against a real aggregator server on 127.0.0.1 (port 0)."""

import datetime as dt
import os
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest

from aggregator.server import AggregatorCore, run_server, server_credentials
from crypto import pki
from fedbrats import wire
from fedbrats.config import load_config, with_overrides
from fedbrats.errors import ConfigError, FedbratsError
from fedbrats.provision import provision

FED = "mtls-fed"
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def fed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "federation"
    provision(out, federation=FED, sites=SITES, aggregator="127.0.0.1:0", localhost=True)
    return out


def _model():
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}


@pytest.fixture
def server(fed_dir, tmp_path):
    cfg = load_config(fed_dir / "aggregator" / "aggregator.toml")
    cfg = with_overrides(cfg, aggregator={"out_dir": str(tmp_path), "revoked_sites": ["site-3"]},
                         federation={"sites": 2, "min_sites": 2, "rounds": 1,
                                     "secure_aggregation": "none"})
    core = AggregatorCore(cfg, _model(),
                          save_model=lambda p, t, r: np.savez(p.with_suffix(".npz"), **t))
    with run_server(core, "127.0.0.1", 0, credentials=server_credentials(cfg)) as port:
        yield core, f"127.0.0.1:{port}"


def _channel(addr, kit: Path | None, site: str | None, ca: Path):
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=(kit / f"{site}.key").read_bytes() if kit else None,
        certificate_chain=(kit / f"{site}.crt").read_bytes() if kit else None)
    return grpc.secure_channel(addr, creds)


def _join(stub, site):
    return stub.Join(wire.join_request(wire.Envelope(FED, site, 0, "joining"),
                                       wire.JoinInfo(5, 1, "cpu")), timeout=10)


def test_client_without_certificate_cannot_connect(server, fed_dir):
    _, addr = server
    with _channel(addr, None, None, fed_dir / "ca" / "ca.crt") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            _join(wire.aggregator_stub(ch), "site-1")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_connect(server):
    _, addr = server
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            _join(wire.aggregator_stub(ch), "site-1")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(server, fed_dir, tmp_path):
    _, addr = server
    rogue = tmp_path / "rogue"
    provision(rogue, federation=FED, sites=["site-1", "site-2"], aggregator="127.0.0.1:0",
              localhost=True)
    # Trusts the real CA for the server, but presents a site-1 certificate from a rogue CA.
    with _channel(addr, rogue / "site-1", "site-1", fed_dir / "ca" / "ca.crt") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            _join(wire.aggregator_stub(ch), "site-1")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_site_cannot_act_as_another_site(server, fed_dir):
    _, addr = server
    with _channel(addr, fed_dir / "site-1", "site-1", fed_dir / "ca" / "ca.crt") as ch:
        stub = wire.aggregator_stub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            _join(stub, "site-2")
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "site-1" in ei.value.details() and "site-2" in ei.value.details()
        assert _join(stub, "site-1").accepted
        meta = wire.UpdateMetadata(5, 1, 0.1, b"\0" * 32)
        with pytest.raises(grpc.RpcError) as ei:
            stub.SubmitUpdate(wire.update_stream(wire.Envelope(FED, "site-2", 1, "training"),
                                                 meta, wire.pack_tensors(_model())), timeout=10)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_site_is_refused(server, fed_dir):
    _, addr = server
    with _channel(addr, fed_dir / "site-3", "site-3", fed_dir / "ca" / "ca.crt") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            _join(wire.aggregator_stub(ch), "site-3")
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in ei.value.details()


def test_valid_sites_complete_a_round_over_mtls(server, fed_dir):
    core, addr = server
    chans = {s: _channel(addr, fed_dir / s, s, fed_dir / "ca" / "ca.crt") for s in SITES[:2]}
    try:
        stubs = {s: wire.aggregator_stub(c) for s, c in chans.items()}
        for s, stub in stubs.items():
            assert _join(stub, s).accepted
        for s, stub in stubs.items():
            t = wire.decode_task_response(stub.GetTask(
                wire.task_request(wire.Envelope(FED, s), 0, 5000), timeout=10))
            assert t.stage == "training"
            delta = {"w": np.full((3, 4), 1.0 if s == "site-1" else 3.0, np.float32)}
            reply = stub.SubmitUpdate(wire.update_stream(
                wire.Envelope(FED, s, 1, "training"), wire.UpdateMetadata(5, 1, 0.1, t.model_sha256),
                wire.pack_tensors(delta)), timeout=10)
            assert reply.accepted
        payload = wire.receive_model(stubs["site-1"].FetchResult(
            wire.fetch_result_request(wire.Envelope(FED, "site-1", 1, "result")), timeout=10))
        np.testing.assert_allclose(wire.unpack_tensors(payload)["w"], _model()["w"] + 2.0)
        assert core.state.completed_round == 1
    finally:
        for c in chans.values():
            c.close()


def _private_keys(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_kits_hold_only_their_own_secrets(fed_dir):
    agg = fed_dir / "aggregator"
    assert [p.name for p in _private_keys(agg)] == ["aggregator.key"]
    assert sorted(p.name for p in (agg / "identities").iterdir()) == [f"{s}.pub" for s in SITES]
    for site in SITES:
        kit = fed_dir / site
        assert sorted(p.name for p in _private_keys(kit)) == sorted([f"{site}.key", "identity.key"])
        # No other site's material at all.
        for other in SITES:
            if other != site:
                assert not list(kit.glob(f"*{other}*"))
        assert pki.cert_common_name((kit / f"{site}.crt").read_bytes()) == site
        # Every site's identity *public* key, nothing else, to verify key advertisements.
        assert sorted(p.name for p in (kit / "identities").iterdir()) == [f"{s}.pub" for s in SITES]
        assert all(b"PUBLIC KEY" in p.read_bytes() for p in (kit / "identities").iterdir())
        # identity.pub in the kit is the public half the aggregator holds.
        assert (kit / "identity.pub").read_bytes() == (agg / "identities" / f"{site}.pub").read_bytes()
    for key in _private_keys(fed_dir):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    # CKKS: every site holds the shared secret context (0600); the aggregator a public one.
    from crypto import ckks

    ckks.load_context((agg / "ckks-public.ctx").read_bytes(), expect_secret=False)  # no key
    for site in SITES:
        sec = fed_dir / site / "ckks-secret.ctx"
        assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
        ckks.load_context(sec.read_bytes(), expect_secret=True)
        assert not (fed_dir / site / "ckks-public.ctx").exists()
    assert not (agg / "ckks-secret.ctx").exists()
    with pytest.raises(FedbratsError):
        ckks.load_context((fed_dir / "site-1" / "ckks-secret.ctx").read_bytes(),
                          expect_secret=False)


def test_kit_configs_load_and_reference_their_own_files(fed_dir):
    s1 = load_config(fed_dir / "site-1" / "site-1.toml")
    assert s1.node.site_id == "site-1" and s1.federation.name == FED
    assert Path(s1.tls.key) == (fed_dir / "site-1" / "site-1.key").resolve()
    assert Path(s1.node.identity_key) == (fed_dir / "site-1" / "identity.key").resolve()
    agg = load_config(fed_dir / "aggregator" / "aggregator.toml")
    assert agg.aggregator.allowed_sites == tuple(SITES)
    assert Path(agg.tls.key).parent == (fed_dir / "aggregator").resolve()


def test_provision_refuses_to_overwrite_and_checks_arguments(fed_dir, tmp_path):
    with pytest.raises(FedbratsError, match="refusing to overwrite"):
        provision(fed_dir, federation=FED, sites=SITES, aggregator="127.0.0.1:0")
    with pytest.raises(ConfigError) as ei:
        provision(tmp_path / "x", federation="", sites=["ok", "aggregator", "bad id"],
                  aggregator="nohost")
    msg = str(ei.value)
    for part in ("--federation", "'aggregator'", "'bad id'", "HOST:PORT"):
        assert part in msg
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FedbratsError, match="not a fedbrats federation"):
        provision(other, federation=FED, sites=SITES, aggregator="h:1", force=True)
    assert (other / "keep.txt").exists()


def test_server_certificate_names_the_given_host(tmp_path):
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    m = provision(tmp_path / "f", federation="f", sites=["a", "b"], aggregator="agg.example.org:443",
                  now=now)
    assert m["aggregator"]["hosts"] == ["agg.example.org"]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "f" / "aggregator" / "aggregator.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "agg.example.org" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" not in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def test_provision_validates_every_party_config_before_writing_anything(tmp_path):
    from fedbrats.config import Config

    out = tmp_path / "fed"
    with pytest.raises(ConfigError, match="needs at least 2 sites"):
        provision(out, federation="f", sites=["site-1"], aggregator="h:1", base=Config())
    assert not out.exists()  # no half-written federation to block the retry
    with pytest.raises(ConfigError, match="not a host name"):
        provision(out, federation="f", sites=["a", "b"], aggregator="https://h:1")
    with pytest.raises(ConfigError, match="'ca'"):
        provision(out, federation="f", sites=["ca", "b"], aggregator="h:1")
    assert not out.exists()
