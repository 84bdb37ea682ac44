"""16550A UART: what Linux's 8250 probe and simple outb loops rely on."""

from cetvm.vmm.bus import PioBus
from cetvm.vmm.devices.serial import COM1_PORT, Serial16550

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


def make(input_bytes=b""):
    out = bytearray()
    bus = PioBus()
    uart = Serial16550(out.extend, input_bytes)
    bus.register(COM1_PORT, 8, uart)
    return bus, uart, out


def test_outb_loop_polling_lsr_writes_to_sink():
    bus, _, out = make()
    for ch in b"hello\n":
        assert bus.read(COM1_PORT + LSR, 1) & 0x20  # THR empty: never has to wait
        bus.write(COM1_PORT + THR, 1, ch)
    assert bytes(out) == b"hello\n"
    assert bus.read(COM1_PORT + LSR, 1) & 0x60 == 0x60  # THRE and TEMT


def test_divisor_latch_is_selected_by_dlab_and_does_not_transmit():
    bus, uart, out = make()
    bus.write(COM1_PORT + LCR, 1, 0x83)  # DLAB, 8N1
    bus.write(COM1_PORT + 0, 1, 0x01)
    bus.write(COM1_PORT + 1, 1, 0x00)
    assert bus.read(COM1_PORT + 0, 1) == 0x01 and bus.read(COM1_PORT + 1, 1) == 0x00
    assert uart.baud_rate == 115200
    bus.write(COM1_PORT + LCR, 1, 0x03)
    assert bus.read(COM1_PORT + LCR, 1) == 0x03
    assert bus.read(COM1_PORT + IER, 1) == 0  # IER, not DLM
    assert out == b""


def test_linux_8250_probe_sees_a_16550a():
    bus, _, out = make()
    # autoconfig(): IER scratch test
    bus.write(COM1_PORT + IER, 1, 0)
    assert bus.read(COM1_PORT + IER, 1) & 0x0F == 0
    bus.write(COM1_PORT + IER, 1, 0x0F)
    assert bus.read(COM1_PORT + IER, 1) & 0x0F == 0x0F
    bus.write(COM1_PORT + IER, 1, 0)
    # loopback test: MCR = LOOP | OUT2 | RTS -> MSR & 0xF0 == DCD | CTS
    bus.write(COM1_PORT + MCR, 1, 0x10 | 0x0A)
    assert bus.read(COM1_PORT + MSR, 1) & 0xF0 == 0x90
    bus.write(COM1_PORT + MCR, 1, 0x08)
    # FIFO enable: IIR bits 7:6 == 3 means 16550A
    bus.write(COM1_PORT + FCR, 1, 0x01)
    assert bus.read(COM1_PORT + IIR, 1) >> 6 == 3
    bus.write(COM1_PORT + FCR, 1, 0)
    assert bus.read(COM1_PORT + IIR, 1) >> 6 == 0
    # scratch register
    bus.write(COM1_PORT + SCR, 1, 0xA5)
    assert bus.read(COM1_PORT + SCR, 1) == 0xA5
    assert out == b""


def test_loopback_sends_transmitted_bytes_to_the_receiver():
    bus, _, out = make()
    bus.write(COM1_PORT + MCR, 1, 0x10)
    bus.write(COM1_PORT + THR, 1, ord("x"))
    assert out == b""
    assert bus.read(COM1_PORT + LSR, 1) & 1
    assert bus.read(COM1_PORT + 0, 1) == ord("x")
    assert not bus.read(COM1_PORT + LSR, 1) & 1


def test_input_queue_sets_data_ready_and_is_read_in_order():
    bus, uart, _ = make(b"ab")
    uart.queue_input(b"c")
    got = []
    while bus.read(COM1_PORT + LSR, 1) & 1:
        got.append(bus.read(COM1_PORT + 0, 1))
    assert bytes(got) == b"abc"


def test_interrupt_identification_priority_and_thri_acknowledge():
    bus, uart, _ = make()
    assert bus.read(COM1_PORT + IIR, 1) == 0x01 and not uart.irq_pending
    bus.write(COM1_PORT + IER, 1, 0x02)  # THRI with THR empty: pending at once
    assert uart.irq_pending
    assert bus.read(COM1_PORT + IIR, 1) == 0x02
    assert bus.read(COM1_PORT + IIR, 1) == 0x01  # reading IIR acknowledged it
    bus.write(COM1_PORT + IER, 1, 0x03)
    uart.queue_input(b"z")
    assert bus.read(COM1_PORT + IIR, 1) == 0x04  # received data beats THR empty
    bus.read(COM1_PORT, 1)
    assert bus.read(COM1_PORT + IIR, 1) == 0x02


def test_fcr_receive_reset_drops_queued_input():
    bus, uart, _ = make(b"zz")
    bus.write(COM1_PORT + FCR, 1, 0x03)
    assert not bus.read(COM1_PORT + LSR, 1) & 1


def test_state_round_trip_restores_registers_and_queue():
    bus, uart, _ = make(b"q")
    bus.write(COM1_PORT + LCR, 1, 0x80)
    bus.write(COM1_PORT + 0, 1, 3)
    bus.write(COM1_PORT + LCR, 1, 0x1B)
    bus.write(COM1_PORT + SCR, 1, 7)
    state = uart.get_state()
    other = Serial16550()
    other.set_state(state)
    assert other.get_state() == state
    assert other.divisor == 3 and other.pio_read(SCR, 1) == 7 and other.pio_read(0, 1) == ord("q")


def test_thr_writes_may_wait_for_the_next_exit_unless_the_guest_could_see_it():
    """The machine coalesces THR writes (KVM coalesced PIO) while they are unobservable until the
    guest's next UART access: no loopback, and no THRE interrupt or the FIFOs enabled (a 16550A
    raises THRE once its transmit FIFO has drained: Linux's 8250 loads 16 bytes per interrupt).
    The UART tells the machine each time that may have changed, LSR too."""
    uart = Serial16550()
    told: list[bool] = []
    lsr: list[int] = []
    uart.on_thr_buffering = told.append
    uart.on_lsr = lsr.append
    assert uart.thr_write_unobservable  # IER = 0
    uart.pio_write(1, 1, 0x02)  # IER.THRI without FIFOs: each write is a THRE edge the guest sees
    assert not uart.thr_write_unobservable and told[-1] is False
    uart.pio_write(2, 1, 0xC7)  # FCR: FIFOs on (what Linux writes)
    assert uart.thr_write_unobservable and told[-1] is True
    uart.pio_write(4, 1, 0x10)  # MCR.LOOP: the byte goes to the receiver
    assert not uart.thr_write_unobservable and told[-1] is False
    uart.pio_write(0, 1, 0x41)  # looped back: LSR.DR, told to the machine
    assert lsr[-1] & 0x01
