"""Skip a kernel-check module when its tool is missing, unless CI requires the checks.

The kernel tests need tools beyond the Python packages: ``g++`` (tests/test_kernels_host.py,
which also runs the ``gpu``-marked suite on the host-emulated device) and the
``nvidia-cuda-nvrtc`` wheel (tests/test_kernels_nvrtc.py). On a developer's machine a missing
tool skips the module. With ``GPUFUSION_REQUIRE_KERNEL_CHECKS=1`` in the environment (what
``.ci/run`` sets) it is an error instead, so CI cannot pass with the kernels unchecked.
"""

from __future__ import annotations

import os

import pytest

#: Set (to anything but ``""`` or ``"0"``) to turn a missing kernel-check tool into an error.
REQUIRE_ENV = "GPUFUSION_REQUIRE_KERNEL_CHECKS"


def kernel_checks_required() -> bool:
    """True when :data:`REQUIRE_ENV` asks for every kernel check to run."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def skip_module_unless(available: bool, reason: str) -> None:
    """Call at module level: skip the module when ``available`` is false (``reason`` says
    what is missing), or fail its collection when :data:`REQUIRE_ENV` is set."""
    if available:
        return
    if kernel_checks_required():
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set: the kernel checks must run here",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)
