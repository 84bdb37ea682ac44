/* string_pio: INS/OUTS with and without REP [issue 8: kvm-unit-tests x86/emulator stopped at
 * "string port I/O is not implemented"].  One I/O exit per element, rSI/rDI/rCX updated as the
 * SDM's REP semantics say: REP OUTSB of a line to COM1, REP INSB of fw_cfg's signature
 * ("QEMU", key 0) from its data port, INSB with DF = 1. */
#include "ktest.h"

static const char line[] = "# via rep outsb\n";

void kmain(void)
{
    kernel_init();
    tap_plan(3);
    u64 rsi = (u64)line, rcx = sizeof(line) - 1;
    __asm__ volatile("cld; rep outsb" : "+S"(rsi), "+c"(rcx) : "d"(0x3F8) : "memory");
    tap_ok(rcx == 0 && rsi == (u64)line + sizeof(line) - 1, "REP OUTSB to COM1: RCX = 0, RSI advanced",
           "rcx %lu", rcx);

    char sig[8] = {0};
    outw(0x510, 0);                               /* fw_cfg: select FW_CFG_SIGNATURE */
    u64 rdi = (u64)sig;
    rcx = 4;
    __asm__ volatile("rep insb" : "+D"(rdi), "+c"(rcx) : "d"(0x511) : "memory");
    tap_ok(rcx == 0 && sig[0] == 'Q' && sig[1] == 'E' && sig[2] == 'M' && sig[3] == 'U',
           "REP INSB from fw_cfg reads its signature", "'%c%c%c%c' rcx %lu", sig[0], sig[1], sig[2], sig[3], rcx);

    char back[4] = {0};
    outw(0x510, 0);
    rdi = (u64)&back[2];
    __asm__ volatile("std; insb; insb; cld" : "+D"(rdi) : "d"(0x511) : "memory");
    tap_ok(rdi == (u64)&back[0] && back[2] == 'Q' && back[1] == 'E', "INSB with DF = 1 stores downwards",
           "'%c%c' rdi offset %ld", back[1], back[2], (long)(rdi - (u64)back));
    tap_done();
}
