"""Shared fixtures, markers and (all of) the skips of the bnfast test suite.

Devices: BNFAST_TEST_DEVICES is a comma list ("cpu", "cuda", "cuda:1"...);
by default "cpu", plus "cuda" when torch.cuda.is_available() and bnfast was
built with its CUDA kernels. Every device-dependent test takes the `device`
fixture, so one test body runs on CPU in CI and on CUDA on a GPU machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnfast  # noqa: F401  (registers torch.ops.bnfast.*)
from tests import samples


def bnfast_has_kernels(device_type: str) -> bool:
    """True when bnfast registered kernels for this dispatch key (e.g. 'CUDA')."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bnfast::forward", device_type.upper())


def _default_devices() -> list:
    devices = ["cpu"]
    if torch.cuda.is_available() and bnfast_has_kernels("cuda"):
        devices.append("cuda")
    return devices


def _requested_devices() -> list:
    env = os.environ.get("BNFAST_TEST_DEVICES", "").strip()
    if not env:
        return _default_devices()
    return [d.strip() for d in env.split(",") if d.strip()]


DEVICES = _requested_devices()


def _skip_reason(device: str):
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "CUDA requested in BNFAST_TEST_DEVICES but torch.cuda.is_available() is False"
        if not bnfast_has_kernels("cuda"):
            return "bnfast was built without CUDA kernels (CppExtension build)"
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            return f"{device} requested but only {torch.cuda.device_count()} CUDA device(s)"
    elif kind != "cpu":
        if not bnfast_has_kernels(kind):
            return f"bnfast has no kernels for device type {kind!r}"
    return None


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Deterministic seeds per test; restore global state tests may touch."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def suite_quick(tmp_path_factory):
    """``python -m benchmarks --quick`` (CI's smoke run of the whole suite),
    run once in a subprocess: (output folder, CompletedProcess). Its kernel and
    training parts are what the kernel and training benchmarks' quick tests
    check, so neither runs twice. The tests that take it share an xdist_group
    (gpu_check.sh runs pytest-xdist with --dist loadgroup): one worker runs it."""
    out = tmp_path_factory.mktemp("suite-quick")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # --no-download: use the local or shared CIFAR-10 copy if there is one,
    # else the training part times random batches; never touch the network.
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--no-download",
                           "--devices", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return out, proc  # test_suite_quick_end_to_end judges the exit code; the others, their part


class _CudaCompileLast:
    """The CUDA compile check (tests/test_cuda_compile.py) runs last, its
    build (tests/cuda_build.py) started once collection is final, at the
    lowest CPU priority, so it overlaps the rest of the suite. Not under
    pytest-xdist, where every worker collects every test, nor for
    --collect-only: there the build starts when a first compile case needs it."""

    @pytest.hookimpl(trylast=True)  # after -m / -k deselection
    def pytest_collection_modifyitems(self, items):
        checks = [item for item in items if item.get_closest_marker("cuda_compile")]
        items[:] = [item for item in items if not item.get_closest_marker("cuda_compile")] + checks

    def pytest_collection_finish(self, session):
        if (session.config.option.collectonly or "PYTEST_XDIST_WORKER" in os.environ or not shutil.which("nvcc")
                or not any(item.get_closest_marker("cuda_compile") for item in session.items)):
            return
        from tests import cuda_build  # here, not at start-up: it imports cpp_extension and globs the sources

        try:
            cuda_build.start()
        except Exception:  # noqa: BLE001  the first compile case starts it again and reports the error
            pass

    def pytest_sessionfinish(self):
        cuda_build = sys.modules.get("tests.cuda_build")  # imported only if a build may have started
        if cuda_build is not None:
            cuda_build.stop()


def pytest_configure(config):
    config.pluginmanager.register(_CudaCompileLast(), "bnfast-cuda-compile-last")


def pytest_collection_modifyitems(items):
    """The GPU smoke tier: every test that takes a case from samples.SMOKE_CASES
    (plus the tests marked gpu_smoke where they are defined)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("case") in samples.SMOKE_CASES:
            item.add_marker(pytest.mark.gpu_smoke)


def pytest_report_header(config):
    return f"bnfast test devices: {', '.join(DEVICES)} (BNFAST_TEST_DEVICES to change); torch {torch.__version__}"
