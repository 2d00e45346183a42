"""The wire codec: the only module that imports the generated protobuf/gRPC stubs.

Everything else in fedbrats works on the plain dataclasses and numpy arrays defined here.

Payloads (global models, updates, aggregates) are dictionaries of named numpy arrays.  On the
wire a payload is a :class:`PayloadInfo` header (tensor specs: name, dtype, shape, offset,
byte count; scheme; byte order; total size; SHA-256) followed by the concatenated little-endian
tensor bytes cut into chunks of at most :data:`CHUNK_SIZE` bytes (1 MiB).  The receiver checks
chunk order and sizes as they arrive and the SHA-256 over the whole payload at the end, so a
model of any size streams under gRPC's default 4 MiB message limit and no protobuf message ever
approaches protobuf's 2 GiB limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedbrats.errors import ProtocolError, WireError
from fedbrats.v1 import aggregator_pb2 as pb
from fedbrats.v1 import aggregator_pb2_grpc as pb_grpc

PROTOCOL_VERSION = 1
CHUNK_SIZE = 1 << 20  # bytes per chunk, 1 MiB
#: dtypes a payload may carry; anything else is refused (no pickles, no object arrays).
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "uint32", "uint64", "uint8", "int8")
#: Largest payload the codec accepts, bytes (a guard against a header that claims terabytes).
MAX_PAYLOAD_BYTES = 16 << 30

STAGES = ("unspecified", "joining", "training", "result", "done", "advertise_keys",
          "share_keys", "masked_input", "unmask")
_STAGE_TO_PB = {
    "unspecified": pb.STAGE_UNSPECIFIED,
    "joining": pb.STAGE_JOINING,
    "training": pb.STAGE_TRAINING,
    "result": pb.STAGE_RESULT,
    "done": pb.STAGE_DONE,
    "advertise_keys": pb.STAGE_ADVERTISE_KEYS,
    "share_keys": pb.STAGE_SHARE_KEYS,
    "masked_input": pb.STAGE_MASKED_INPUT,
    "unmask": pb.STAGE_UNMASK,
}
_PB_TO_STAGE = {v: k for k, v in _STAGE_TO_PB.items()}


# ---------------------------------------------------------------------------------------------
# Payloads


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies in a payload: ``data[offset : offset + nbytes]``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PayloadInfo:
    """Header of a streamed payload.

    Attributes:
        scheme: how the bytes are protected; ``plain`` for now.
        tensors: the tensors, in order, without gaps.
        total_bytes: payload size, bytes.
        sha256: SHA-256 digest (32 bytes) of the whole payload.
        chunk_size: bytes per chunk (<= :data:`CHUNK_SIZE`).
        byte_order: always ``little``.
    """

    scheme: str
    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    sha256: bytes
    chunk_size: int = CHUNK_SIZE
    byte_order: str = "little"


@dataclass(frozen=True)
class Payload:
    """A complete payload: header plus bytes."""

    info: PayloadInfo
    data: bytes

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(index, bytes)`` pieces of at most ``info.chunk_size`` bytes."""
        view = memoryview(self.data)
        step = self.info.chunk_size
        for i, start in enumerate(range(0, len(view), step)):
            yield i, bytes(view[start : start + step])

    @property
    def num_chunks(self) -> int:
        return -(-self.info.total_bytes // self.info.chunk_size)


def pack_tensors(
    tensors: Mapping[str, np.ndarray], *, scheme: str = "plain", chunk_size: int = CHUNK_SIZE
) -> Payload:
    """Serialise named arrays into a payload (little-endian, C order).

    Args:
        tensors: name -> array; dtypes must be in :data:`ALLOWED_DTYPES`.
        scheme: protection scheme label carried in the header.
        chunk_size: bytes per streamed chunk, 1 .. :data:`CHUNK_SIZE`.

    Returns:
        The payload with its SHA-256.

    Raises:
        WireError: a dtype is not allowed or chunk_size is out of range.
    """
    if not 1 <= chunk_size <= CHUNK_SIZE:
        raise WireError(f"chunk_size must be in [1, {CHUNK_SIZE}] bytes, got {chunk_size}")
    specs: list[TensorSpec] = []
    parts: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"tensor {name!r}: dtype {a.dtype} is not allowed on the wire")
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        specs.append(TensorSpec(name, a.dtype.name, tuple(int(s) for s in a.shape), offset, len(raw)))
        parts.append(raw)
        offset += len(raw)
    data = b"".join(parts)
    info = PayloadInfo(scheme, tuple(specs), len(data), hashlib.sha256(data).digest(), chunk_size)
    return Payload(info, data)


