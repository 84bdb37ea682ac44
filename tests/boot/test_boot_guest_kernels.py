"""Acceptance: the CET test kernels booted with `cetvm boot` report all-green TAP and exit with
QEMU's isa-debug-exit status (code 0 → status 1) — on every CET path (native C hook, Python
hook, Python reference alone): whole kernels must behave the same on each."""

import pytest

from boot_support import MAX_INSTRUCTIONS, boot, guest
from cetvm.cpu.native import native_available


@pytest.fixture(autouse=True, params=["native", "python", "python-reference"])
def cet_path(request, monkeypatch):
    if request.param == "native" and not native_available():
        pytest.skip("native CET fast path not built (make native)")
    monkeypatch.setenv("CETVM_CET_PATH", "native" if request.param == "native" else "python")
    monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", "0" if request.param == "python-reference" else "1")
    return request.param

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1


def run_green(capsys, name, *extra):
    result = boot(capsys, str(guest(name)), "--memory", "32M", "--max-instructions", MAX_INSTRUCTIONS, *extra)
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    return tap


def test_ring3_shadow_stack_stops_a_return_address_overwrite_with_cp_near_ret(capsys):
    tap = run_green(capsys, "shstk_user")
    assert tap.passed("ring 3 return-address overwrite -> #CP(1)")
    assert tap.passed("#CP(1) at CPL3: RIP at the RET")
    assert tap.passed("SYSCALL saves SSP in IA32_PL3_SSP")
    assert tap.passed("ring 0 return-address overwrite -> #CP(1)")
    assert not tap.skipped()


def test_block_classifications_are_forgotten_as_the_tlb_forgets(capsys):
    """CR3 loads drop what cetvm knows of blocks on non-global pages, INVLPG that of the page,
    global pages' blocks survive CR3 loads (the same address holds other code in another
    address space; a remapped global page after INVLPG)."""
    tap = run_green(capsys, "block_cache")
    assert tap.passed("address space B, same address without ENDBR64: #CP(3) after the CR3 load")
    assert tap.passed("the global page remapped without ENDBR64 + INVLPG: #CP(3)")
    assert not tap.skipped()


def test_code_written_through_data_mappings_runs_as_written(capsys):
    """Issue 13: the native path keeps the engine's data TLB entries of pages never fetched from
    non-executable (fast stores on RWX pages); the first fetch from a page must take that away
    from every data entry of it, an alias at another linear address included."""
    tap = run_green(capsys, "split_tlb")
    assert tap.passed("patched through the alias after it ran, the new code runs")
    assert tap.passed("32 patches through the alias, each one runs")


def test_misaligned_user_access_with_am_and_ac_is_alignment_check(capsys):
    """#AC(0) at CPL 3 with CR0.AM and RFLAGS.AC, which the engine does not check itself
    (kvm-unit-tests vmx_exception_test's L2 #AC)."""
    tap = run_green(capsys, "alignment_check")
    assert tap.passed("CR0.AM, RFLAGS.AC, CPL 3: misaligned quadword store -> #AC(0), nothing written")
    assert tap.passed("RFLAGS.AC restored by SYSRET: misaligned quadword store -> #AC(0)")
    assert tap.passed("aligned quadword store with AC on: no fault")
    assert tap.passed("CR0.AM clear: the misaligned store runs")


def test_far_ret_to_a_forged_address_is_cp_far_ret(capsys):
    tap = run_green(capsys, "shstk_farret")
    assert tap.passed("LRETQ to a forged address -> #CP(2)")
    assert not tap.skipped()


def test_ibt_raises_cp_endbranch_at_cpl3_and_cpl0(capsys):
    tap = run_green(capsys, "ibt")
    assert tap.passed("CPL0 CALL* to a non-ENDBR target -> #CP(3)")
    assert tap.passed("CPL3 CALL* to a non-ENDBR target with U_CET.ENDBR_EN -> #CP(3)")
    assert not tap.skipped()


def test_misaligned_pl3_ssp_and_cr4_cet_without_wp_are_gp(capsys):
    tap = run_green(capsys, "cet_msr_cr4")
    assert tap.passed("WRMSR PL3_SSP with bit 0 set -> #GP(0)")
    assert tap.passed("CR4.CET with CR0.WP=0 -> #GP")
    assert tap.passed("clearing CR0.WP while CR4.CET=1 -> #GP")


