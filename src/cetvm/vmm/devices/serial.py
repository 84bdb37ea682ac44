"""16550A UART (`Serial16550`), modelled on QEMU hw/char/serial.c.

Registers (offset from the base port, 0x3F8 for COM1), DLAB = LCR bit 7:

====== ========================= ==========================
offset read                      write
====== ========================= ==========================
0      RBR (DLL if DLAB)         THR (DLL if DLAB)
1      IER (DLM if DLAB)         IER (DLM if DLAB)
2      IIR                       FCR
3      LCR                       LCR
4      MCR                       MCR
5      LSR                       (ignored)
6      MSR                       (ignored)
7      SCR                       SCR
====== ========================= ==========================

Decisions (documented where they differ from a wire-level 16550):
- Transmission is instantaneous: a THR write hands the byte to ``sink`` at once, so LSR.THRE
  and LSR.TEMT always read 1 — an ``outb`` loop polling LSR bit 5 never waits.
- Loopback (MCR bit 4) is implemented as QEMU does, because Linux's 8250 probe uses it: a
  transmitted byte goes to the receive queue instead of the sink, and MSR reflects the MCR
  outputs (CTS<-RTS, DSR<-DTR, RI<-OUT1, DCD<-OUT2).
- Received bytes come from ``queue_input()``; the queue is unbounded (no overrun), LSR.DR is 1
  while it is non-empty.
- Interrupts (QEMU serial_update_irq): IIR reports the highest-priority enabled source —
  received data available (IER bit 0, while the receive queue is not empty; decision: at once,
  without the FIFO trigger level and character timeout), then THR empty (IER bit 1: raised by a
  transmission and by enabling THRI while THR is empty, cleared by reading IIR with THRI
  highest or by writing THR). Line-status and modem-status interrupts never occur (no errors,
  fixed modem lines). ``irq_pending`` is the INTR output, driven after every register access
  onto ``irq`` (ISA IRQ 4 for COM1, :mod:`cetvm.vmm.devices.irq_lines`); MCR.OUT2 does not gate
  it (QEMU).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from cetvm.vmm.devices.state import state_bool, state_bytes, state_int

COM1_PORT = 0x3F8
#: The line-status register's offset from the base port.
UART_LSR_OFFSET = 5
COM1_IRQ = 4
UART_PORT_COUNT = 8

# IER bits
IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
# IIR values
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
# FCR bits
FCR_FE = 0x01
FCR_RFR = 0x02
FCR_XFR = 0x04
# LCR
LCR_DLAB = 0x80
# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
# MSR
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

#: MSR of a port with a terminal attached: carrier, data set ready, clear to send (QEMU reset).
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS
#: Divisor latch after reset (QEMU serial_reset: 9600 baud from a 1.8432 MHz clock).
RESET_DIVISOR = 0x0C
#: Base clock / 16.
UART_BAUD_BASE = 115200


class Serial16550:
    """A 16550A UART on the port bus. ``sink`` receives every transmitted byte."""

    def __init__(self, sink: Callable[[bytes], None] | None = None, input_bytes: bytes = b"",
                 irq: Callable[[bool], None] | None = None) -> None:
        self._sink = sink
        self._rx: deque[int] = deque(input_bytes)
        #: The INTR output (e.g. :meth:`cetvm.vmm.devices.irq_lines.IrqLine.set`).
        self.irq = irq
        #: Told whether THR writes may be buffered (see :attr:`thr_write_unobservable`) each
        #: time that may have changed; the machine then coalesces them (KVM coalesced PIO).
        self.on_thr_buffering: Callable[[bool], None] | None = None
        #: Told LSR's value each time it may have changed (a register access, input, reset,
        #: restore): LSR reads have no side effect, so the machine can let KVM answer them.
        self.on_lsr: Callable[[int], None] | None = None
        self.reset()

    # --- wiring -----------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on values (QEMU serial_reset)."""
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.divisor = RESET_DIVISOR
        self.last_rbr = 0
        self.thr_ipending = False
        self._buffering_changed()

    @property
    def thr_write_unobservable(self) -> bool:
        """A THR write may wait in a buffer until the guest next exits (any access to a UART
        register is an exit, so the UART has them by then): no loopback into the receiver
        (MCR.LOOP clear), and either no THR-empty interrupt (IER.THRI clear) or the FIFOs
        enabled (FCR.FE) — a 16550A raises THRE once its transmit FIFO has drained, however many
        bytes it held (PC16550D data sheet, FIFO mode), so the bytes a driver loads per THRE
        interrupt (Linux's 8250: 16) reach the UART together and raise it once. Decision: the
        FIFO drains at the guest's next exit (a timer, HLT, another port) rather than at the
        line rate, as transmission is instantaneous here anyway."""
        return not self.mcr & MCR_LOOP and (not self.ier & IER_THRI or bool(self.fcr & FCR_FE))

    def _buffering_changed(self) -> None:
        if self.on_thr_buffering is not None:
            self.on_thr_buffering(self.thr_write_unobservable)
        self._publish_lsr()

    def _publish_lsr(self) -> None:
        if self.on_lsr is not None:
            self.on_lsr(self._lsr())

    @property
    def lsr(self) -> int:
        """The line-status register (reading it has no side effect: no error bits are modelled)."""
        return self._lsr()

    def queue_input(self, data: bytes) -> None:
        """Bytes the guest will read from RBR, in order (raises the received-data interrupt)."""
        self._rx.extend(data)
        self._update_irq()

    @property
    def input_pending(self) -> int:
        """Received bytes the guest has not read yet."""
        return len(self._rx)

    def _update_irq(self) -> None:
        if self.irq is not None:
            self.irq(self.irq_pending)
        self._publish_lsr()

    @property
    def baud_rate(self) -> float:
        return UART_BAUD_BASE / self.divisor if self.divisor else 0.0

    # --- derived registers --------------------------------------------------------------
    def _lsr(self) -> int:
        return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)

    def _msr(self) -> int:
        """MSR: fixed "terminal connected" lines, or the MCR outputs looped back."""
        if self.mcr & MCR_LOOP:
            return (
                (MSR_CTS if self.mcr & MCR_RTS else 0)
                | (MSR_DSR if self.mcr & MCR_DTR else 0)
                | (MSR_RI if self.mcr & MCR_OUT1 else 0)
                | (MSR_DCD if self.mcr & MCR_OUT2 else 0)
            )
        return MSR_CONNECTED

    def _pending_interrupt(self) -> int:
        """Highest-priority enabled interrupt source (QEMU serial_update_irq)."""
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        return IIR_NO_INT

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_FE else 0
        return self._pending_interrupt() | fifo

    @property
    def irq_pending(self) -> bool:
        """Level of the UART's interrupt line."""
        return self._pending_interrupt() != IIR_NO_INT

    # --- register access ----------------------------------------------------------------
    def _transmit(self, byte: int) -> None:
        if self.mcr & MCR_LOOP:
            self._rx.append(byte)
        elif self._sink is not None:
            self._sink(bytes((byte,)))
        # The shift register empties at once: THR empty again, raise THRI (QEMU serial_xmit).
        self.thr_ipending = True

    def _receive(self) -> int:
        if self._rx:
            self.last_rbr = self._rx.popleft()
        return self.last_rbr

    def pio_read(self, offset: int, size: int) -> int:
        """Byte-wide registers; wider accesses read the register at ``offset`` (like QEMU)."""
        value = self._read_register(offset)
        self._update_irq()
        return value

    def _read_register(self, offset: int) -> int:
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == 0:
            return self.divisor & 0xFF if dlab else self._receive()
        if offset == 1:
            return self.divisor >> 8 if dlab else self.ier
        if offset == 2:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self.thr_ipending = False  # reading IIR acknowledges THRI
            return iir
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == UART_LSR_OFFSET:
            return self._lsr()
        if offset == 6:
            return self._msr()
        return self.scr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self._write_register(offset, value & 0xFF)
        self._update_irq()

    def _write_register(self, offset: int, value: int) -> None:
        dlab = bool(self.lcr & LCR_DLAB)
        if offset == 0:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                # Writing THR clears THRI and the byte leaves at once, setting it again: INTR
                # drops and rises (a new edge), as the chip's does when THR empties again.
                self.thr_ipending = False
                self._update_irq()
                self._transmit(value)
        elif offset == 1:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == 2:
            self._write_fcr(value)
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
            self._buffering_changed()
        elif offset == 7:
            self.scr = value
        # LSR and MSR writes are ignored (factory test registers).

    def _write_ier(self, value: int) -> None:
        """IER keeps bits 3:0; enabling THRI while THR is empty raises it at once (QEMU)."""
        self.ier = value & 0x0F
        if self.ier & IER_THRI:
            self.thr_ipending = True
        self._buffering_changed()

    def _write_fcr(self, value: int) -> None:
        """FCR: FIFO enable, receive/transmit FIFO reset (self-clearing), trigger level."""
        if value & FCR_RFR:
            self._rx.clear()
        self.fcr = value & 0xC9  # FE, DMA mode, trigger level; reset bits self-clear
        self._buffering_changed()

    # --- snapshot -----------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "scr": self.scr,
            "fcr": self.fcr,
            "divisor": self.divisor,
            "last_rbr": self.last_rbr,
            "thr_ipending": self.thr_ipending,
            "rx": bytes(self._rx).hex(),
        }

    def set_state(self, state: dict) -> None:
        name = "serial"
        ier = state_int(state, "ier", name, 4)
        lcr = state_int(state, "lcr", name, 8)
        mcr = state_int(state, "mcr", name, 5)
        scr = state_int(state, "scr", name, 8)
        fcr = state_int(state, "fcr", name, 8)
        divisor = state_int(state, "divisor", name, 16)
        last_rbr = state_int(state, "last_rbr", name, 8)
        thr_ipending = state_bool(state, "thr_ipending", name)
        rx = state_bytes(state, "rx", name)
        self.ier, self.lcr, self.mcr, self.scr, self.fcr = ier, lcr, mcr, scr, fcr
        self.divisor, self.last_rbr, self.thr_ipending = divisor, last_rbr, thr_ipending
        self._rx = deque(rx)
        self._buffering_changed()
