"""``fedbrats provision``: create a federation's PKI and one kit per party (offline, once).

Layout written under ``--out DIR``::

    DIR/federation.json          public manifest: federation, sites, aggregator address,
                                 certificate fingerprints, identity public keys
    DIR/ca/ca.crt, ca.key        the federation CA — keep offline; never copy to a party
    DIR/aggregator/              the aggregator's kit
        aggregator.toml, ca.crt, aggregator.crt, aggregator.key (0600),
        ckks-public.ctx          the CKKS context *without* its secret key (can only add)
        identities/<site>.pub    every site's Ed25519 identity *public* key
    DIR/<site>/                  one kit per site
        <site>.toml, ca.crt, <site>.crt, <site>.key (0600),
        identity.key (0600), identity.pub, ckks-secret.ctx (0600, the shared CKKS secret key),
        identities/<site>.pub    every site's identity *public* key (to verify the other
                                 sites' signed key advertisements in secure aggregation)

Each kit holds only what its party may hold: no site kit contains another site's private key,
and the aggregator kit contains no site private key.  Copy ``DIR/aggregator`` to the aggregator
host and ``DIR/<site>`` to that site; keep ``DIR/ca`` offline (it is needed only to issue
certificates).  The TOML files reference the key material by relative path.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from crypto import pki
from fedbrats.config import Config, _valid_site_id, config_from_dict, to_dict, to_toml
from fedbrats.errors import ConfigError, FedbratsError

MANIFEST = "federation.json"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:PORT``).

    Raises:
        ConfigError: not of that form.
    """
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("--aggregator", [f"expected HOST:PORT, got {address!r}"])
    return host, int(port)


def provision(out: Path, *, federation: str, sites: list[str], aggregator: str,
              base: Config | None = None, localhost: bool = False, force: bool = False,
              days: int = 825, now: dt.datetime | None = None) -> dict:
    """Create the federation's CA, certificates, identity keys and per-party kits.

    Args:
        out: folder to create (see module docstring).
        federation: federation id (``federation.name``).
        sites: site ids; each becomes a certificate CN and a kit.
        aggregator: ``HOST:PORT`` sites connect to; HOST goes into the server certificate.
        base: config whose other sections the party configs start from (default: built-in).
        localhost: also put ``localhost`` and ``127.0.0.1`` in the server certificate.
        force: replace an existing federation in ``out``.
        days: certificate validity, days.
        now: issuance time (tests pin it).

    Returns:
        The manifest written to ``out/federation.json``.

    Raises:
        ConfigError: bad federation name, site ids or address (all listed).
        FedbratsError: ``out`` already holds a federation (or other files) and not ``force``.
    """
    problems = []
    if not federation.strip():
        problems.append("--federation: must not be empty")
    if not sites:
        problems.append("--sites: give at least one site id")
    for s in sites:
        if not _valid_site_id(s):
            problems.append(f"--sites: invalid site id {s!r} (letters, digits, '-', '_', '.', "
                            f"starting with a letter or digit; not 'aggregator', 'ca' or "
                            f"'identities')")
    if len(set(sites)) != len(sites):
        problems.append("--sites: site ids must be unique")
    try:
        host, port = parse_address(aggregator)
    except ConfigError as exc:
        problems.extend(exc.problems)
        host, port = "", 0
    if host and not _valid_host(host):
        problems.append(f"--aggregator: {host!r} is not a host name or IP address (no scheme, "
                        f"spaces or paths: e.g. agg.example.org:50051)")
    if days < 1:
        problems.append(f"--days: certificate validity must be >= 1 day, got {days}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} exists and is not a folder")
    base = base or Config()
    if not problems:
        # Every party's config is validated before anything is written.
        raw = _party_raw(base, federation, sites)
        for site in sites:
            try:
                config_from_dict(_site_raw(raw, site, host, port), source=f"{site}.toml")
            except ConfigError as exc:
                problems.extend(exc.problems)
                break
        try:
            config_from_dict(_aggregator_raw(raw, sites, port), source="aggregator.toml")
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)  # sites said it already
    if problems:
        raise ConfigError("provision arguments", problems)
    if out.exists() and any(out.iterdir()):
        if not force:
            what = "a provisioned federation" if (out / MANIFEST).exists() else "other files"
            raise FedbratsError(f"--out {str(out)!r} already holds {what}; refusing to overwrite "
                                f"it (pass --force to replace a federation)")
        if not (out / MANIFEST).exists():
            raise FedbratsError(f"{out} holds files that are not a fedbrats federation; "
                                f"refusing to delete them even with --force")
        shutil.rmtree(out)
    now = now or dt.datetime.now(dt.timezone.utc)
    out.mkdir(parents=True, exist_ok=True)

    ca = pki.make_ca(federation, now=now, days=max(days, 3650))
    (out / "ca").mkdir()
    (out / "ca" / "ca.crt").write_bytes(ca.cert_pem)
    pki.write_private(out / "ca" / "ca.key", ca.key_pem)

    hosts = [host] + (["localhost", "127.0.0.1"] if localhost else [])
    server = pki.issue_server_cert(ca, federation, hosts, now=now, days=days)
    agg_dir = out / "aggregator"
    (agg_dir / "identities").mkdir(parents=True)
    (agg_dir / "ca.crt").write_bytes(ca.cert_pem)
    (agg_dir / "aggregator.crt").write_bytes(server.cert_pem)
    pki.write_private(agg_dir / "aggregator.key", server.key_pem)

    raw = _party_raw(base, federation, sites)
    ckks_fp = _make_ckks(base, len(sites), out, agg_dir, sites)
    manifest = {
        "federation": federation,
        "ckks_context_sha256": ckks_fp,
        "aggregator": {"address": f"{host}:{port}", "hosts": hosts,
                       "certificate_sha256": pki.cert_fingerprint(server.cert_pem)},
        "ca_certificate_sha256": pki.cert_fingerprint(ca.cert_pem),
        "sites": {},
        "issued": now.isoformat(),
    }
    identities: dict[str, bytes] = {}
    for site in sites:
        kit = out / site
        kit.mkdir(exist_ok=True)
        cert = pki.issue_site_cert(ca, federation, site, now=now, days=days)
        (kit / "ca.crt").write_bytes(ca.cert_pem)
        (kit / f"{site}.crt").write_bytes(cert.cert_pem)
        pki.write_private(kit / f"{site}.key", cert.key_pem)
        id_priv, id_pub = pki.ed25519_identity()
        pki.write_private(kit / "identity.key", id_priv)
        (kit / "identity.pub").write_bytes(id_pub)
        (agg_dir / "identities" / f"{site}.pub").write_bytes(id_pub)
        identities[site] = id_pub
        site_raw = _site_raw(raw, site, host, port)
        if ckks_fp:
            site_raw["ckks"]["context"] = "ckks-secret.ctx"
        _write_toml(kit / f"{site}.toml", site_raw)
        manifest["sites"][site] = {
            "certificate_sha256": pki.cert_fingerprint(cert.cert_pem),
            "identity_public_key_pem": id_pub.decode(),
        }
    for site in sites:
        (out / site / "identities").mkdir()
        for other, pub in identities.items():
            (out / site / "identities" / f"{other}.pub").write_bytes(pub)
    agg_raw = _aggregator_raw(raw, sites, port)
    if ckks_fp:
        agg_raw["ckks"]["context"] = "ckks-public.ctx"
    _write_toml(agg_dir / "aggregator.toml", agg_raw)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _make_ckks(base: Config, n_sites: int, out: Path, agg_dir: Path, sites: list[str]) -> str:
    """Generate the federation's CKKS context: secret copies to the site kits, the public one to
    the aggregator kit.  Returns its fingerprint, or "" when the parameters do not fit this
    federation and CKKS is not the configured mode (then ckks mode stays unavailable).

    Raises:
        ConfigError: CKKS is the configured mode and its parameters do not fit (required vs
            available headroom and precision).
    """
    from crypto import ckks

    ck = base.ckks
    params = ckks.CKKSParams(ck.poly_modulus_degree, tuple(ck.coeff_mod_bit_sizes), ck.scale_bits)
    try:
        ckks.check_params(params, max_sites=n_sites, max_abs_value=ck.max_abs_value,
                          max_weight=ck.max_weight)
    except ConfigError:
        if base.federation.secure_aggregation == "ckks":
            raise
        return ""
    fc = ckks.make_context(params)
    (agg_dir / "ckks-public.ctx").write_bytes(fc.public)
    for site in sites:
        (out / site).mkdir(exist_ok=True)
        pki.write_private(out / site / "ckks-secret.ctx", fc.secret)
    return fc.fingerprint


