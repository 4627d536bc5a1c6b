"""The project's own files: the docs say what the code does, and the CI workflow runs `make test`."""