def test_guest_xss_write_changes_cpuid_0xd_1_ebx(capsys):
    tap = run_green(capsys, "xss_cpuid")
    assert tap.passed("XSS=CET_U: EBX grows by CET_U")
    assert tap.passed("XSS=CET_U|CET_S: EBX = compacted size of XCR0|XSS")


def test_xsaves_xrstors_round_trip_cet_state(capsys):
    tap = run_green(capsys, "xsaves_cet")
    assert not tap.skipped()


def test_without_guest_shstk_and_ibt_the_cet_msrs_and_cr4_cet_are_gp(capsys):
    tap = run_green(capsys, "no_cet", "--cet", "off")
    assert not tap.skipped(), "with --cet off nothing may be skipped"
    assert tap.passed("RDMSR/WRMSR IA32_U_CET -> #GP")
    assert tap.passed("MOV CR4 setting CR4.CET -> #GP")
    assert tap.passed("WRMSR IA32_XSS with CET_U|CET_S -> #GP")


def test_no_cet_kernel_skips_its_checks_when_cet_is_shown(capsys):
    tap = run_green(capsys, "no_cet")
    assert tap.skipped() and len(tap.skipped()) == tap.plan


def test_zen4_has_no_ibt_so_the_ibt_kernel_skips(capsys):
    tap = run_green(capsys, "ibt", "--cpu", "zen4")
    assert len(tap.skipped()) == tap.plan
    assert all("lacks IBT" in desc for desc in tap.skipped())


def test_cet_shstk_only_hides_ibt_from_the_guest(capsys):
    tap = run_green(capsys, "ibt", "--cet", "shstk")
    assert len(tap.skipped()) == tap.plan


def test_boot_smoke_framework_paths(capsys):
    tap = run_green(capsys, "boot_smoke")
    assert tap.passed("ring 3 write to a supervisor page -> #PF (U/S)")


def test_a_forged_return_address_is_cp_at_the_ret_before_its_target_is_fetched(capsys):
    """Issue 8, bug 3 (kvm-unit-tests x86/cet's tampered return address): the target may be
    unmapped, NX, supervisor-only, non-canonical or have no RAM behind it — #CP(1) at the RET."""
    tap = run_green(capsys, "ret_targets")
    assert tap.passed("CPL0 RET to a page with no RAM behind it -> #CP(1) at the RET")
    assert tap.passed("CPL3 RET to a user page with no RAM behind it -> #CP(1) at the RET")
    assert not tap.skipped()


def test_a_fault_while_delivering_int_n_is_reported_at_the_int(capsys):
    """Issue 8, bug 4: a busy IST supervisor token, or one that breaks the 32-byte rule, is #GP(0)
    at the INT instruction (not after it); the #GP's shadow-stack frame names the INT as LIP."""
    tap = run_green(capsys, "int_delivery")
    assert tap.passed("CPL0 #GP from INT n delivery: shadow-stack frame LIP = the INT")
    assert tap.passed("CPL3 INT n, IST token busy -> #GP(0) at the INT")
    assert not tap.skipped()


def test_an_interrupt_right_after_a_ret_keeps_its_shadow_stack_pop(capsys):
    """A RET returning to an instruction cetvm emulates stops the engine there with the RET's
    pop still to apply; a timer interrupt injected at that stop must see the pop done (the
    kernel's test_shadow_stack_64 found the entry left on a user shadow stack: #CP at a later
    RET). Ticks fall at every boundary of the loop, at CPL0 and at CPL3."""
    tap = run_green(capsys, "irq_after_ret")
    assert tap.passed("CPL0: interrupts right after a RET keep its pop (each RDSSP at its target reads the loop's SSP)")
    assert tap.passed("CPL3: interrupts right after a RET keep its pop (IA32_PL3_SSP saved after the pop)")
    assert not tap.skipped()


def test_kvm_refuses_to_emulate_cet_guarded_instructions_behind_the_prefix(capsys):
    """Issue 8: kvm.force_emulation_prefix=1 — CALL/RET (SHSTK) and JMP* (IBT) behind the prefix
    are #UD after it, LEA/JMP/PUSH/POP emulate, and KVM checks S_CET even at CPL3."""
    tap = run_green(capsys, "fep_cet", "--force-emulation-prefix", "--append", "fep=1")
    assert tap.passed("CPL3 with U_CET = 0 but S_CET.SH_STK_EN: FEP RET -> #UD")
    # kvm-unit-tests x86/emulator "movq mmx generates #MF": the emulator flushes x87 faults first
    assert tap.passed("FEP MOVQ mm with an x87 exception pending -> #MF at the MOVQ")
    assert not tap.skipped()


