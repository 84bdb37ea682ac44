/* console.c - 16550 serial console (COM1 0x3F8), kprintf, TAP output and exit via
 * isa-debug-exit (port 0xF4: status (v<<1)|1), with the Bochs/QEMU shutdown port as fallback. */
#include "ktest.h"

#define COM1 0x3F8
#define DEBUG_EXIT_PORT 0xF4
#define SHUTDOWN_PORT 0x8900

struct tap_state { int planned, next, failed; };
static struct tap_state tap;

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void serial_init(void)
{
    outb(COM1 + 1, 0x00);   /* no interrupts */
    outb(COM1 + 3, 0x80);   /* DLAB */
    outb(COM1 + 0, 0x01);   /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* 8N1 */
    outb(COM1 + 2, 0xC7);   /* FIFO */
    outb(COM1 + 4, 0x03);   /* DTR | RTS */
}

void putc_serial(char c)
{
    /* Wait (bounded) for THR empty (LSR bit 5). */
    for (int spin = 0; spin < 100000 && !(inb(COM1 + 5) & 0x20); spin++)
        ;
    outb(COM1, (u8)c);
}

void puts_serial(const char *s)
{
    while (*s) {
        if (*s == '\n')
            putc_serial('\r');
        putc_serial(*s++);
    }
}

static void emit(char c)
{
    if (c == '\n')
        putc_serial('\r');
    putc_serial(c);
}

static void emit_number(u64 v, unsigned base, bool negative, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (negative)
        buf[n++] = '-';
    for (int i = n; i < width; i++)
        emit(pad);
    while (n)
        emit(buf[--n]);
}

static int vkprintf(const char *fmt, __builtin_va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = 0;
            while (s[len])
                len++;
            for (int i = len; i < width; i++)
                emit(' ');
            while (*s)
                emit(*s++);
            break;
        }
        case 'c':
            emit((char)__builtin_va_arg(ap, int));
            break;
        case 'd': {
            s64 v = longs ? __builtin_va_arg(ap, long) : __builtin_va_arg(ap, int);
            emit_number(v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            emit_number(longs ? __builtin_va_arg(ap, unsigned long) : __builtin_va_arg(ap, unsigned),
                        10, false, width, pad);
            break;
        case 'x':
            emit_number(longs ? __builtin_va_arg(ap, unsigned long) : __builtin_va_arg(ap, unsigned),
                        16, false, width, pad);
            break;
        case 'p':
            emit('0');
            emit('x');
            emit_number((u64)__builtin_va_arg(ap, void *), 16, false, width, pad);
            break;
        case '%':
            emit('%');
            break;
        case 0:
            return 0;
        default:
            emit('%');
            emit(*fmt);
        }
    }
    return 0;
}

int kprintf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vkprintf(fmt, ap);
    __builtin_va_end(ap);
    return 0;
}

NORETURN void exit_qemu(u32 code)
{
    outb(DEBUG_EXIT_PORT, (u8)code);           /* isa-debug-exit: status (code<<1)|1 */
    for (const char *s = "Shutdown"; *s; s++)  /* Bochs/QEMU shutdown port */
        outb(SHUTDOWN_PORT, (u8)*s);
    for (;;)
        __asm__ volatile("cli; hlt");
}

void tap_plan(int n)
{
    tap.planned = n;
    tap.next = 1;
    tap.failed = 0;
    puts_serial("TAP version 13\n");
    kprintf("1..%d\n", n);
}

void tap_ok(bool cond, const char *name, const char *fmt, ...)
{
    if (cond) {
        kprintf("ok %d - %s\n", tap.next++, name);
        return;
    }
    tap.failed++;
    kprintf("not ok %d - %s # ", tap.next++, name);
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vkprintf(fmt, ap);
    __builtin_va_end(ap);
    emit('\n');
}

void tap_skip(const char *name, const char *reason)
{
    kprintf("ok %d - %s # SKIP %s\n", tap.next++, name, reason);
}

NORETURN void tap_skip_rest(const char *const *names, int from, int n, const char *reason)
{
    for (int i = from; i < n; i++)
        tap_skip(names[i], reason);
    tap_done();
}

NORETURN void tap_done(void)
{
    if (tap.next - 1 != tap.planned) {
        kprintf("# planned %d tests but ran %d\n", tap.planned, tap.next - 1);
        tap.failed++;
    }
    kprintf("# %d failed\n", tap.failed);
    exit_qemu(tap.failed ? 1 : 0);
}
