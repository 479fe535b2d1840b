from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_INT32: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "model_name", "revision", "vocab_size", "tokenizer_fingerprint", "max_top_k", "max_sequence_length", "backend", "logprob_dtypes", "supports_query_ids", "max_query_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_name: str
    revision: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_top_k: int
    max_sequence_length: int
    backend: str
    logprob_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    supports_query_ids: bool
    max_query_ids: int
    def __init__(self, name: _Optional[str] = ..., model_name: _Optional[str] = ..., revision: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_top_k: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., backend: _Optional[str] = ..., logprob_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., supports_query_ids: _Optional[bool] = ..., max_query_ids: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("teachers", "default_teacher", "server_version")
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEACHER_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    default_teacher: str
    server_version: str
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., default_teacher: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "token_ids", "start", "top_k", "query_ids", "temperature", "logprob_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    token_ids: Tensor
    start: int
    top_k: int
    query_ids: Tensor
    temperature: float
    logprob_dtype: DType
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[int] = ..., top_k: _Optional[int] = ..., query_ids: _Optional[_Union[Tensor, _Mapping]] = ..., temperature: _Optional[float] = ..., logprob_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "teacher", "topk_ids", "topk_logprobs", "token_logprobs", "query_logprobs", "leftover_logmass")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    QUERY_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LEFTOVER_LOGMASS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    topk_ids: Tensor
    topk_logprobs: Tensor
    token_logprobs: Tensor
    query_logprobs: Tensor
    leftover_logmass: Tensor
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., topk_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., token_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., query_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., leftover_logmass: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: ScoreResponse
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...
