"""The Hatchway node agent: enrolls a machine, dials out to the plane over gRPC and serves GGUF models.

It arrives with the nodes issue; it shares nothing with `server` but the `proto` contract.
"""
