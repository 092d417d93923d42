# The tiny guest of linux_guests --guest tiny (64-bit, no paging changes,
# no interrupts): the init script's line protocol in 565 bytes. Build:
#   as --64 tiny.s -o tiny.o && objcopy -O binary -j .text tiny.o tiny.bin
# and paste the bytes into tiny.rs (TINY_CODE).
.intel_syntax noprefix
.code64
# Parameter block at 0x7000 (written by the host):
#  0x7000 steps  0x7008 step_bytes  0x7010 start_delay  0x7018 step_delay
#  0x7020 hb_period  0x7028 fill_base  0x7030 check_base  0x7038 check_pages
#  0x7040 seed  0x7048 ck_period  (delays in TSC cycles)  0x7100: ck0 (guest)
start:
    lea rsi, [rip + m_booted]
    call puts
    mov rdi, QWORD PTR ds:0x7030
    mov rcx, QWORD PTR ds:0x7038
    xor eax, eax
    movabs r9, 0x9E3779B97F4A7C15
1:  mov rdx, rax
    shl rdx, 3
    and rdx, 0xff8
    mov r8, rax
    imul r8, r9
    mov [rdi + rdx], r8
    add rdi, 4096
    inc rax
    cmp rax, rcx
    jb 1b
    call checksum
    mov QWORD PTR ds:0x7100, rax
    lea rsi, [rip + m_ck0]
    call puts
    call now
    mov r12, rax
    add r12, QWORD PTR ds:0x7020
    mov r13, rax
    add r13, QWORD PTR ds:0x7010
    mov r14, rax
    add r14, QWORD PTR ds:0x7048
    xor r15, r15
    mov rbx, QWORD PTR ds:0x7028
    cmp r15, QWORD PTR ds:0x7000
    jb mainloop
    lea rsi, [rip + m_filled]
    call puts
mainloop:
    call now
    cmp rax, r12
    jb 2f
    lea rsi, [rip + m_hb]
    call puts
    add r12, QWORD PTR ds:0x7020
2:  cmp r15, QWORD PTR ds:0x7000
    jae 4f
    call now
    cmp rax, r13
    jb 4f
    mov rcx, QWORD PTR ds:0x7008
    add rcx, rbx
    mov r8, QWORD PTR ds:0x7040
5:  mov r9, rbx
    xor r9, r8
    mov [rbx], r9
    add rbx, 4096
    cmp rbx, rcx
    jb 5b
    inc r15
    lea rsi, [rip + m_fill]
    call puts
    call now
    add rax, QWORD PTR ds:0x7018
    mov r13, rax
    cmp r15, QWORD PTR ds:0x7000
    jb 4f
    lea rsi, [rip + m_filled]
    call puts
4:  call now
    cmp rax, r14
    jb mainloop
    call checksum
    cmp rax, QWORD PTR ds:0x7100
    jne 6f
    lea rsi, [rip + m_ok]
    call puts
    jmp 7f
6:  lea rsi, [rip + m_bad]
    call puts
7:  call now
    add rax, QWORD PTR ds:0x7048
    mov r14, rax
    jmp mainloop

now:
    rdtsc
    shl rdx, 32
    or rax, rdx
    ret

# rax = checksum of two qwords per check page (the pattern one and one
# that must stay zero)
checksum:
    mov rdi, QWORD PTR ds:0x7030
    mov rcx, QWORD PTR ds:0x7038
    xor eax, eax
    xor r10, r10
1:  mov rdx, r10
    shl rdx, 3
    and rdx, 0xff8
    mov r8, [rdi + rdx]
    rol rax, 5
    xor rax, r8
    xor rdx, 0x800
    mov r8, [rdi + rdx]
    rol rax, 7
    xor rax, r8
    add rdi, 4096
    inc r10
    cmp r10, rcx
    jb 1b
    ret

puts:
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

m_booted: .asciz "@@BOOTED\n"
m_ck0:    .asciz "@@CK0 tiny\n"
m_hb:     .asciz "@@HB .\n"
m_fill:   .asciz "@@FILL .\n"
m_filled: .asciz "@@FILLED\n"
m_ok:     .asciz "@@CKOK\n"
m_bad:    .asciz "@@CKBAD\n"
