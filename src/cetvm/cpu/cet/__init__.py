"""CET semantics of the CPU: shadow stacks and indirect branch tracking.

One feature, one module (following the SDM's CET chapter, SDM Vol. 1 ch. 18, and the instruction pages):

- :mod:`.policy` — pure predicates: is a CET feature active at a CPL, which MSR controls it.
- :mod:`.shadow_stack` — near CALL/RET, far-transfer frames, supervisor tokens.
- :mod:`.far_transfers` — SSP changes on events (interrupts/exceptions), IRET, far CALL/RET,
  SYSCALL/SYSRET and SYSENTER/SYSEXIT.
- :mod:`.ibt` — the ENDBRANCH tracker (state lives in U_CET/S_CET).
- :mod:`.instructions` — RDSSP, INCSSP, RSTORSSP, SAVEPREVSSP, SETSSBSY, CLRSSBSY, WRSS, WRUSS,
  ENDBR32/64.
- :mod:`.transfer` — the per-translation-block state machine the engine runs at each block start.

Everything works against :class:`cetvm.cpu.cet.machine.CetMachine` and raises
:class:`cetvm.cpu.faults.GuestFault`.
"""
