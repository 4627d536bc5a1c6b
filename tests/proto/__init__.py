"""proto/: the generated modules match the .proto files."""
