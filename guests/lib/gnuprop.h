/* Include from every .S file: marks the object IBT|SHSTK compatible
 * (GNU_PROPERTY_X86_FEATURE_1_AND = 0xc0000002, bits IBT=1 SHSTK=2 [Linux Documentation/arch/x86/shstk.rst]) so the linked
 * kernel keeps the property (the linker ANDs it over all inputs). */
    .pushsection .note.gnu.property, "a"
    .p2align 3
    .long 4            /* n_namesz */
    .long 16           /* n_descsz */
    .long 5            /* NT_GNU_PROPERTY_TYPE_0 */
    .asciz "GNU"
    .long 0xc0000002   /* GNU_PROPERTY_X86_FEATURE_1_AND */
    .long 4
    .long 3            /* IBT | SHSTK */
    .p2align 3
    .popsection
    .section .note.GNU-stack, "", @progbits
