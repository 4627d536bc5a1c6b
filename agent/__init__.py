"""The Hatchway node agent: enrolls a machine, dials out to the plane over gRPC and serves GGUF models with
llama.cpp. It shares nothing with `server` but the `proto` contract."""

__version__ = "0.1.0"
