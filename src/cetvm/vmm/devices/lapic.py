"""Local APIC, xAPIC (MMIO page at IA32_APIC_BASE) and x2APIC (MSRs 0x800-0x8FF) forms.

Modelled on KVM's local APIC emulation (the register rules) and the SDM Vol. 3 ch. 11 (12 in
newer editions); QEMU's APIC model behaves the same for what is implemented here.

What this APIC is: the register file a guest probes and programs, and the timer interrupt
source the VMM polls (:mod:`cetvm.vmm.irq`). Decisions, each tested:

- Version register: ``0x14 | (max_lvt << 16)`` with 6 LVT entries (timer, thermal, performance
  counter, LINT0, LINT1, error), i.e. 0x00050014, as KVM reports without CMCI. ``nr_lvt=7``
  adds LVT CMCI (0x2F0 / MSR 0x82F).
- Interrupt sources: the timer (:mod:`cetvm.vmm.devices.apic_timer`: one-shot, periodic and
  TSC-deadline, counting in guest time read from ``clock``; IA32_TSC_DEADLINE (MSR 0x6E0) is this
  APIC's, reached through the VMM's MSR exits like the x2APIC MSRs: it reads 0 and ignores writes
  outside TSC-deadline mode [SDM Vol. 3 §11.5.4.1], ``tsc`` reads the vCPU's TSC and ``tsc_khz``
  is its rate), IPIs and I/O APIC messages (the APIC bus). The VMM polls the timer
  (:meth:`poll_timer`): an expiry with the LVT unmasked sets the vector in IRR.
  :meth:`pending_vector` is the highest IRR vector whose priority class is above PPR [SDM
  11.8.3.1, 11.8.4]; :meth:`acknowledge` (the INTA cycle, when the VMM injects it) moves it to
  ISR; EOI clears the highest ISR bit [SDM 11.8.5]. TMR records the trigger mode of each accepted
  vector [SDM 11.8.4]; the EOI of a vector whose TMR bit is set is broadcast to the I/O APICs
  (:attr:`LocalApic.eoi_sink`, KVM apic_set_eoi → kvm_ioapic_send_eoi). Vectors 0-15 from the
  timer are dropped (decision; the SDM's "illegal vector" ESR bit is not modelled).
- LINT0: at reset the BSP's LVT0 is ExtINT, unmasked (KVM kvm_lapic_reset, QEMU apic_reset:
  what a BIOS leaves), so the 8259's INTR reaches the BSP (:attr:`LocalApic.accepts_pic_interrupt`).
- ICR writes are recorded (``ipis_sent`` and ``last_icr``) and handed to :attr:`LocalApic.ipi_sink`
  (the machine's APIC bus, :mod:`cetvm.vmm.devices.apic_bus`, which delivers them to every APIC
  whose destination matches, this one included); the x2APIC SELF_IPI register sends a fixed
  IPI with the "self" shorthand. Without a sink (an APIC no machine wired) IPIs vanish and
  self-IPIs are counted in ``self_ipis_ignored``. The delivery-status bit always reads 0
  (idle): delivery is immediate.
- Receiving (:meth:`LocalApic.accept_fixed`, :meth:`LocalApic.init_reset`): a fixed IPI sets
  its vector in IRR unless the APIC is disabled (hardware or software: KVM __apic_accept_irq
  drops it) or the vector is below 16; INIT resets the registers as at power-up except the
  APIC ID, IA32_APIC_BASE and, in x2APIC mode, the x2APIC ID and LDR [SDM §11.4.7.3].
- Software disable (SVR bit 8 = 0) sets the mask bit of every LVT and keeps it set on LVT writes
  (KVM ``kvm_lapic_reg_write`` APIC_SPIV / LVT cases); reset SVR is 0xFF (disabled).
- xAPIC MMIO: only aligned 32-bit writes at a 16-byte register are honoured, others are dropped
  (KVM ``apic_mmio_write``); reads may be 1..4 bytes inside a register. While the APIC is
  hardware-disabled or in x2APIC mode the MMIO page reads all ones and drops writes (KVM's
  LAPIC_MMIO_HOLE quirk).
- x2APIC MSRs raise :class:`~cetvm.vmm.requests.GuestFaultRequest` (#GP(0)) when x2APIC mode is
  off, for an index that is not a register, for reads of write-only registers (EOI, SELF_IPI),
  for writes of read-only ones (ID, version, LDR, PPR, ISR/TMR/IRR, current count), for bits
  63:32 set in anything but ICR, for reserved ICR bits, for a non-zero ESR write and, following
  the SDM (11.12.1.2), for a non-zero EOI write.
- IA32_APIC_BASE writes follow KVM ``kvm_apic_set_base``: reserved bits (7:0, 9, above
  MAXPHYADDR, EXTD without x2APIC support) and the invalid state EXTD=1/EN=0 fault; from the
  guest, x2APIC -> xAPIC and disabled -> x2APIC fault too (host-initiated writes may do both).
  Entering x2APIC mode sets ID to the full APIC ID and derives LDR; leaving it restores the xAPIC
  ID. Disabling keeps the register contents (KVM does not reset them). A base other than
  0xFEE00000 is accepted and reported by :attr:`LocalApic.mmio_base`; the VMM moves the page.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from cetvm import InputError
from cetvm.arch import Vector
from cetvm.arch.apic import (
    APIC_BASE_ADDR_MASK,
    APIC_BASE_BSP,
    APIC_BASE_EXTD,
    APIC_DEFAULT_PHYS_BASE,
    DFR_MODEL_FLAT,
    X2APIC_BROADCAST,
    XAPIC_BROADCAST,
    DeliveryMode,
    Shorthand,
    ICR_SHORTHAND_SHIFT,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
    ApicMode,
    apic_base_reset_value,
    apic_base_write_error,
    apic_mode,
)
from cetvm.vmm.devices.apic_timer import TIMER_TSC_DEADLINE, ApicTimer, deadline_expiry, timer_mode
from cetvm.vmm.devices.state import state_bool, state_int
from cetvm.vmm.requests import GuestFaultRequest

APIC_MMIO_SIZE = 0x1000

APIC_VERSION = 0x14

# Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
APIC_ID = 0x020
APIC_LVR = 0x030
APIC_TASKPRI = 0x080
APIC_ARBPRI = 0x090
APIC_PROCPRI = 0x0A0
APIC_EOI = 0x0B0
APIC_LDR = 0x0D0
APIC_DFR = 0x0E0
APIC_SPIV = 0x0F0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0

APIC_LVT_MASKED = 1 << 16
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_ICR_BUSY = 1 << 12
APIC_DEST_SELF = 0x1 << 18
APIC_SHORTHAND_MASK = 0x3 << 18
#: Reserved bits of the 64-bit x2APIC ICR (SDM 11.12.9): 13, 17:16, 31:20.
X2APIC_ICR_RESERVED = (1 << 13) | (0x3 << 16) | (0xFFF << 20)

#: Writable bits of each LVT register (SDM Figure 11-8): vector 7:0, delivery mode 10:8,
#: pin polarity 13, trigger mode 15, mask 16, timer mode 18:17.
LVT_WRITABLE: Mapping[int, int] = MappingProxyType({
    APIC_LVTT: 0x000600FF | APIC_LVT_MASKED,
    APIC_LVTTHMR: 0x000007FF | APIC_LVT_MASKED,
    APIC_LVTPC: 0x000007FF | APIC_LVT_MASKED,
    APIC_LVT0: 0x0000A7FF | APIC_LVT_MASKED,
    APIC_LVT1: 0x0000A7FF | APIC_LVT_MASKED,
    APIC_LVTERR: 0x000000FF | APIC_LVT_MASKED,
    APIC_LVTCMCI: 0x000007FF | APIC_LVT_MASKED,
})

_IN_SERVICE_BANKS = tuple(range(APIC_ISR, APIC_IRR + 0x80, 0x10))  # ISR, TMR, IRR: 8 regs each


def _no_time() -> int:
    """The clock of an APIC no machine drives: guest time stands still at 0."""
    return 0


def _highest_bit(bits: int) -> int | None:
    return bits.bit_length() - 1 if bits else None


def x2apic_ldr(apic_id: int) -> int:
    """Logical ID derived from the x2APIC ID: cluster (ID[19:4]) << 16 | 1 << ID[3:0]."""
    return ((apic_id >> 4) << 16) | (1 << (apic_id & 0xF))


def x2apic_msr_to_offset(index: int) -> int:
    return (index - X2APIC_MSR_FIRST) << 4


def _gp(reason: str) -> GuestFaultRequest:
    return GuestFaultRequest(Vector.GP, 0, reason)


class LocalApic:
    """One vCPU's local APIC. ``apic_id`` is the initial (x2)APIC ID."""

    def __init__(self, apic_id: int = 0, bsp: bool = True, nr_lvt: int = 6,
                 maxphyaddr: int = 46, x2apic_supported: bool = True,
                 clock: Callable[[], int] = _no_time) -> None:
        if nr_lvt not in (6, 7):
            raise InputError(f"local APIC: nr_lvt must be 6 or 7, not {nr_lvt}")
        self.apic_id = apic_id
        self.nr_lvt = nr_lvt
        self.maxphyaddr = maxphyaddr
        self.x2apic_supported = x2apic_supported
        #: Guest time in ns (APIC bus cycles); the machine sets it (cetvm.vmm.irq.GuestClock).
        self.clock = clock
        #: The vCPU's TSC now and its rate (TSC-deadline mode); the machine sets them.
        self.tsc: Callable[[], int] = _no_time
        self.tsc_khz = 1_000_000
        self.apic_base = apic_base_reset_value(bsp)
        #: Receives every IPI this APIC sends: ``ipi_sink(self, icr, x2apic)`` (the 64-bit ICR;
        #: ``x2apic``: the destination is ICR[63:32], else ICR[63:56]). None: IPIs vanish.
        self.ipi_sink: Callable[["LocalApic", int, bool], None] | None = None
        #: Receives the vector of each EOI of a level-triggered interrupt (the I/O APICs).
        self.eoi_sink: Callable[[int], None] | None = None
        self.reset_registers()

    # --- state -----------------------------------------------------------------------
    def reset_registers(self) -> None:
        """Register values at power-up / INIT [SDM 11.4.7.1]."""
        self.id_reg = self.apic_id << 24
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFF_FFFF
        self.svr = 0xFF
        self.esr = 0
        self.icr = 0
        self.lvt = {reg: APIC_LVT_MASKED for reg in self._lvt_registers()}
        if self.apic_base & APIC_BASE_BSP:
            self.lvt[APIC_LVT0] = int(DeliveryMode.EXTINT) << 8
        self.tmict = 0
        self.tdcr = 0
        self.ipis_sent = 0
        self.last_icr = 0
        self.self_ipis_ignored = 0
        self.irr = 0  # 256-bit request / in-service / trigger-mode registers
        self.isr = 0
        self.tsc_deadline = 0
        self.tmr = 0
        self.timer = ApicTimer()

    def _lvt_registers(self) -> tuple[int, ...]:
        regs = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)
        return regs + ((APIC_LVTCMCI,) if self.nr_lvt == 7 else ())

    @property
    def mode(self) -> ApicMode:
        return apic_mode(self.apic_base)

    @property
    def mmio_base(self) -> int:
        return self.apic_base & APIC_BASE_ADDR_MASK & ((1 << self.maxphyaddr) - 1)

    @property
    def version(self) -> int:
        return APIC_VERSION | ((self.nr_lvt - 1) << 16)

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & APIC_SPIV_APIC_ENABLED)

    @property
    def ppr(self) -> int:
        """Processor priority [SDM 11.8.3.1]: TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4] << 4."""
        isrv = _highest_bit(self.isr) or 0
        return self.tpr if (self.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    # --- interrupt acceptance (the VMM's side) -------------------------------------------
    def poll_timer(self) -> None:
        """Account for the guest time elapsed: a timer expiry raises the LVT timer vector."""
        lvtt = self.lvt[APIC_LVTT]
        if self.timer.expire(self.clock(), self.tmict, self.tdcr, timer_mode(lvtt)):
            if timer_mode(lvtt) == TIMER_TSC_DEADLINE:
                self.tsc_deadline = 0  # the timer disarms itself and clears the MSR
            if not lvtt & APIC_LVT_MASKED and self.software_enabled and (lvtt & 0xFF) >= 16:
                self.irr |= 1 << (lvtt & 0xFF)

    def next_timer_expiry(self) -> int | None:
        """Guest time (ns) at which the timer expires next, or None when it is not counting."""
        return self.timer.next_expiry(self.tmict, self.tdcr, timer_mode(self.lvt[APIC_LVTT]))

    def pending_vector(self) -> int | None:
        """The vector the APIC presents to the CPU: the highest in IRR above PPR's class."""
        vector = _highest_bit(self.irr)
        if vector is None or not self.software_enabled or (vector & 0xF0) <= (self.ppr & 0xF0):
            return None
        return vector

    def acknowledge(self, vector: int) -> None:
        """INTA: the CPU took ``vector`` (IRR → ISR)."""
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector

    def _eoi(self) -> None:
        """EOI: the highest-priority in-service vector is done [SDM 11.8.5]; a level-triggered
        one (TMR set) is broadcast to the I/O APICs."""
        vector = _highest_bit(self.isr)
        if vector is not None:
            self.isr &= ~(1 << vector)
            if self.tmr >> vector & 1 and self.eoi_sink is not None:
                self.eoi_sink(vector)

    @property
    def accepts_pic_interrupt(self) -> bool:
        """Does the 8259's INTR reach this CPU? Yes when the APIC is hardware-disabled or LVT0 is
        unmasked ExtINT (KVM kvm_apic_accept_pic_intr)."""
        lvt0 = self.lvt[APIC_LVT0]
        return (self.mode is ApicMode.DISABLED
                or (not lvt0 & APIC_LVT_MASKED and (lvt0 >> 8) & 7 == DeliveryMode.EXTINT))

    # --- IA32_APIC_BASE ---------------------------------------------------------------
    def write_apic_base(self, value: int, host_initiated: bool = False) -> None:
        """WRMSR IA32_APIC_BASE; raises GuestFaultRequest(#GP) per :func:`apic_base_write_error`."""
        error = apic_base_write_error(self.apic_base, value, self.maxphyaddr,
                                      self.x2apic_supported, host_initiated)
        if error:
            raise _gp(error)
        old = self.apic_base
        self.apic_base = value
        if (old ^ value) & APIC_BASE_EXTD:
            if value & APIC_BASE_EXTD:
                self.id_reg = self.apic_id
                self.ldr = x2apic_ldr(self.apic_id)
            else:
                self.id_reg = self.apic_id << 24
                self.ldr = 0

    # --- common register file ----------------------------------------------------------
    def _readable(self, reg: int, x2apic: bool) -> bool:
        if reg in self.lvt or reg in _IN_SERVICE_BANKS:
            return True
        if reg in (APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_PROCPRI, APIC_LDR, APIC_SPIV, APIC_ESR,
                   APIC_ICR, APIC_TMICT, APIC_TMCCT, APIC_TDCR):
            return True
        return not x2apic and reg in (APIC_ARBPRI, APIC_DFR, APIC_ICR2)

    def read_register(self, reg: int, x2apic: bool = False) -> int:
        """Value of register ``reg`` (an offset in the xAPIC page); 64 bits for the x2APIC ICR."""
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == APIC_TMCCT:
            return self.timer.current_count(self.clock(), self.tmict, self.tdcr, timer_mode(self.lvt[APIC_LVTT]))
        if APIC_ISR <= reg < APIC_ISR + 0x80:
            return (self.isr >> (32 * ((reg - APIC_ISR) >> 4))) & 0xFFFF_FFFF
        if APIC_IRR <= reg < APIC_IRR + 0x80:
            return (self.irr >> (32 * ((reg - APIC_IRR) >> 4))) & 0xFFFF_FFFF
        if APIC_TMR <= reg < APIC_TMR + 0x80:
            return (self.tmr >> (32 * ((reg - APIC_TMR) >> 4))) & 0xFFFF_FFFF
        if reg in _IN_SERVICE_BANKS or reg == APIC_ARBPRI:
            return 0
        simple = {
            APIC_ID: self.id_reg,
            APIC_LVR: self.version,
            APIC_TASKPRI: self.tpr,
            APIC_PROCPRI: self.ppr,
            APIC_LDR: self.ldr,
            APIC_DFR: self.dfr,
            APIC_SPIV: self.svr,
            APIC_ESR: self.esr,
            APIC_ICR2: self.icr >> 32,
            APIC_TMICT: self.tmict,
            APIC_TDCR: self.tdcr,
        }
        if reg == APIC_ICR:
            return self.icr if x2apic else self.icr & 0xFFFF_FFFF
        return simple.get(reg, 0)

    def _write_lvt(self, reg: int, value: int) -> None:
        if not self.software_enabled:
            value |= APIC_LVT_MASKED
        old = self.lvt[reg]
        self.lvt[reg] = value & LVT_WRITABLE[reg]
        if reg == APIC_LVTT and (timer_mode(old) == TIMER_TSC_DEADLINE) != (timer_mode(value) == TIMER_TSC_DEADLINE):
            self.tmict = 0  # KVM apic_update_lvtt: entering/leaving TSC-deadline stops the timer
            self.tsc_deadline = 0
            self.timer.stop()

    def _write_svr(self, value: int) -> None:
        self.svr = value & 0x3FF
        if not self.software_enabled:
            for reg in self.lvt:
                self.lvt[reg] |= APIC_LVT_MASKED

    def _send_ipi(self, icr: int, x2apic: bool) -> None:
        """Record the IPI and hand it to the APIC bus (see module)."""
        self.icr = icr & ~APIC_ICR_BUSY
        self.ipis_sent += 1
        self.last_icr = self.icr
        if self.ipi_sink is not None:
            self.ipi_sink(self, self.icr, x2apic)
            return
        dest = icr >> 32 if x2apic else (icr >> 56) & 0xFF
        own = self.apic_id if x2apic else (self.id_reg >> 24)
        if icr & APIC_SHORTHAND_MASK == APIC_DEST_SELF or (icr & APIC_SHORTHAND_MASK == 0 and dest == own):
            self.self_ipis_ignored += 1

    # --- receiving IPIs (the APIC bus calls these) -------------------------------------------
    @property
    def enabled(self) -> bool:
        """Hardware-enabled (IA32_APIC_BASE.EN) and software-enabled (SVR bit 8)."""
        return self.mode in (ApicMode.XAPIC, ApicMode.X2APIC) and self.software_enabled

    def accept_fixed(self, vector: int, level: bool = False) -> bool:
        """A fixed (or lowest-priority) interrupt: set IRR, and TMR to its trigger mode
        (``level``), unless disabled or an illegal vector."""
        if not self.enabled or vector < 16:
            return False
        self.irr |= 1 << vector
        self.tmr = self.tmr | (1 << vector) if level else self.tmr & ~(1 << vector)
        return True

    def init_reset(self) -> None:
        """INIT: power-up register state, keeping the APIC ID, IA32_APIC_BASE and, in x2APIC
        mode, the x2APIC ID and LDR (KVM kvm_lapic_reset(init_event=True))."""
        self.reset_registers()
        if self.mode is ApicMode.X2APIC:
            self.id_reg = self.apic_id
            self.ldr = x2apic_ldr(self.apic_id)

    def matches_destination(self, dest: int, logical: bool, x2apic: bool) -> bool:
        """Is this APIC addressed by ICR destination ``dest`` (kvm_apic_match_dest without a
        shorthand)? ``x2apic``: the sender wrote a 32-bit destination (x2APIC mode).
        Physical: the APIC ID or the broadcast ID. Logical: x2APIC cluster (dest[31:16]) and
        member bits (dest[15:0]) against LDR; xAPIC flat model: dest & LDR[31:24]; cluster
        model: dest[7:4] = LDR[31:28] and dest[3:0] & LDR[27:24] [SDM §11.6.2]."""
        broadcast = X2APIC_BROADCAST if x2apic else XAPIC_BROADCAST
        if dest == broadcast:
            return True
        if not logical:
            own = self.apic_id if self.mode is ApicMode.X2APIC else self.id_reg >> 24
            return dest == own
        if self.mode is ApicMode.X2APIC:
            return dest >> 16 == self.ldr >> 16 and bool(dest & self.ldr & 0xFFFF)
        ldr = (self.ldr >> 24) & 0xFF
        if self.dfr >> 28 == DFR_MODEL_FLAT:
            return bool(dest & ldr)
        return dest >> 4 == ldr >> 4 and bool(dest & ldr & 0xF)

    def write_register(self, reg: int, value: int, x2apic: bool = False) -> bool:
        """Apply a write; returns False when the register cannot be written in this mode (the
        x2APIC path turns that into #GP, the xAPIC path drops the write)."""
        if reg in self.lvt:
            self._write_lvt(reg, value)
        elif reg == APIC_ID and not x2apic:
            self.id_reg = value & 0xFF00_0000
        elif reg == APIC_TASKPRI:
            self.tpr = value & 0xFF
        elif reg == APIC_EOI:
            self._eoi()
        elif reg == APIC_LDR and not x2apic:
            self.ldr = value & 0xFF00_0000
        elif reg == APIC_DFR and not x2apic:
            self.dfr = value | 0x0FFF_FFFF
        elif reg == APIC_SPIV:
            self._write_svr(value)
        elif reg == APIC_ESR:
            self.esr = 0
        elif reg == APIC_ICR:
            if x2apic:
                self._send_ipi(value, True)
            else:
                self._send_ipi((self.icr & ~0xFFFF_FFFF) | value, False)
        elif reg == APIC_ICR2 and not x2apic:
            self.icr = (self.icr & 0xFFFF_FFFF) | ((value & 0xFF00_0000) << 32)
        elif reg == APIC_TMICT:
            self.tmict = value & 0xFFFF_FFFF
            if timer_mode(self.lvt[APIC_LVTT]) != TIMER_TSC_DEADLINE:
                self.timer.arm(self.clock(), self.tmict)
        elif reg == APIC_TDCR:
            self.tdcr = value & 0xB
            if self.timer.running:
                self.timer.arm(self.clock(), self.tmict)
        elif reg == APIC_SELF_IPI and x2apic:
            if self.ipi_sink is not None:  # SDM §11.12.11: a fixed self-IPI of vector bits 7:0
                self.ipi_sink(self, (value & 0xFF) | Shorthand.SELF << ICR_SHORTHAND_SHIFT
                              | DeliveryMode.FIXED << 8, True)
            else:
                self.self_ipis_ignored += 1
        else:
            return False
        return True

    # --- IA32_TSC_DEADLINE -------------------------------------------------------------------
    def _in_deadline_mode(self) -> bool:
        return timer_mode(self.lvt[APIC_LVTT]) == TIMER_TSC_DEADLINE

    def read_tsc_deadline(self) -> int:
        """RDMSR IA32_TSC_DEADLINE: the armed deadline, 0 when disarmed or in another mode."""
        return self.tsc_deadline if self._in_deadline_mode() else 0

    def write_tsc_deadline(self, value: int) -> None:
        """WRMSR IA32_TSC_DEADLINE: arm (non-zero) or disarm (0) in TSC-deadline mode; ignored
        in the other modes."""
        if not self._in_deadline_mode():
            return
        self.tsc_deadline = value
        expiry = deadline_expiry(self.clock(), self.tsc(), value, self.tsc_khz) if value else None
        self.timer.arm_deadline(expiry)

    # --- xAPIC MMIO ----------------------------------------------------------------------
    def _mmio_live(self) -> bool:
        return self.mode is ApicMode.XAPIC

    def mmio_read(self, offset: int, size: int) -> int:
        if not self._mmio_live():
            return (1 << (8 * size)) - 1
        reg, align = offset & 0xFF0, offset & 0xF
        if align + size > 4 or not self._readable(reg, False):
            return 0
        return (self.read_register(reg) >> (8 * align)) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if not self._mmio_live() or size != 4 or offset & 0xF:
            return
        self.write_register(offset, value & 0xFFFF_FFFF)

    # --- x2APIC MSRs ---------------------------------------------------------------------
    def _x2apic_register(self, index: int, access: str) -> int:
        if not X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST:
            raise _gp(f"MSR {index:#x} is not an x2APIC register")
        if self.mode is not ApicMode.X2APIC:
            raise _gp(f"{access} of x2APIC MSR {index:#x} while x2APIC mode is off")
        return x2apic_msr_to_offset(index)

    def msr_read(self, index: int) -> int:
        """RDMSR of an x2APIC register (0x800-0x8FF)."""
        reg = self._x2apic_register(index, "RDMSR")
        if not self._readable(reg, True):
            raise _gp(f"RDMSR of x2APIC MSR {index:#x}: not a readable register")
        return self.read_register(reg, x2apic=True)

    def msr_write(self, index: int, value: int) -> None:
        """WRMSR of an x2APIC register (0x800-0x8FF)."""
        reg = self._x2apic_register(index, "WRMSR")
        if reg == APIC_ICR:
            if value & X2APIC_ICR_RESERVED:
                raise _gp(f"WRMSR x2APIC ICR {value:#x} sets reserved bits {value & X2APIC_ICR_RESERVED:#x}")
        elif value >> 32:
            raise _gp(f"WRMSR x2APIC MSR {index:#x} value {value:#x} sets bits 63:32")
        if reg in (APIC_ESR, APIC_EOI) and value != 0:
            raise _gp(f"WRMSR x2APIC MSR {index:#x} must write 0, not {value:#x}")
        if reg == APIC_SELF_IPI and value & ~0xFF:  # SDM Vol. 3 §11.12.11: bits 31:8 reserved
            raise _gp(f"WRMSR x2APIC SELF_IPI {value:#x} sets reserved bits 31:8")
        if not self.write_register(reg, value, x2apic=True):
            raise _gp(f"WRMSR of x2APIC MSR {index:#x}: not a writable register")

    # --- snapshot --------------------------------------------------------------------------
    _STATE_FIELDS: tuple[tuple[str, int], ...] = (
        ("apic_base", 64), ("id_reg", 32), ("tpr", 8), ("ldr", 32), ("dfr", 32), ("svr", 10),
        ("esr", 32), ("icr", 64), ("tmict", 32), ("tdcr", 4), ("ipis_sent", 64), ("last_icr", 64),
        ("self_ipis_ignored", 64), ("irr", 256), ("isr", 256))
    #: Fields added after the first snapshot format (absent in older snapshots: 0).
    _NEWER_FIELDS: tuple[tuple[str, int], ...] = (("tmr", 256),)

    def get_state(self) -> dict:
        state = {name: getattr(self, name) for name, _bits in self._STATE_FIELDS + self._NEWER_FIELDS}
        state["lvt"] = {f"{reg:#05x}": value for reg, value in self.lvt.items()}
        state["timer"] = {"start": self.timer.start, "running": self.timer.running}
        state["tsc_deadline"] = self.tsc_deadline
        return state

    def set_state(self, state: dict) -> None:
        values = {name: state_int(state, name, "local APIC", bits) for name, bits in self._STATE_FIELDS}
        values.update({name: state_int(state, name, "local APIC", bits) if name in state else 0
                       for name, bits in self._NEWER_FIELDS})
        lvt_state = state.get("lvt")
        if not isinstance(lvt_state, dict):
            raise InputError("local APIC state has no 'lvt' object")
        lvt = {}
        for reg in self._lvt_registers():
            lvt[reg] = state_int(lvt_state, f"{reg:#05x}", "local APIC lvt", 32)
        if apic_mode(values["apic_base"]) is ApicMode.INVALID:
            raise InputError(f"local APIC state 'apic_base' = {values['apic_base']:#x} is an invalid mode")
        timer_state = state.get("timer")
        timer = ApicTimer(state_int(timer_state, "start", "local APIC timer"),
                          state_bool(timer_state, "running", "local APIC timer"))
        # (snapshots from before TSC-deadline mode have no deadline)
        deadline = state_int(state, "tsc_deadline", "local APIC") if "tsc_deadline" in state else 0
        for name, value in values.items():
            setattr(self, name, value)
        self.lvt = lvt
        self.timer = timer
        self.tsc_deadline = deadline
