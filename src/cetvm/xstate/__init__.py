"""XSAVE layouts, XSAVE images, XRSTOR(S) checks and the host FPU framework model.

Layer: above :mod:`cetvm.cpuid` and :mod:`cetvm.arch`. Public API:
:class:`XComponent`, :class:`XsaveLayout`, :class:`XsaveArea` (+ :class:`XsaveFormat`,
:class:`CetUserState`, :class:`CetKernelState`), :func:`xrstor_fault`,
:func:`cet_component_value_fault`, :func:`xrstors_value_fault`, :class:`HostFpu`,
:class:`FpuConfig`.
"""

from cetvm.xstate.area import CetKernelState, CetUserState, XsaveArea, XsaveFormat
from cetvm.xstate.hostfpu import FpuConfig, HostFpu
from cetvm.xstate.layout import XComponent, XsaveLayout, align64, largest_valid_xcr0, xcr0_fault
from cetvm.xstate.restore import (
    cet_component_value_fault,
    xrstor_fault,
    xrstors_value_fault,
)

__all__ = [
    "CetKernelState", "CetUserState", "XsaveArea", "XsaveFormat", "FpuConfig", "HostFpu",
    "XComponent", "XsaveLayout", "align64", "largest_valid_xcr0", "xcr0_fault",
    "cet_component_value_fault", "xrstor_fault", "xrstors_value_fault",
]
