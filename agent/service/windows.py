"""The Windows Service Control Manager's side of `hatchway-agent service host`, over ctypes.

A program that the SCM starts must call StartServiceCtrlDispatcher within 30 s, report its state with
SetServiceStatus and answer control requests (stop, shutdown); a plain console program is killed as
unresponsive. pywin32 wraps this, but it is ~40 lines of advapi32 calls, so the agent does without the dependency.

The dispatcher's thread (this process's main thread) calls `_control` for each request; the SCM starts
`_service_main` on a thread of its own, which runs the agent until it returns. Logs go to a rotating file in
`log_dir`, and warnings and errors also to the Application event log (source `hatchway-agent`), where Windows
administrators look first.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Callable
from pathlib import Path

SERVICE_NAME = "hatchway-agent"
# How long the SCM waits for a draining agent before it reports the stop as hung (milliseconds).
STOP_WAIT_HINT_MS = 130_000

log = logging.getLogger("hatchway.agent.service")


class NotStartedBySCM(Exception):
    """`service host` was run from a console: only the Service Control Manager can start it."""


def host(run: Callable[[], int], stop: Callable[[], None], *, log_dir: Path) -> int:
    """Serve as the `hatchway-agent` service: `run()` until it returns, `stop()` when the SCM asks.

    Returns `run()`'s exit code; it is reported to the SCM, which restarts the service after a non-zero one.
    """
    if sys.platform == "win32":
        _log_to(log_dir)
        return _Service(run, stop).dispatch()
    raise NotStartedBySCM("the Windows service host runs only on Windows")


def _log_to(log_dir: Path) -> None:
    """A service has no console: `run`'s output would go nowhere."""
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.handlers.RotatingFileHandler(
        log_dir / "agent.log", maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
    )
    file_handler.setFormatter(formatter)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(file_handler)
    if sys.platform == "win32":
        event_log = EventLogHandler(SERVICE_NAME)
        event_log.setLevel(logging.WARNING)
        event_log.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(event_log)
    # `cli`'s logging.basicConfig does nothing once handlers exist, so the level is set here.
    root.setLevel(logging.INFO)
    # What `run` prints rather than logs (a refused start's "Error: ..."), which would otherwise be lost.
    if sys.stdout is None or sys.stderr is None:
        console = open(log_dir / "console.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (for the process's life)
        sys.stdout = sys.stdout or console
        sys.stderr = sys.stderr or console


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)

    SERVICE_WIN32_OWN_PROCESS = 0x10
    SERVICE_STOPPED = 1
    SERVICE_START_PENDING = 2
    SERVICE_STOP_PENDING = 3
    SERVICE_RUNNING = 4
    SERVICE_ACCEPT_STOP = 0x1
    SERVICE_ACCEPT_SHUTDOWN = 0x4
    SERVICE_CONTROL_STOP = 0x1
    SERVICE_CONTROL_INTERROGATE = 0x4
    SERVICE_CONTROL_SHUTDOWN = 0x5
    NO_ERROR = 0
    ERROR_CALL_NOT_IMPLEMENTED = 120
    ERROR_SERVICE_SPECIFIC_ERROR = 1066
    ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063
    EVENTLOG_ERROR_TYPE = 0x1
    EVENTLOG_WARNING_TYPE = 0x2
    EVENTLOG_INFORMATION_TYPE = 0x4

    class SERVICE_STATUS(ctypes.Structure):
        _fields_ = [
            ("dwServiceType", wintypes.DWORD),
            ("dwCurrentState", wintypes.DWORD),
            ("dwControlsAccepted", wintypes.DWORD),
            ("dwWin32ExitCode", wintypes.DWORD),
            ("dwServiceSpecificExitCode", wintypes.DWORD),
            ("dwCheckPoint", wintypes.DWORD),
            ("dwWaitHint", wintypes.DWORD),
        ]

    LPSERVICE_MAIN_FUNCTIONW = ctypes.WINFUNCTYPE(None, wintypes.DWORD, ctypes.POINTER(wintypes.LPWSTR))
    LPHANDLER_FUNCTION_EX = ctypes.WINFUNCTYPE(
        wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID, wintypes.LPVOID
    )

    class SERVICE_TABLE_ENTRYW(ctypes.Structure):
        _fields_ = [("lpServiceName", wintypes.LPWSTR), ("lpServiceProc", LPSERVICE_MAIN_FUNCTIONW)]

    _advapi32.StartServiceCtrlDispatcherW.argtypes = [ctypes.POINTER(SERVICE_TABLE_ENTRYW)]
    _advapi32.StartServiceCtrlDispatcherW.restype = wintypes.BOOL
    _advapi32.RegisterServiceCtrlHandlerExW.argtypes = [wintypes.LPCWSTR, LPHANDLER_FUNCTION_EX, wintypes.LPVOID]
    _advapi32.RegisterServiceCtrlHandlerExW.restype = wintypes.HANDLE
    _advapi32.SetServiceStatus.argtypes = [wintypes.HANDLE, ctypes.POINTER(SERVICE_STATUS)]
    _advapi32.SetServiceStatus.restype = wintypes.BOOL
    _advapi32.RegisterEventSourceW.argtypes = [wintypes.LPCWSTR, wintypes.LPCWSTR]
    _advapi32.RegisterEventSourceW.restype = wintypes.HANDLE
    _advapi32.ReportEventW.argtypes = [
        wintypes.HANDLE,
        wintypes.WORD,
        wintypes.WORD,
        wintypes.DWORD,
        wintypes.LPVOID,
        wintypes.WORD,
        wintypes.DWORD,
        ctypes.POINTER(wintypes.LPCWSTR),
        wintypes.LPVOID,
    ]
    _advapi32.ReportEventW.restype = wintypes.BOOL

    class EventLogHandler(logging.Handler):
        """Records to the Application event log. installers/windows/install.ps1 registers the source, so the
        Event Viewer shows the message without a "description cannot be found" preamble."""

        def __init__(self, source: str) -> None:
            super().__init__()
            self._handle = _advapi32.RegisterEventSourceW(None, source)

        def emit(self, record: logging.LogRecord) -> None:
            if not self._handle:
                return
            if record.levelno >= logging.ERROR:
                kind = EVENTLOG_ERROR_TYPE
            elif record.levelno >= logging.WARNING:
                kind = EVENTLOG_WARNING_TYPE
            else:
                kind = EVENTLOG_INFORMATION_TYPE
            strings = (wintypes.LPCWSTR * 1)(self.format(record))
            _advapi32.ReportEventW(self._handle, kind, 0, 0, None, 1, 0, strings, None)

    class _Service:
        def __init__(self, run: Callable[[], int], stop: Callable[[], None]) -> None:
            self.run = run
            self.stop = stop
            self.exit_code = 0
            self.handle: int | None = None
            self.checkpoint = 0
            # ctypes callbacks must stay referenced for as long as Windows may call them.
            self._main = LPSERVICE_MAIN_FUNCTIONW(self._service_main)
            self._handler = LPHANDLER_FUNCTION_EX(self._control)

        def dispatch(self) -> int:
            table = (SERVICE_TABLE_ENTRYW * 2)(
                SERVICE_TABLE_ENTRYW(SERVICE_NAME, self._main), SERVICE_TABLE_ENTRYW(None, LPSERVICE_MAIN_FUNCTIONW())
            )
            if not _advapi32.StartServiceCtrlDispatcherW(table):
                error = ctypes.get_last_error()
                if error == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
                    raise NotStartedBySCM("only the Service Control Manager starts `service host`; use `run`")
                raise ctypes.WinError(error)
            return self.exit_code

        def _set(self, state: int, *, exit_code: int = 0, wait_hint_ms: int = 0) -> None:
            if self.handle is None:
                return
            accepted = SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN if state == SERVICE_RUNNING else 0
            pending = state in (SERVICE_START_PENDING, SERVICE_STOP_PENDING)
            self.checkpoint = self.checkpoint + 1 if pending else 0
            status = SERVICE_STATUS(
                SERVICE_WIN32_OWN_PROCESS,
                state,
                accepted,
                ERROR_SERVICE_SPECIFIC_ERROR if exit_code else NO_ERROR,
                exit_code,
                self.checkpoint,
                wait_hint_ms,
            )
            _advapi32.SetServiceStatus(self.handle, ctypes.byref(status))

        def _service_main(self, argc: int, argv: object) -> None:
            self.handle = _advapi32.RegisterServiceCtrlHandlerExW(SERVICE_NAME, self._handler, None)
            if not self.handle:
                log.error("RegisterServiceCtrlHandlerEx failed: %s", ctypes.WinError(ctypes.get_last_error()))
                return
            self._set(SERVICE_RUNNING)
            try:
                self.exit_code = self.run()
            except BaseException:
                log.exception("the agent failed")
                self.exit_code = 1
            if self.exit_code:
                log.error("the agent stopped with exit code %d", self.exit_code)
            self._set(SERVICE_STOPPED, exit_code=self.exit_code)

        def _control(self, control: int, event_type: int, event_data: object, context: object) -> int:
            if control in (SERVICE_CONTROL_STOP, SERVICE_CONTROL_SHUTDOWN):
                log.info("the Service Control Manager asked to stop: draining")
                self._set(SERVICE_STOP_PENDING, wait_hint_ms=STOP_WAIT_HINT_MS)
                self.stop()
                return NO_ERROR
            if control == SERVICE_CONTROL_INTERROGATE:
                return NO_ERROR
            return ERROR_CALL_NOT_IMPLEMENTED