def test_without_the_parameter_the_prefix_is_a_plain_ud(capsys):
    tap = run_green(capsys, "fep_cet")
    assert tap.passed("FEP NOP: emulated (no #UD) when the parameter is on, #UD at the UD2 when off")



def test_string_instructions_on_memory_without_ram_are_mmio(capsys):
    """Issue 9: LODS/MOVS/CMPS/STOS/SCAS (REP or not) touching unassigned memory, the xAPIC page
    or the end of RAM complete architecturally, one MMIO exit per element (was an engine crash)."""
    tap = run_green(capsys, "string_mmio")
    assert tap.passed("MOVSQ unassigned -> unassigned (two MMIO accesses)")
    assert tap.passed("REP STOSB across the end of RAM")


def test_any_instruction_works_on_mmio(capsys):
    """Issue 8/9 (kvm-unit-tests x86/emulator): read-modify-write (ADD, XCHG, INC) on an xAPIC
    register and stores cetvm cannot compute itself (SMSW, SETcc) complete through MMIO exits."""
    tap = run_green(capsys, "mmio_insns")
    assert tap.passed("ADD to an xAPIC register")
    assert tap.passed("SMSW to unassigned memory completes")
    # kvm-unit-tests x86/emulator stopped at "MMIO access by push" (a stack on a device page)
    assert tap.passed("PUSH onto a stack in unassigned memory completes, POP reads all ones")
    assert tap.passed("a store crossing from RAM into unassigned memory writes its RAM part")
    # kvm-unit-tests x86/emulator: BTC on MMIO, cross-page MMIO, then a wild JMP that ended the run
    assert tap.passed("BTC with a register bit offset reaches the dword it selects")
    assert tap.passed("an 8-byte access crossing from unassigned memory into the I/O APIC page")
    assert tap.passed("JMP through a non-canonical pointer read from MMIO: #GP(0) at the JMP")


def test_mov_ss_refuses_a_null_selector_whose_rpl_is_not_the_cpl(capsys):
    """kvm-unit-tests x86/emulator: MOV SS with selector 3 at CPL 0 is #GP(0) (the engine loaded
    it, and the next IRETQ with that SS faulted); selector 0 loads."""
    tap = run_green(capsys, "ss_loads")
    assert tap.passed("MOV SS, reg: null selector with RPL 3 at CPL 0 -> #GP(0)")
    assert tap.passed("MOV SS: null selector with RPL 0 at CPL 0 loads")
    assert tap.passed("MOV SS from an MMIO register holding 3 -> #GP(0)")
    # kvm-unit-tests x86/emulator: "mov non-null, %ss (with ss.rpl != cpl)" wants the selector as
    # error code; "#DB suppressed after MOV SS" (Intel)
    assert tap.passed("MOV SS: data selector with RPL 3 at CPL 0 -> #GP(selector)")
    assert tap.passed("MOV SS: code selector -> #GP(selector)")
    assert tap.passed("MOV SS blocking: no instruction breakpoint on the next instruction, one on the instruction after")
    assert tap.passed("MOV SS; CPUID: the breakpoint on the instruction after the CPUID fires (RF cleared)")


def test_faults_the_engine_gets_wrong(capsys):
    """kvm-unit-tests x86/emulator: MOVBE r, r is #UD (the engine loaded from a garbage address),
    a non-canonical RSP/RBP-based access is #SS(0) (the engine: #GP(0)), MOV from CR8 reads what
    MOV to CR8 wrote (the engine: 0); x86/syscall: a SYSRET that loads TF traps at once."""
    tap = run_green(capsys, "insn_faults")
    assert tap.passed("MOVBE with a register operand -> #UD at the instruction")
    assert tap.passed("non-canonical RSP-based access -> #SS(0)")
    assert tap.passed("non-canonical RBP-based access -> #SS(0)")
    assert tap.passed("non-canonical RAX-based access -> #GP(0)")
    assert tap.passed("MOV from CR8 returns what MOV to CR8 wrote")
    assert tap.passed("MOV to CR8 with a reserved bit (4) -> #GP(0), CR8 unchanged")
    # kvm-unit-tests x86/syscall "syscall TF handling"
    assert tap.passed("SYSRET loading RFLAGS.TF -> single-step #DB at the user instruction right after it")
    # kvm-unit-tests x86/debug "Single-Step + ICEBP #DB w/ MOVSS blocking" looped on a #UD
    assert tap.passed("INT1 (ICEBP) -> #DB past it, DR6 unchanged")
    assert tap.passed("MOV from DR0 with DR7.GD -> #DB at the MOV, DR6.BD set, DR7.GD cleared")


