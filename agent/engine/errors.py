"""The engine's errors; `code` travels to the plane (the tree is in agent.engine's docstring)."""

from __future__ import annotations


class EngineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ModelNotFound(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("model_not_found", message)


class InvalidRequest(EngineError):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(code, message)


class UnsupportedEndpoint(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "unsupported_endpoint")


class NoChatTemplate(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("no_chat_template", message)


class ContextLengthExceeded(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("context_length_exceeded", message)


class Busy(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


class GenerationFailed(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("generation_failed", message)
