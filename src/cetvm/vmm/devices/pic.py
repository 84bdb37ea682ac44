"""The 8259A PIC pair (QEMU hw/intc/i8259.c; KVM arch/x86/kvm/i8259.c).

Master at ports 0x20/0x21, slave at 0xA0/0xA1. Implemented: the ICW1..ICW4 initialisation
sequence (vector base, cascade, 8086 mode / auto-EOI), OCW1 (interrupt mask, read back at the
data port), OCW2 (non-specific/specific EOI, rotate commands), OCW3 (select IRR or ISR for reads
of the command port, poll mode, special mask).

No device of this VMM is wired to an IRQ line, so IRR and ISR stay 0 and the PIC never
requests an interrupt: guests see a PC whose legacy interrupts never fire. A poll read (OCW3
with P=1) answers "no interrupt" with 0x07 like QEMU's ``pic_poll_read``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm import InputError
from cetvm.vmm.devices.state import state_bool, state_int

PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
PIC_PORT_COUNT = 2

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

    def init_reset(self) -> None:
        """State after ICW1 (QEMU pic_init_reset): everything cleared, IMR 0."""
        for field in _BYTE_FIELDS:
            setattr(self, field, 0)
        for field in _FLAG_FIELDS:
            setattr(self, field, False)

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
            return POLL_NO_INTERRUPT
        if offset & 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        else:
            self._write_command(value)

    @property
    def vector_base(self) -> int:
        return self.irq_base

    def get_state(self) -> dict:
        return {f: getattr(self, f) for f in _BYTE_FIELDS + _FLAG_FIELDS}

    def set_state(self, state: dict) -> None:
        values = {f: state_int(state, f, self.name, 8) for f in _BYTE_FIELDS}
        flags = {f: state_bool(state, f, self.name) for f in _FLAG_FIELDS}
        if values["init_state"] > 3:
            raise InputError(f"{self.name} state 'init_state' = {values['init_state']} must be 0..3")
        for field, value in {**values, **flags}.items():
            setattr(self, field, value)


@dataclass
class PicPair:
    """Master and slave 8259A, cascaded on master IRQ 2 (PC/AT wiring)."""

    master: Pic8259
    slave: Pic8259

    @classmethod
    def create(cls) -> "PicPair":
        return cls(Pic8259("pic master"), Pic8259("pic slave"))

    def register(self, bus) -> None:
        """Claim 0x20/0x21 and 0xA0/0xA1 on a :class:`~cetvm.vmm.bus.PioBus`."""
        bus.register(PIC_MASTER_PORT, PIC_PORT_COUNT, self.master, "pic master")
        bus.register(PIC_SLAVE_PORT, PIC_PORT_COUNT, self.slave, "pic slave")

    def get_state(self) -> dict:
        return {"master": self.master.get_state(), "slave": self.slave.get_state()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "master" not in state or "slave" not in state:
            raise InputError("pic state must have 'master' and 'slave'")
        self.master.set_state(state["master"])
        self.slave.set_state(state["slave"])
