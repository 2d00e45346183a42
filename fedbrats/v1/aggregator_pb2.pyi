from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_JOINING: _ClassVar[Stage]
    STAGE_TRAINING: _ClassVar[Stage]
    STAGE_RESULT: _ClassVar[Stage]
    STAGE_DONE: _ClassVar[Stage]
    STAGE_ADVERTISE_KEYS: _ClassVar[Stage]
    STAGE_SHARE_KEYS: _ClassVar[Stage]
    STAGE_MASKED_INPUT: _ClassVar[Stage]
    STAGE_UNMASK: _ClassVar[Stage]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK_SEED: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
STAGE_UNSPECIFIED: Stage
STAGE_JOINING: Stage
STAGE_TRAINING: Stage
STAGE_RESULT: Stage
STAGE_DONE: Stage
STAGE_ADVERTISE_KEYS: Stage
STAGE_SHARE_KEYS: Stage
STAGE_MASKED_INPUT: Stage
STAGE_UNMASK: Stage
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK_SEED: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class Envelope(_message.Message):
    __slots__ = ("protocol_version", "federation_id", "round", "stage", "site_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    federation_id: str
    round: int
    stage: Stage
    site_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., federation_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ..., site_id: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("scheme", "byte_order", "tensors", "total_bytes", "sha256", "chunk_size")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    BYTE_ORDER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    byte_order: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    sha256: bytes
    chunk_size: int
    def __init__(self, scheme: _Optional[str] = ..., byte_order: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SignedKeys(_message.Message):
    __slots__ = ("site_id", "mask_public", "share_public", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SHARE_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    mask_public: bytes
    share_public: bytes
    signature: bytes
    def __init__(self, site_id: _Optional[str] = ..., mask_public: _Optional[bytes] = ..., share_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("envelope", "keys")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    keys: SignedKeys
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., keys: _Optional[_Union[SignedKeys, _Mapping]] = ...) -> None: ...

class AdvertiseKeysResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class GetKeysRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class GetKeysResponse(_message.Message):
    __slots__ = ("keys", "neighbours", "threshold", "graph_seed")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SignedKeys]
    neighbours: _containers.RepeatedScalarFieldContainer[str]
    threshold: int
    graph_seed: bytes
    def __init__(self, keys: _Optional[_Iterable[_Union[SignedKeys, _Mapping]]] = ..., neighbours: _Optional[_Iterable[str]] = ..., threshold: _Optional[int] = ..., graph_seed: _Optional[bytes] = ...) -> None: ...

class EncryptedShares(_message.Message):
    __slots__ = ("sender", "recipient", "nonce", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("envelope", "shares")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ...) -> None: ...

class ShareKeysResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class GetSharesRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class GetSharesResponse(_message.Message):
    __slots__ = ("shares", "senders")
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    senders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ..., senders: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSurvivorsRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class GetSurvivorsResponse(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "x", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: ShareKind
    x: int
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., x: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("envelope", "shares")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class UnmaskResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("envelope", "num_train_samples", "num_val_samples", "device", "secure_aggregation", "model_signature")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_VAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    num_train_samples: int
    num_val_samples: int
    device: str
    secure_aggregation: str
    model_signature: bytes
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., num_train_samples: _Optional[int] = ..., num_val_samples: _Optional[int] = ..., device: _Optional[str] = ..., secure_aggregation: _Optional[str] = ..., model_signature: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("accepted", "message", "total_rounds", "expected_sites")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SITES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    total_rounds: int
    expected_sites: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., total_rounds: _Optional[int] = ..., expected_sites: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("envelope", "last_completed_round", "wait_ms")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPLETED_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    last_completed_round: int
    wait_ms: int
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., last_completed_round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class TaskResponse(_message.Message):
    __slots__ = ("stage", "round", "total_rounds", "model_sha256", "local_steps", "message", "failed", "submitted")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    round: int
    total_rounds: int
    model_sha256: bytes
    local_steps: int
    message: str
    failed: bool
    submitted: bool
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model_sha256: _Optional[bytes] = ..., local_steps: _Optional[int] = ..., message: _Optional[str] = ..., failed: _Optional[bool] = ..., submitted: _Optional[bool] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class FetchModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PayloadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateMetadata(_message.Message):
    __slots__ = ("num_samples", "local_steps", "train_loss", "base_model_sha256")
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    local_steps: int
    train_loss: float
    base_model_sha256: bytes
    def __init__(self, num_samples: _Optional[int] = ..., local_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., base_model_sha256: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitUpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[SubmitUpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateHeader(_message.Message):
    __slots__ = ("envelope", "metadata", "payload")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    metadata: UpdateMetadata
    payload: PayloadHeader
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., metadata: _Optional[_Union[UpdateMetadata, _Mapping]] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class FetchResultRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class FetchResultResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PayloadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class RegionScores(_message.Message):
    __slots__ = ("wt", "tc", "et", "mean")
    WT_FIELD_NUMBER: _ClassVar[int]
    TC_FIELD_NUMBER: _ClassVar[int]
    ET_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    wt: float
    tc: float
    et: float
    mean: float
    def __init__(self, wt: _Optional[float] = ..., tc: _Optional[float] = ..., et: _Optional[float] = ..., mean: _Optional[float] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("envelope", "dice", "hd95", "num_val_cases", "train_loss", "train_seconds", "eval_seconds", "clipped_values", "epsilon_sample", "delta_sample", "epsilon_site", "delta_site")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DICE_FIELD_NUMBER: _ClassVar[int]
    HD95_FIELD_NUMBER: _ClassVar[int]
    NUM_VAL_CASES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_VALUES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DELTA_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SITE_FIELD_NUMBER: _ClassVar[int]
    DELTA_SITE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    dice: RegionScores
    hd95: RegionScores
    num_val_cases: int
    train_loss: float
    train_seconds: float
    eval_seconds: float
    clipped_values: int
    epsilon_sample: float
    delta_sample: float
    epsilon_site: float
    delta_site: float
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., dice: _Optional[_Union[RegionScores, _Mapping]] = ..., hd95: _Optional[_Union[RegionScores, _Mapping]] = ..., num_val_cases: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_seconds: _Optional[float] = ..., eval_seconds: _Optional[float] = ..., clipped_values: _Optional[int] = ..., epsilon_sample: _Optional[float] = ..., delta_sample: _Optional[float] = ..., epsilon_site: _Optional[float] = ..., delta_site: _Optional[float] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("envelope", "reason")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    reason: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class WithdrawResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