def test_events_from_compatibility_mode_go_through_the_64_bit_idt(capsys):
    """Issue 8 (kvm-unit-tests x86/syscall) and issue 10 (the selftest's 32-bit test): #UD, SYSCALL
    (#UD on Intel) and INT 0x80 from 32-bit user code; IRETQ back to it, with a shadow stack too."""
    tap = run_green(capsys, "compat_events")
    assert tap.passed("SYSCALL in compatibility mode -> #UD (Intel)")
    assert tap.passed("the same with a user shadow stack")
    assert not tap.skipped()


def test_code_rewritten_over_an_emulated_instruction_runs(capsys):
    """Issue 8 (kvm-unit-tests x86/realmode): an exit address whose instruction the guest
    overwrote with an ordinary one stops being an exit ("no emulation for mov al, ..." before)."""
    tap = run_green(capsys, "smc")
    assert tap.passed("the rewritten instruction runs instead")


def test_string_port_io_is_one_exit_per_element(capsys):
    """Issue 8 (kvm-unit-tests x86/emulator stopped at 'string port I/O is not implemented'):
    REP OUTSB to COM1, REP INSB from fw_cfg, INSB with DF = 1."""
    tap = run_green(capsys, "string_pio")
    assert tap.passed("REP INSB from fw_cfg reads its signature")


def test_bmi_instructions_run_whatever_cr4_osfxsr_is(capsys):
    """Issue 10 (Linux's zstd decompressor, CR4 = PAE alone): SHLX & co. executed with
    CR4.OSFXSR = 0 were #UD (an engine quirk); MOV from CR4 still shows the guest's own bit."""
    tap = run_green(capsys, "vex_gpr")
    assert tap.passed("SHLX/SHRX/SARX/RORX with CR4.OSFXSR = 0")
    assert tap.passed("MOV from CR4 shows the guest's OSFXSR = 0")
    assert tap.passed("MOV from CR4 at CPL3 -> #GP(0)")


def test_an_ap_runs_a_linux_like_trampoline_from_a_nonzero_cs_base(capsys):
    """SIPI vector 0x9E: OUT/IN, LJMPW, CALL, CPUID, LIDTL/LGDTL, MOV CR0, LJMPL in real mode at
    CS.base 0x9E000/0x9E100, then 32-bit and 64-bit mode (guests/tests/ap_trampoline.c)."""
    tap = run_green(capsys, "ap_trampoline", "--smp", "2")
    assert not tap.skipped() and tap.plan == 6


def test_rdrand_is_deterministic(capsys):
    """Issue 10: RDRAND came from the host (Unicorn), so every Linux boot (KASLR, the CRNG's seed)
    differed; cetvm's generator gives the same values on every run, with RDRAND's flags."""
    runs = [boot(capsys, str(guest("rdrand")), "--memory", "32M", "--max-instructions", MAX_INSTRUCTIONS)
            for _ in range(2)]
    for run in runs:
        run.tap.assert_complete_and_green()
    values = [[line for line in run.out.splitlines() if line.startswith("# values")] for run in runs]
    assert values[0] and values[0] == values[1]


def test_syscall_sysret_iretq_and_page_faults_at_the_edges_of_native_delivery(capsys):
    """The events the native path delivers inside the engine (SYSCALL, SYSRETQ, IRETQ, #PF) and
    the cases it leaves to the Python reference read the same on every CET path."""
    tap = run_green(capsys, "fast_events")
    assert tap.passed("SYSRETQ with a non-canonical RCX -> #GP(0) at CPL0, RIP at the SYSRETQ")
    assert tap.passed("SYSCALL with EFER.SCE = 0 -> #UD at the SYSCALL")
    assert tap.passed("IRETQ to a data segment as CS -> #GP(selector) at the IRETQ")
    assert tap.passed("CPL0 write to a read-only page with CR0.WP = 1 -> #PF(P|W), CR2")
    assert tap.passed("CPL3 write to a supervisor page -> #PF(P|W|U) at the store, CR2, user CS in the frame")
    assert tap.passed("the same with a user shadow stack: SSP (one CALL deep) saved in IA32_PL3_SSP")
    assert tap.passed("CPL3 read of a not-present page -> #PF(U) at the load")
    assert tap.passed("CPL3 REP MOVSB to a not-present page -> #PF(W|U), CR2 the destination")
    assert tap.passed("1000 SYSCALL -> SYSRETQ round trips from CPL3 return the kernel's result")
    assert tap.passed("a SYSCALL entry reading a local APIC register (MMIO) first reads it at CPL0 on every SYSCALL")


