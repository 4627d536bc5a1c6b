from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_ALWAYS_ON: _ClassVar[Mode]
    MODE_IDLE_ONLY: _ClassVar[Mode]
MODE_UNSPECIFIED: Mode
MODE_ALWAYS_ON: Mode
MODE_IDLE_ONLY: Mode

class EnrollRequest(_message.Message):
    __slots__ = ("token", "name", "machine_id", "hardware", "previous_credential")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    machine_id: str
    hardware: Hardware
    previous_credential: str
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., machine_id: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., previous_credential: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("node_id", "credential", "org")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    credential: str
    org: str
    def __init__(self, node_id: _Optional[str] = ..., credential: _Optional[str] = ..., org: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "status", "heartbeat", "job")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    status: Status
    heartbeat: Heartbeat
    job: JobEvent
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., job: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class PlaneMessage(_message.Message):
    __slots__ = ("welcome", "job", "cancel", "drain", "config", "resume")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    job: JobRequest
    cancel: Cancel
    drain: Drain
    config: Config
    resume: Resume
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., job: _Optional[_Union[JobRequest, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., config: _Optional[_Union[Config, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "os", "hardware", "models", "mode", "issues", "backend", "gpu_offload")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    os: str
    hardware: Hardware
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    mode: Mode
    issues: _containers.RepeatedCompositeFieldContainer[Issue]
    backend: str
    gpu_offload: bool
    def __init__(self, agent_version: _Optional[str] = ..., os: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., mode: _Optional[_Union[Mode, str]] = ..., issues: _Optional[_Iterable[_Union[Issue, _Mapping]]] = ..., backend: _Optional[str] = ..., gpu_offload: _Optional[bool] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("hostname", "os", "cpu_model", "cpu_count", "ram_total_bytes", "ram_available_bytes", "gpus", "nvml_status")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NVML_STATUS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    os: str
    cpu_model: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    nvml_status: str
    def __init__(self, hostname: _Optional[str] = ..., os: _Optional[str] = ..., cpu_model: _Optional[str] = ..., cpu_count: _Optional[int] = ..., ram_total_bytes: _Optional[int] = ..., ram_available_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., nvml_status: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("name", "vram_total_bytes", "vram_free_bytes", "utilization_percent", "driver")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VRAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    utilization_percent: float
    driver: str
    def __init__(self, name: _Optional[str] = ..., vram_total_bytes: _Optional[int] = ..., vram_free_bytes: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., driver: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "slots", "context_per_slot", "has_price", "price_in", "price_out", "chat", "embeddings", "file_bytes", "gpu_layers", "layers_total", "gpu_layers_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    HAS_PRICE_FIELD_NUMBER: _ClassVar[int]
    PRICE_IN_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPU_LAYERS_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    slots: int
    context_per_slot: int
    has_price: bool
    price_in: float
    price_out: float
    chat: bool
    embeddings: bool
    file_bytes: int
    gpu_layers: int
    layers_total: int
    gpu_layers_reason: str
    def __init__(self, name: _Optional[str] = ..., slots: _Optional[int] = ..., context_per_slot: _Optional[int] = ..., has_price: _Optional[bool] = ..., price_in: _Optional[float] = ..., price_out: _Optional[float] = ..., chat: _Optional[bool] = ..., embeddings: _Optional[bool] = ..., file_bytes: _Optional[int] = ..., gpu_layers: _Optional[int] = ..., layers_total: _Optional[int] = ..., gpu_layers_reason: _Optional[str] = ...) -> None: ...

class Issue(_message.Message):
    __slots__ = ("code", "message", "model")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    model: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("version", "models", "cpu_percent", "gpus", "idle_paused", "draining", "issues")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    IDLE_PAUSED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    cpu_percent: float
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    idle_paused: bool
    draining: bool
    issues: _containers.RepeatedCompositeFieldContainer[Issue]
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., cpu_percent: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., idle_paused: _Optional[bool] = ..., draining: _Optional[bool] = ..., issues: _Optional[_Iterable[_Union[Issue, _Mapping]]] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("name", "slots_total", "slots_busy", "tokens_per_s", "jobs_measured")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    JOBS_MEASURED_FIELD_NUMBER: _ClassVar[int]
    name: str
    slots_total: int
    slots_busy: int
    tokens_per_s: float
    jobs_measured: int
    def __init__(self, name: _Optional[str] = ..., slots_total: _Optional[int] = ..., slots_busy: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., jobs_measured: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms",)
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    def __init__(self, sent_unix_ms: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id", "endpoint", "body")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    endpoint: str
    body: bytes
    def __init__(self, job_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Config(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "token_batch_ms", "token_batch_max")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BATCH_MAX_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    token_batch_ms: int
    token_batch_max: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., token_batch_ms: _Optional[int] = ..., token_batch_max: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "tokens", "end", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tokens: TokenBatch
    end: JobEnd
    error: JobError
    def __init__(self, job_id: _Optional[str] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., end: _Optional[_Union[JobEnd, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("text", "tokens", "tool_calls", "logprobs", "choice")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: int
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallDelta]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    choice: int
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[int] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallDelta, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., choice: _Optional[int] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[bytes] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    logprob: float
    def __init__(self, token: _Optional[bytes] = ..., logprob: _Optional[float] = ...) -> None: ...

class JobEnd(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "result", "choices")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    result: bytes
    choices: _containers.RepeatedCompositeFieldContainer[ChoiceEnd]
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., result: _Optional[bytes] = ..., choices: _Optional[_Iterable[_Union[ChoiceEnd, _Mapping]]] = ...) -> None: ...

class ChoiceEnd(_message.Message):
    __slots__ = ("index", "finish_reason", "completion_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    finish_reason: str
    completion_tokens: int
    def __init__(self, index: _Optional[int] = ..., finish_reason: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
