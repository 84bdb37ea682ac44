/* puts: write the NUL-terminated string at RSI to COM1 (port 0x3F8), 64-bit code; clobbers AL, DX,
   RSI. Shared by the 64-bit loader test kernels (longmode64.S, bzimage.S). */
puts:
    movw $0x3F8, %dx
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  ret
