"""A stand-in for the pynvml module (nvidia-ml-py): the slice of its API
that olb.gpu uses, with switches for the failures a driver can produce.
Unit and integration tests import it; tests inject it as `pynvml`."""

import threading
from types import SimpleNamespace


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: constructed from an NVML return code."""

    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """The slice of pynvml's API that olb.gpu uses, with failure switches.

    gpus: per GPU, {"util": percent, "total": bytes, "free": bytes}.
    """

    NVMLError = FakeNVMLError

    def __init__(self, gpus=(), init_error=None):
        self.gpus = [dict(g) for g in gpus]
        self.init_error = init_error
        self.failing = set()     # GPU indices whose reads raise NVMLError
        self.crashing = False    # reads raise a non-NVML exception
        self.init_calls = 0
        self.shutdown_calls = 0
        self.reads = 0
        self.read_event = threading.Event()  # set after each memory read
        self.reads_wanted = 1
        self.crashes = 0
        self.crash_event = threading.Event()  # set after the 2nd crash

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if index >= len(self.gpus):
            raise FakeNVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        return ("handle", index)

    def nvmlDeviceGetUtilizationRates(self, handle):
        index = handle[1]
        if self.crashing:
            self.crashes += 1
            if self.crashes >= 2:
                self.crash_event.set()
            raise RuntimeError("driver went sideways")
        if index in self.failing:
            raise FakeNVMLError(15)  # NVML_ERROR_GPU_IS_LOST
        return SimpleNamespace(gpu=self.gpus[index]["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self.gpus[handle[1]]
        self.reads += 1
        if self.reads >= self.reads_wanted:
            self.read_event.set()
        return SimpleNamespace(total=gpu["total"], free=gpu["free"], used=gpu["total"] - gpu["free"])
