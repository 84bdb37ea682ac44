"""The 8259A PIC pair (as QEMU's and KVM's i8259 models).

Master at ports 0x20/0x21, slave at 0xA0/0xA1, the PIIX edge/level control registers (ELCR) at
0x4D0/0x4D1. Implemented: the ICW1..ICW4 initialisation sequence (vector base, cascade, 8086 mode
/ auto-EOI), OCW1 (interrupt mask, read back at the data port), OCW2 (non-specific/specific EOI,
rotate commands), OCW3 (select IRR or ISR for reads of the command port, poll mode, special
mask), and the interrupt logic [Intel 8259A data sheet; KVM i8259.c pic_set_irq1 / pic_intack]:

- IRQ inputs (:meth:`PicPair.set_irq`, driven by :mod:`cetvm.vmm.devices.irq_lines`): an
  edge-triggered input (ELCR bit clear) latches IRR on a rising edge; a level-triggered one
  (ELCR bit set) holds IRR while the line is high. ELCR bits of IRQ 0, 1, 2, 8 and 13 are
  fixed at 0 (PIIX).
- Output (INT): the highest-priority unmasked IRR bit whose priority is above the highest
  in-service one (special mask mode: masked ISR bits do not block; special fully nested mode:
  the cascade input is not blocked by itself). The slave's INT is the master's IRQ 2.
- INTA (:meth:`PicPair.acknowledge`): the master's IRQ (and, for IRQ 2, the slave's) moves from
  IRR to ISR (edge inputs clear IRR; auto-EOI leaves ISR clear), giving ``base + irq``; when the
  request went away before INTA the chip answers the spurious IRQ 7 (vector ``base + 7``).
- A poll read (OCW3 with P=1) acknowledges the highest request and returns ``0x80 | irq``, or
  0x07 when nothing is pending, like QEMU's ``pic_poll_read``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm import InputError
from cetvm.vmm.devices.state import state_bool, state_int

PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
PIC_PORT_COUNT = 2
#: PIIX ELCR registers (one bit per IRQ: 1 = level-triggered).
ELCR_PORT = 0x4D0
ELCR_PORT_COUNT = 2
#: ELCR bits a guest may set: not IRQ 0, 1, 2 (master) nor 8, 13 (slave) — PIIX.
ELCR_MASTER_MASK = 0xF8
ELCR_SLAVE_MASK = 0xDE
#: The master input the slave's INT drives.
CASCADE_IRQ = 2
SPURIOUS_IRQ = 7

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_INIT = 0x10
OCW3_SELECT = 0x08
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
#: Poll answer when nothing is pending (QEMU).
POLL_NO_INTERRUPT = 0x07

#: Fields saved in a snapshot, each an 8-bit value or a flag.
_BYTE_FIELDS = ("imr", "irr", "isr", "irq_base", "icw3", "priority_add", "init_state")
#: Added with device interrupts (older snapshots lack them: 0).
_LINE_FIELDS = ("last_irr", "elcr")
_FLAG_FIELDS = ("init4", "single_mode", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested",
                "read_isr", "poll", "special_mask")


@dataclass
class Pic8259:
    """One 8259A. ``init_state``: 0 ready, 1 expects ICW2, 2 expects ICW3, 3 expects ICW4."""

    name: str = "pic"
    imr: int = 0
    irr: int = 0
    isr: int = 0
    irq_base: int = 0
    icw3: int = 0
    priority_add: int = 0
    init_state: int = 0
    init4: bool = False
    single_mode: bool = False
    auto_eoi: bool = False
    rotate_on_auto_eoi: bool = False
    special_fully_nested: bool = False
    read_isr: bool = False
    poll: bool = False
    special_mask: bool = False
    #: Input line levels (edge detection) and the edge/level control register.
    last_irr: int = 0
    elcr: int = 0
    #: The master of a cascaded pair (IRQ 2 is the slave's INT).
    is_master: bool = True

    def init_reset(self) -> None:
        """State after ICW1 (QEMU pic_init_reset): everything cleared, IMR 0."""
        for field in _BYTE_FIELDS:
            setattr(self, field, 0)
        for field in _FLAG_FIELDS:
            setattr(self, field, False)
        self.last_irr = 0  # KVM kvm_pic_reset / QEMU pic_init_reset: inputs re-detected

    # --- interrupt logic ---------------------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        """Drive input ``irq`` (0..7) to ``level`` (edge or level per ELCR; module docstring)."""
        mask = 1 << irq
        if self.elcr & mask:
            self.irr = self.irr | mask if level else self.irr & ~mask
        elif level and not self.last_irr & mask:
            self.irr |= mask
        self.last_irr = self.last_irr | mask if level else self.last_irr & ~mask

    def _in_service_blocking(self) -> int:
        """ISR bits that block lower-priority requests."""
        isr = self.isr
        if self.special_mask:
            isr &= ~self.imr
        if self.special_fully_nested and self.icw3 and not self.single_mode and self.is_master:
            isr &= ~(1 << CASCADE_IRQ)  # SFNM: a new slave request may nest over the cascade
        return isr

    @property
    def elcr_mask(self) -> int:
        return ELCR_MASTER_MASK if self.is_master else ELCR_SLAVE_MASK

    def _rank(self, irq: int) -> int:
        """Priority rank (0 = highest) of ``irq`` under the current rotation."""
        return (irq - self.priority_add) & 7

    def pending_irq(self) -> int | None:
        """The IRQ the chip asserts INT for, or None."""
        irq = self._highest_priority(self.irr & ~self.imr)
        if irq is None:
            return None
        blocking = self._highest_priority(self._in_service_blocking())
        if blocking is not None and self._rank(blocking) <= self._rank(irq):
            return None
        return irq

    def intack(self, irq: int) -> None:
        """INTA for ``irq``: into ISR (not with auto-EOI), out of IRR for an edge input."""
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)

    # --- command port (offset 0) --------------------------------------------------------
    def _write_command(self, value: int) -> None:
        if value & ICW1_INIT:
            self._icw1(value)
        elif value & OCW3_SELECT:
            self._ocw3(value)
        else:
            self._ocw2(value)

    def _icw1(self, value: int) -> None:
        """ICW1 starts initialisation; ICW2 (and ICW3/ICW4 as announced) follow on the data port.
        Level-triggered mode (LTIM) is accepted and ignored, as in QEMU."""
        self.init_reset()
        self.init_state = 1
        self.init4 = bool(value & ICW1_IC4)
        self.single_mode = bool(value & ICW1_SNGL)

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)

    def _highest_priority(self, mask: int) -> int | None:
        """Highest-priority set bit of ``mask`` given the rotation (priority_add)."""
        for i in range(8):
            irq = (i + self.priority_add) & 7
            if mask & (1 << irq):
                return irq
        return None

    def _ocw2(self, value: int) -> None:
        """OCW2 commands by bits 7:5: 0/4 clear/set rotate-on-AEOI, 1 EOI, 3 specific EOI,
        5 rotate+EOI, 6 set priority, 7 rotate+specific EOI."""
        command = value >> 5
        if command in (0, 4):
            self.rotate_on_auto_eoi = command == 4
        elif command in (1, 5):
            irq = self._highest_priority(self.isr)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if command == 5:
                    self.priority_add = (irq + 1) & 7
        elif command in (3, 7):
            irq = value & 7
            self.isr &= ~(1 << irq)
            if command == 7:
                self.priority_add = (irq + 1) & 7
        elif command == 6:
            self.priority_add = ((value & 7) + 1) & 7

    # --- data port (offset 1) ------------------------------------------------------------
    def _write_data(self, value: int) -> None:
        if self.init_state == 0:
            self.imr = value  # OCW1
        elif self.init_state == 1:
            self.irq_base = value & 0xF8  # ICW2
            self.init_state = (3 if self.init4 else 0) if self.single_mode else 2
        elif self.init_state == 2:
            self.icw3 = value  # ICW3: cascade wiring, recorded only
            self.init_state = 3 if self.init4 else 0
        else:
            self.special_fully_nested = bool(value & ICW4_SFNM)  # ICW4
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.init_state = 0

    # --- bus protocol --------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if self.poll:
            self.poll = False
            return self._poll_read()
        if offset & 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        else:
            self._write_command(value)

    def _poll_read(self) -> int:
        """Poll command: acknowledge the highest request (0x80 | irq), or 0x07 (none)."""
        irq = self.pending_irq()
        if irq is None:
            return POLL_NO_INTERRUPT
        self.intack(irq)
        return 0x80 | irq

    @property
    def vector_base(self) -> int:
        return self.irq_base

    def get_state(self) -> dict:
        return {f: getattr(self, f) for f in _BYTE_FIELDS + _FLAG_FIELDS + _LINE_FIELDS}

    def set_state(self, state: dict) -> None:
        values = {f: state_int(state, f, self.name, 8) for f in _BYTE_FIELDS}
        flags = {f: state_bool(state, f, self.name) for f in _FLAG_FIELDS}
        if values["init_state"] > 3:
            raise InputError(f"{self.name} state 'init_state' = {values['init_state']} must be 0..3")
        lines = {f: state_int(state, f, self.name, 8) if f in state else 0 for f in _LINE_FIELDS}
        lines["elcr"] &= self.elcr_mask
        for field, value in {**values, **flags, **lines}.items():
            setattr(self, field, value)


class ElcrPorts:
    """Ports 0x4D0 (master) and 0x4D1 (slave): the edge/level control registers."""

    def __init__(self, master: Pic8259, slave: Pic8259) -> None:
        self.chips = (master, slave)

    def pio_read(self, offset: int, size: int) -> int:
        return self.chips[offset & 1].elcr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        chip = self.chips[offset & 1]
        chip.elcr = value & chip.elcr_mask


@dataclass
class PicPair:
    """Master and slave 8259A, cascaded on master IRQ 2 (PC/AT wiring)."""

    master: Pic8259
    slave: Pic8259

    @classmethod
    def create(cls) -> "PicPair":
        return cls(Pic8259("pic master"), Pic8259("pic slave", is_master=False))

    def register(self, bus) -> None:
        """Claim 0x20/0x21, 0xA0/0xA1 and the ELCR ports on a :class:`~cetvm.vmm.bus.PioBus`."""
        bus.register(PIC_MASTER_PORT, PIC_PORT_COUNT, self.master, "pic master")
        bus.register(PIC_SLAVE_PORT, PIC_PORT_COUNT, self.slave, "pic slave")
        bus.register(ELCR_PORT, ELCR_PORT_COUNT, ElcrPorts(self.master, self.slave), "pic elcr")

    # --- the pair's interrupt logic ---------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0..15): 0-7 the master, 8-15 the slave."""
        if irq < 8:
            self.master.set_irq(irq, level)
        else:
            self.slave.set_irq(irq - 8, level)
        self._update_cascade()

    def _update_cascade(self) -> None:
        """The slave's INT as a pulse on the master's IRQ 2 (KVM pic_update_irq): a request still
        pending after the slave's INTA latches the master's IRR again."""
        if self.slave.pending_irq() is not None:
            self.master.set_irq(CASCADE_IRQ, True)
            self.master.set_irq(CASCADE_IRQ, False)

    def has_interrupt(self) -> bool:
        """The master's INT output (what the CPU's INTR pin sees through LVT0 ExtINT)."""
        self._update_cascade()
        return self.master.pending_irq() is not None

    def acknowledge(self) -> int:
        """The INTA cycle: the vector the pair puts on the bus (module docstring)."""
        self._update_cascade()
        irq = self.master.pending_irq()
        if irq is None:
            return self.master.irq_base + SPURIOUS_IRQ
        self.master.intack(irq)
        if irq != CASCADE_IRQ:
            vector = self.master.irq_base + irq
        else:
            slave_irq = self.slave.pending_irq()
            if slave_irq is None:
                vector = self.slave.irq_base + SPURIOUS_IRQ
            else:
                self.slave.intack(slave_irq)
                vector = self.slave.irq_base + slave_irq
        self._update_cascade()
        return vector

    def get_state(self) -> dict:
        return {"master": self.master.get_state(), "slave": self.slave.get_state()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "master" not in state or "slave" not in state:
            raise InputError("pic state must have 'master' and 'slave'")
        self.master.set_state(state["master"])
        self.slave.set_state(state["slave"])
