"""The control plane's tests, by the package they specify (tests/server/<package>/ for server/<package>/)."""