def unpack_tensors(payload: Payload) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_tensors`: name -> writable array (native byte order).

    Raises:
        WireError: the header does not describe the bytes (gaps, overlaps, bad dtype or shape).
    """
    _check_layout(payload.info)
    out: dict[str, np.ndarray] = {}
    for spec in payload.info.tensors:
        dt = np.dtype(spec.dtype).newbyteorder("<")
        arr = np.frombuffer(payload.data, dtype=dt, count=int(np.prod(spec.shape, dtype=np.int64)),
                            offset=spec.offset)
        out[spec.name] = arr.reshape(spec.shape).astype(np.dtype(spec.dtype), copy=True)
    return out


def payload_sha256(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of the payload :func:`pack_tensors` would produce (model identity on the wire)."""
    return pack_tensors(tensors).info.sha256


def _check_layout(info: PayloadInfo) -> None:
    if info.byte_order != "little":
        raise WireError(f"payload byte order {info.byte_order!r} is not supported")
    if not 1 <= info.chunk_size <= CHUNK_SIZE:
        raise WireError(f"payload chunk size {info.chunk_size} outside [1, {CHUNK_SIZE}]")
    if info.total_bytes > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {info.total_bytes} bytes exceeds {MAX_PAYLOAD_BYTES}")
    names = set()
    expected = 0
    for spec in info.tensors:
        if spec.name in names:
            raise WireError(f"tensor {spec.name!r} appears twice in the payload header")
        names.add(spec.name)
        if spec.dtype not in ALLOWED_DTYPES:
            raise WireError(f"tensor {spec.name!r}: dtype {spec.dtype!r} is not allowed")
        n = int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        if spec.nbytes != n or spec.offset != expected:
            raise WireError(
                f"tensor {spec.name!r}: header says offset {spec.offset}, {spec.nbytes} bytes; "
                f"expected offset {expected}, {n} bytes for shape {spec.shape} {spec.dtype}"
            )
        expected += n
    if expected != info.total_bytes:
        raise WireError(f"tensors cover {expected} bytes but payload has {info.total_bytes}")


class PayloadAssembler:
    """Reassembles a streamed payload, checking each chunk as it arrives.

    Raises (from :meth:`add` / :meth:`finish`):
        WireError: out-of-order or oversized chunk, more bytes than announced, too few bytes,
            or a SHA-256 mismatch.
    """

    def __init__(self, info: PayloadInfo):
        _check_layout(info)
        self.info = info
        self._buf = bytearray()
        self._next = 0
        self._hash = hashlib.sha256()

    def add(self, index: int, data: bytes) -> None:
        if index != self._next:
            raise WireError(f"chunk {index} arrived, expected chunk {self._next}")
        if len(data) > self.info.chunk_size:
            raise WireError(f"chunk {index} has {len(data)} bytes, limit {self.info.chunk_size}")
        if len(self._buf) + len(data) > self.info.total_bytes:
            raise WireError(f"payload exceeds the announced {self.info.total_bytes} bytes")
        self._buf += data
        self._hash.update(data)
        self._next += 1

    def finish(self) -> Payload:
        if len(self._buf) != self.info.total_bytes:
            raise WireError(
                f"payload incomplete: {len(self._buf)} of {self.info.total_bytes} bytes arrived"
            )
        if self._hash.digest() != self.info.sha256:
            raise WireError("payload SHA-256 mismatch: the bytes are not the ones announced")
        return Payload(self.info, bytes(self._buf))


def _info_to_pb(info: PayloadInfo) -> pb.PayloadHeader:
    return pb.PayloadHeader(
        scheme=info.scheme,
        byte_order=info.byte_order,
        tensors=[
            pb.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape), offset=s.offset,
                          nbytes=s.nbytes)
            for s in info.tensors
        ],
        total_bytes=info.total_bytes,
        sha256=info.sha256,
        chunk_size=info.chunk_size,
    )


def _info_from_pb(h: pb.PayloadHeader) -> PayloadInfo:
    return PayloadInfo(
        scheme=h.scheme,
        tensors=tuple(
            TensorSpec(t.name, t.dtype, tuple(int(s) for s in t.shape), int(t.offset), int(t.nbytes))
            for t in h.tensors
        ),
        total_bytes=int(h.total_bytes),
        sha256=bytes(h.sha256),
        chunk_size=int(h.chunk_size),
        byte_order=h.byte_order,
    )


def _stream_payload(payload: Payload, msg_cls) -> Iterator:
    yield msg_cls(header=_info_to_pb(payload.info))
    for i, data in payload.chunks():
        yield msg_cls(chunk=pb.Chunk(index=i, data=data))


def _receive_payload(messages: Iterator, what: str) -> Payload:
    first = next(messages, None)
    if first is None or first.WhichOneof("body") != "header":
        raise WireError(f"{what}: stream did not start with a payload header")
    asm = PayloadAssembler(_info_from_pb(first.header))
    for msg in messages:
        if msg.WhichOneof("body") != "chunk":
            raise WireError(f"{what}: a second header arrived inside the stream")
        asm.add(int(msg.chunk.index), msg.chunk.data)
    return asm.finish()


def model_stream(payload: Payload) -> Iterator:
    """FetchModel response stream for ``payload``."""
    return _stream_payload(payload, pb.FetchModelResponse)


def result_stream(payload: Payload) -> Iterator:
    """FetchResult response stream for ``payload``."""
    return _stream_payload(payload, pb.FetchResultResponse)


def receive_model(responses: Iterable) -> Payload:
    """Reassemble and verify a FetchModel / FetchResult response stream.

    Raises:
        WireError: malformed stream or hash mismatch.
    """
    return _receive_payload(iter(responses), "model stream")


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Envelope:
    """Carried by every request: protocol version, federation id, round, stage, site id."""

    federation_id: str
    site_id: str
    round: int = 0
    stage: str = "unspecified"
    protocol_version: int = PROTOCOL_VERSION


def envelope_to_pb(e: Envelope) -> pb.Envelope:
    return pb.Envelope(protocol_version=e.protocol_version, federation_id=e.federation_id,
                       round=e.round, stage=_STAGE_TO_PB[e.stage], site_id=e.site_id)


def envelope_from_pb(e: pb.Envelope) -> Envelope:
    return Envelope(federation_id=e.federation_id, site_id=e.site_id, round=int(e.round),
                    stage=_PB_TO_STAGE.get(e.stage, "unspecified"),
                    protocol_version=int(e.protocol_version))


@dataclass(frozen=True)
class JoinInfo:
    num_train_samples: int
    num_val_samples: int
    device: str
    secure_aggregation: str = ""
    model_signature: bytes = b""


def model_signature(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over the names, dtypes and shapes of a model's tensors (its architecture)."""
    h = hashlib.sha256()
    for name, arr in tensors.items():
        h.update(f"{name}:{np.asarray(arr).dtype.name}:{tuple(np.shape(arr))};".encode())
    return h.digest()


@dataclass(frozen=True)
class JoinReply:
    accepted: bool
    message: str
    total_rounds: int
    expected_sites: int


@dataclass(frozen=True)
class Task:
    """What a site should do now (answer to GetTask)."""

    stage: str
    round: int
    total_rounds: int
    model_sha256: bytes = b""
    local_steps: int = 0
    message: str = ""
    failed: bool = False
    submitted: bool = False


@dataclass(frozen=True)
class UpdateMetadata:
    """Plaintext metadata of an update: FedAvg weight and what it was computed from."""

    num_samples: int
    local_steps: int
    train_loss: float
    base_model_sha256: bytes


@dataclass(frozen=True)
class SubmitReply:
    accepted: bool
    duplicate: bool = False
    message: str = ""


@dataclass(frozen=True)
class MetricsReport:
    """Validation metrics one site reports for one round. Dice in [0, 1], HD95 in mm."""

    dice: Mapping[str, float]
    hd95: Mapping[str, float] = field(default_factory=dict)
    num_val_cases: int = 0
    train_loss: float = float("nan")
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    clipped_values: int = 0
    epsilon_sample: float = 0.0
    delta_sample: float = 0.0
    epsilon_site: float = 0.0
    delta_site: float = 0.0


def join_request(env: Envelope, info: JoinInfo) -> pb.JoinRequest:
    return pb.JoinRequest(envelope=envelope_to_pb(env), num_train_samples=info.num_train_samples,
                          num_val_samples=info.num_val_samples, device=info.device,
                          secure_aggregation=info.secure_aggregation,
                          model_signature=info.model_signature)


def decode_join_request(req: pb.JoinRequest) -> tuple[Envelope, JoinInfo]:
    return envelope_from_pb(req.envelope), JoinInfo(
        int(req.num_train_samples), int(req.num_val_samples), req.device,
        req.secure_aggregation, bytes(req.model_signature))


def join_response(r: JoinReply) -> pb.JoinResponse:
    return pb.JoinResponse(accepted=r.accepted, message=r.message, total_rounds=r.total_rounds,
                           expected_sites=r.expected_sites)


def decode_join_response(r: pb.JoinResponse) -> JoinReply:
    return JoinReply(r.accepted, r.message, int(r.total_rounds), int(r.expected_sites))


def task_request(env: Envelope, last_completed_round: int, wait_ms: int) -> pb.TaskRequest:
    return pb.TaskRequest(envelope=envelope_to_pb(env), last_completed_round=last_completed_round,
                          wait_ms=wait_ms)


def decode_task_request(req: pb.TaskRequest) -> tuple[Envelope, int, int]:
    return envelope_from_pb(req.envelope), int(req.last_completed_round), int(req.wait_ms)


def task_response(t: Task) -> pb.TaskResponse:
    return pb.TaskResponse(stage=_STAGE_TO_PB[t.stage], round=t.round, total_rounds=t.total_rounds,
                           model_sha256=t.model_sha256, local_steps=t.local_steps,
                           message=t.message, failed=t.failed, submitted=t.submitted)


def decode_task_response(r: pb.TaskResponse) -> Task:
    return Task(_PB_TO_STAGE.get(r.stage, "unspecified"), int(r.round), int(r.total_rounds),
                bytes(r.model_sha256), int(r.local_steps), r.message, r.failed, r.submitted)


def fetch_model_request(env: Envelope) -> pb.FetchModelRequest:
    return pb.FetchModelRequest(envelope=envelope_to_pb(env))


def fetch_result_request(env: Envelope) -> pb.FetchResultRequest:
    return pb.FetchResultRequest(envelope=envelope_to_pb(env))


def decode_envelope_of(req) -> Envelope:
    """Envelope of any unary request message."""
    return envelope_from_pb(req.envelope)


def update_stream(env: Envelope, meta: UpdateMetadata, payload: Payload) -> Iterator:
    """SubmitUpdate request stream: a header (envelope, metadata, payload header), then chunks."""
    header = pb.SubmitUpdateHeader(
        envelope=envelope_to_pb(env),
        metadata=pb.UpdateMetadata(num_samples=meta.num_samples, local_steps=meta.local_steps,
                                   train_loss=meta.train_loss,
                                   base_model_sha256=meta.base_model_sha256),
        payload=_info_to_pb(payload.info),
    )
    yield pb.SubmitUpdateRequest(header=header)
    for i, data in payload.chunks():
        yield pb.SubmitUpdateRequest(chunk=pb.Chunk(index=i, data=data))


@dataclass(frozen=True)
class UpdateHeader:
    envelope: Envelope
    metadata: UpdateMetadata
    payload: PayloadInfo


def receive_update_header(requests: Iterator) -> UpdateHeader:
    """Read the first message of a SubmitUpdate stream.

    Raises:
        WireError: the stream is empty or does not start with a header.
    """
    first = next(requests, None)
    if first is None or first.WhichOneof("body") != "header":
        raise WireError("update stream did not start with a header")
    h = first.header
    m = h.metadata
    return UpdateHeader(
        envelope_from_pb(h.envelope),
        UpdateMetadata(int(m.num_samples), int(m.local_steps), float(m.train_loss),
                       bytes(m.base_model_sha256)),
        _info_from_pb(h.payload),
    )


def receive_update_body(header: UpdateHeader, requests: Iterator) -> Payload:
    """Read the chunks after :func:`receive_update_header` and verify them.

    Raises:
        WireError: malformed stream or hash mismatch.
    """
    asm = PayloadAssembler(header.payload)
    for msg in requests:
        if msg.WhichOneof("body") != "chunk":
            raise WireError("update stream: a second header arrived inside the stream")
        asm.add(int(msg.chunk.index), msg.chunk.data)
    return asm.finish()


def submit_response(r: SubmitReply) -> pb.SubmitUpdateResponse:
    return pb.SubmitUpdateResponse(accepted=r.accepted, duplicate=r.duplicate, message=r.message)


def decode_submit_response(r: pb.SubmitUpdateResponse) -> SubmitReply:
    return SubmitReply(r.accepted, r.duplicate, r.message)


def _scores_to_pb(d: Mapping[str, float]) -> pb.RegionScores:
    nan = float("nan")
    return pb.RegionScores(wt=d.get("wt", nan), tc=d.get("tc", nan), et=d.get("et", nan),
                           mean=d.get("mean", nan))


def _scores_from_pb(s: pb.RegionScores) -> dict[str, float]:
    return {"wt": s.wt, "tc": s.tc, "et": s.et, "mean": s.mean}


def metrics_request(env: Envelope, m: MetricsReport) -> pb.ReportMetricsRequest:
    return pb.ReportMetricsRequest(
        envelope=envelope_to_pb(env), dice=_scores_to_pb(m.dice), hd95=_scores_to_pb(m.hd95),
        num_val_cases=m.num_val_cases, train_loss=m.train_loss, train_seconds=m.train_seconds,
        eval_seconds=m.eval_seconds, clipped_values=m.clipped_values,
        epsilon_sample=m.epsilon_sample, delta_sample=m.delta_sample,
        epsilon_site=m.epsilon_site, delta_site=m.delta_site)


def decode_metrics_request(req: pb.ReportMetricsRequest) -> tuple[Envelope, MetricsReport]:
    return envelope_from_pb(req.envelope), MetricsReport(
        _scores_from_pb(req.dice), _scores_from_pb(req.hd95), int(req.num_val_cases),
        float(req.train_loss), float(req.train_seconds), float(req.eval_seconds),
        int(req.clipped_values), float(req.epsilon_sample), float(req.delta_sample),
        float(req.epsilon_site), float(req.delta_site))


def metrics_response(accepted: bool) -> pb.ReportMetricsResponse:
    return pb.ReportMetricsResponse(accepted=accepted)


#: Longest withdrawal reason accepted, characters (it goes to the aggregator's log).
MAX_REASON_CHARS = 1000


def withdraw_request(env: Envelope, reason: str) -> pb.WithdrawRequest:
    """A site's withdrawal from the current round; ``reason`` is cut to :data:`MAX_REASON_CHARS`."""
    text = str(reason)
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS - 3] + "..."
    return pb.WithdrawRequest(envelope=envelope_to_pb(env), reason=text)


def decode_withdraw_request(req: pb.WithdrawRequest) -> tuple[Envelope, str]:
    """(envelope, reason).

    Raises:
        ProtocolError: the reason is longer than :data:`MAX_REASON_CHARS`.
    """
    if len(req.reason) > MAX_REASON_CHARS:
        raise ProtocolError(f"withdrawal reason of {len(req.reason)} characters; at most "
                            f"{MAX_REASON_CHARS} are accepted")
    return envelope_from_pb(req.envelope), req.reason


# ---------------------------------------------------------------------------------------------
# Secure aggregation messages (mask mode).  Domain types live in aggregator.secagg; these
# functions convert without importing it (plain tuples in, plain tuples out).

_KIND_TO_PB = {"self_mask_seed": pb.SHARE_KIND_SELF_MASK_SEED, "mask_key": pb.SHARE_KIND_MASK_KEY}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


def _signed_keys_pb(adv) -> pb.SignedKeys:
    return pb.SignedKeys(site_id=adv.site, mask_public=adv.mask_public,
                         share_public=adv.share_public, signature=adv.signature)


def _signed_keys_from_pb(k: pb.SignedKeys, cls):
    return cls(k.site_id, bytes(k.mask_public), bytes(k.share_public), bytes(k.signature))


def advertise_keys_request(env: Envelope, adv) -> pb.AdvertiseKeysRequest:
    return pb.AdvertiseKeysRequest(envelope=envelope_to_pb(env), keys=_signed_keys_pb(adv))


def decode_advertise_keys_request(req, cls) -> tuple[Envelope, object]:
    return envelope_from_pb(req.envelope), _signed_keys_from_pb(req.keys, cls)


def ack(cls_name: str, accepted: bool = True):
    """An ``accepted`` response of the named message type (AdvertiseKeysResponse ...)."""
    return getattr(pb, cls_name)(accepted=accepted)


def get_keys_request(env: Envelope) -> pb.GetKeysRequest:
    return pb.GetKeysRequest(envelope=envelope_to_pb(env))


def get_keys_response(adverts, neighbours, threshold: int, graph_seed: bytes) -> pb.GetKeysResponse:
    return pb.GetKeysResponse(keys=[_signed_keys_pb(a) for a in adverts], neighbours=neighbours,
                              threshold=threshold, graph_seed=graph_seed)


def decode_get_keys_response(r: pb.GetKeysResponse, cls) -> tuple[list, list[str], int, bytes]:
    return ([_signed_keys_from_pb(k, cls) for k in r.keys], list(r.neighbours), int(r.threshold),
            bytes(r.graph_seed))


def _enc_pb(b) -> pb.EncryptedShares:
    return pb.EncryptedShares(sender=b.sender, recipient=b.recipient, nonce=b.nonce,
                              ciphertext=b.ciphertext)


def _enc_from_pb(b: pb.EncryptedShares, cls):
    return cls(b.sender, b.recipient, bytes(b.nonce), bytes(b.ciphertext))


def share_keys_request(env: Envelope, bundles) -> pb.ShareKeysRequest:
    return pb.ShareKeysRequest(envelope=envelope_to_pb(env), shares=[_enc_pb(b) for b in bundles])


def decode_share_keys_request(req, cls) -> tuple[Envelope, list]:
    return envelope_from_pb(req.envelope), [_enc_from_pb(b, cls) for b in req.shares]


def get_shares_request(env: Envelope) -> pb.GetSharesRequest:
    return pb.GetSharesRequest(envelope=envelope_to_pb(env))


def get_shares_response(bundles, senders) -> pb.GetSharesResponse:
    return pb.GetSharesResponse(shares=[_enc_pb(b) for b in bundles], senders=senders)


def decode_get_shares_response(r, cls) -> tuple[list, list[str]]:
    return [_enc_from_pb(b, cls) for b in r.shares], list(r.senders)


def get_survivors_request(env: Envelope) -> pb.GetSurvivorsRequest:
    return pb.GetSurvivorsRequest(envelope=envelope_to_pb(env))


def get_survivors_response(survivors, dropped) -> pb.GetSurvivorsResponse:
    return pb.GetSurvivorsResponse(survivors=survivors, dropped=dropped)


def decode_get_survivors_response(r) -> tuple[list[str], list[str]]:
    return list(r.survivors), list(r.dropped)


def unmask_request(env: Envelope, shares) -> pb.UnmaskRequest:
    return pb.UnmaskRequest(envelope=envelope_to_pb(env), shares=[
        pb.RevealedShare(owner=s.owner, kind=_KIND_TO_PB[s.kind], x=s.x, share=s.share)
        for s in shares])


def decode_unmask_request(req, cls) -> tuple[Envelope, list]:
    out = []
    for s in req.shares:
        if s.kind not in _PB_TO_KIND:
            raise WireError(f"revealed share of {s.owner!r} has no kind")
        out.append(cls(s.owner, _PB_TO_KIND[s.kind], int(s.x), bytes(s.share)))
    return envelope_from_pb(req.envelope), out


# ---------------------------------------------------------------------------------------------
# gRPC glue


AggregatorServicer = pb_grpc.AggregatorServicer


def add_aggregator_servicer(servicer, server) -> None:
    """Register an :class:`AggregatorServicer` implementation on a grpc server."""
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)


def aggregator_stub(channel) -> pb_grpc.AggregatorStub:
    """Client stub for the Aggregator service on ``channel``."""
    return pb_grpc.AggregatorStub(channel)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
