"""Property-based fuzzing of cetvm's input boundaries (issue 9), with hypothesis.

Areas: CPUID files (InstLatx64, ``cpuid -r``, JSON; generated and mutated from the built-in
models), boot images (ELF64, ELF32 multiboot, a.out kludge; generated then byte-mutated),
snapshot manifests (a real snapshot's JSON with fields replaced, removed or added) and snapshot
sections (bit flips, truncations, lengths rewritten with their CRCs recomputed).

Property (:mod:`tests.fuzz.contract`): every input gives success, or exactly one ``cetvm:
error:`` line with exit status 2 — never a traceback, never "internal error ... a bug in
cetvm", never a hang (each example has a wall-clock alarm).

CI runs a bounded, derandomized slice with the rest of the suite (profile ``ci``). The long run
is ``python -m tests.fuzz --long`` (≥ 10,000 generated inputs per area, random seed).
"""