@pytest.mark.parametrize("slices", ["one run", "200k-instruction runs"])
def test_cmpxchg16b_and_cmpxchg8b_leave_the_flags_before_them_alone_at_every_run_start(capsys, slices):
    """The engine's CMPXCHG8B/16B built RFLAGS from stale lazy flags: the previous block's flag
    operation in a loop, and at the top of an engine run (after an emulated CPUID, in a SYSCALL
    entry, where the VMM's run slices cut the loop) the operand of the ADD before them, VM
    included (the Linux guest's PUSHF #GP); cetvm.cpu.flag_sync repairs it
    (guests/tests/lazy_flags.c). ``--timeout`` runs the machine in 200,000-instruction KVM_RUN
    slices."""
    tap = run_green(capsys, "lazy_flags", *(["--timeout", "600"] if slices != "one run" else []))
    assert tap.passed("CPUID; ADD; CMPXCHG16B (no match): RFLAGS is the ADD's with ZF clear")
    assert tap.passed("CPUID; SUB; CMPXCHG8B (match): RFLAGS is the SUB's with ZF set, memory exchanged")
    assert tap.passed("a SYSCALL entry starting with ADD; CMPXCHG16B: RFLAGS is the ADD's on all 20 SYSCALLs")
    assert tap.passed("300000 x ADD; CMPXCHG16B in a loop, across engine runs: RFLAGS is the ADD's every time")


def test_an_smi_with_cet_on_returns_with_ssp_and_the_cet_msrs_intact(capsys):
    """Issue 12 (SMM): an SMI from the APM control port 0xB2 with supervisor shadow stacks and
    IBT on; the handler runs at SMBASE + 0x8000 with CR4 = 0 and sees the SSP in KVM's map at
    SMBASE + 0xFF18; after RSM SSP, S_CET, U_CET, PL0-3_SSP and CR4 are unchanged and still
    enforced; SMBASE relocation moves the next SMI; SMI IPIs reach the sender itself and a
    halted AP, which RSM resumes after its HLT (guests/tests/smm_cet.c)."""
    tap = run_green(capsys, "smm_cet", "--smp", "2")
    assert not tap.skipped()
    assert tap.passed("RSM outside SMM -> #UD")
    assert tap.passed("SSP is the same after RSM")
    assert tap.passed("S_CET, U_CET and PL0-3_SSP are the same after RSM")
    assert tap.passed("SMBASE relocation")
    assert tap.passed("an SMI IPI wakes a halted AP")


@pytest.mark.parametrize("corruption", ["misalign", "noncanonical"])
def test_rsm_with_a_corrupted_saved_ssp_shuts_the_vm_down(capsys, corruption):
    """The SMI handler scribbles on the saved SSP: KVM's rsm_load_state_64 refuses it
    (kvm_msr_write of the guest SSP: canonical, 4-byte aligned), em_rsm → triple fault →
    KVM_EXIT_SHUTDOWN: `cetvm boot` exits 125 and the kernel's line after the SMI never prints."""
    result = boot(capsys, str(guest("smm_cet")), "--memory", "32M", "--max-instructions", MAX_INSTRUCTIONS,
                  "--append", f"corrupt={corruption}")
    assert result.status == 125, result.err
    assert "KVM_EXIT_SHUTDOWN" in result.err and "saved SSP" in result.err
    assert [ok for ok, _n, _d in result.tap.results] == [True]


def test_interrupts_waiting_for_if_are_taken_where_the_window_opens(capsys):
    """kvm-unit-tests eventinj "vec 32/33" and ioapic "simultaneous edge interrupts": with two
    interrupts pending and IF = 0, "sti; nop; cli" takes both at the CLI (the higher vector
    first, the second after the first handler's IRETQ); a POPF setting IF takes one at once
    (cetvm took them at the next exit, after the window had closed again)."""
    tap = run_green(capsys, "irq_window")
    assert tap.passed("two interrupts pending, STI; NOP; CLI: both taken at the CLI, the higher vector first")
    assert tap.passed("one interrupt pending, POPF setting IF: taken right after the POPF")
