/* Memory layout shared by the CPU test guests and tests/cpu/harness.py (which parses the
 * #define lines below: keep them "#define NAME 0xVALUE"). All addresses are identity-mapped. */
#define PML4_ADDR        0x1000
#define GDT_ADDR         0x6000
#define IDT_ADDR         0x7000
#define TSS_ADDR         0x8000
#define RESULTS_ADDR     0x9000
#define ISST_ADDR        0xA000
#define SSTK_KERNEL      0x20000
#define SSTK_KERNEL2     0x21000
#define SSTK_IST         0x22000
#define SSTK_USER        0x23000
#define SSTK_SPARE       0x24000
#define NORMAL_PAGE      0x25000
#define SUPERVISOR_PAGE  0x26000
#define KSTACK_TOP       0x80000
#define IST1_STACK_TOP   0x70000
#define USTACK_TOP       0x60000
#define GUEST_BASE       0x100000
#define RAM_SIZE         0x400000
#define MMIO_PAGE        0x3FF000

/* GDT selectors */
#define KERNEL_CS        0x08
#define KERNEL_DS        0x10
#define USER_DS          0x1B
#define USER_CS          0x23
#define KERNEL_CS32      0x28
#define TSS_SEL          0x30

/* results page layout (offsets from RESULTS_ADDR) */
#define R_COUNT          0x00
#define R_VECTOR         0x08
#define R_ERROR          0x10
#define R_RIP            0x18
#define R_CS             0x20
#define R_RSP            0x28
#define R_SSP            0x30
#define R_SS             0x38
#define R_HANDLER_RSP    0x40
#define R_ACTION         0x100
#define R_GUEST          0x200
#define R_LOG_VEC        0x300
#define R_LOG_SSP        0x400
