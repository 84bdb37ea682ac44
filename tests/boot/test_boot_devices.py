"""Acceptance: the device test kernel (guests/tests/devices.c) sees the PC devices end to end —
fw_cfg, 8259, 16550, xAPIC MMIO, x2APIC MSRs routed to the VMM's LocalApic through
KVM_EXIT_X86_RDMSR/WRMSR, KVM's own MSRs, CPUID topology/hypervisor leaves — and powers the
machine off through port 0x8900 when its command line says "shutdown"."""

from boot_support import MAX_INSTRUCTIONS, boot, guest

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1


def boot_devices(capsys, *extra):
    return boot(capsys, str(guest("devices")), "--max-instructions", MAX_INSTRUCTIONS, *extra)


def test_every_device_check_passes_and_fw_cfg_reports_the_memory_size(capsys):
    result = boot_devices(capsys, "--memory", "48M")
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert not tap.skipped()
    assert "# fw_cfg: RAM 48 MiB, 1 CPU(s)" in result.out
    for name in ("fw_cfg signature is QEMU", "fw_cfg RAM size = end of the multiboot memory map",
                 "8259: ICW1-4", "16550: LSR THRE|TEMT", "IA32_APIC_BASE: 0xFEE00000",
                 "xAPIC: SVR software enable", "IA32_APIC_BASE.EXTD enables x2APIC mode",
                 "x2APIC version (0x803) and ID (0x802)", "reserved x2APIC MSR 0x804 -> #GP(0)",
                 "x2APIC -> xAPIC without disabling -> #GP", "leaf 0x40000000 = KVMKVMKVM"):
        assert tap.passed(name)
    assert "# x2APIC: id 0x0 version 0x50014" in result.out


def test_shutdown_port_powers_off_with_status_0(capsys):
    result = boot_devices(capsys, "--memory", "32M", "--append", "shutdown")
    assert result.status == 0, result.err
    tap = result.tap
    assert tap.plan == len(tap.results) and not tap.failures()
    assert "# powering off through port 0x8900" in result.out
    assert "Bail out!" not in result.out


def test_hypervisor_leaves_come_from_the_vmm_not_kvm_supported_cpuid():
    from cetvm.vmm.config import MachineConfig
    from cetvm.vmm.machine import Machine

    machine = Machine(MachineConfig(memory="16M"))
    assert not machine.kvm.get_supported_cpuid().contains(0x4000_0000, 0)
    eax, ebx, ecx, edx = machine.vcpu.get_cpuid2().get(0x4000_0000, 0)
    signature = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    assert signature == b"KVMKVMKVM\0\0\0" and eax == 0x4000_0001
    assert machine.vcpu.get_cpuid2().get(1, 0)[1] >> 16 == 0  # APIC ID 0, one logical processor