def _valid_host(host: str) -> bool:
    try:
        import ipaddress

        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return 0 < len(host) <= 253 and all(
        0 < len(label) <= 63 and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        and not label.startswith("-") for label in host.split("."))


def _party_raw(base: Config, federation: str, sites: list[str]) -> dict:
    raw = to_dict(base)
    raw["federation"].update(name=federation, sites=len(sites),
                             min_sites=min(base.federation.min_sites, len(sites)))
    return raw


def _site_raw(raw: dict, site: str, host: str, port: int) -> dict:
    site_raw = json.loads(json.dumps(raw))
    site_raw["node"].update(site_id=site, aggregator=f"{_bracket(host)}:{port}",
                            state_dir="state", identity_key="identity.key",
                            identities_dir="identities")
    site_raw["tls"] = {"ca_cert": "ca.crt", "cert": f"{site}.crt", "key": f"{site}.key",
                       "server_name": host}
    return site_raw


def _aggregator_raw(raw: dict, sites: list[str], port: int) -> dict:
    agg_raw = json.loads(json.dumps(raw))
    agg_raw["aggregator"].update(host="0.0.0.0", port=port, out_dir="runs",
                                 allowed_sites=list(sites), revoked_sites=[])
    agg_raw["tls"] = {"ca_cert": "ca.crt", "cert": "aggregator.crt", "key": "aggregator.key",
                      "server_name": ""}
    return agg_raw


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_toml(path: Path, raw: dict) -> None:
    cfg = config_from_dict(raw, source=str(path))  # validates; relative paths stay relative
    path.write_text(f"# written by fedbrats provision; paths are relative to this file\n"
                    f"{to_toml(cfg)}", encoding="utf-8")
