/*
 * Exception entry stubs, the target-call trampoline and the AP start code.
 */
#include "abi.h"

/* ---- exception / interrupt entry ----
 * One stub per vector, 16 bytes apart, listed in qtest_vector_stubs[].
 * Each pushes a dummy error code when the CPU does not, then the vector,
 * then jumps to the common path, which saves all GPRs, calls
 * qtest_trap(struct trap_frame *) and returns with iretq.
 */
#define HAS_ERR(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

	.text
	.balign 16
	.globl qtest_vector_stubs_begin
qtest_vector_stubs_begin:
	.set .Lvec, 0
	.rept 256
	.balign 16
	.if HAS_ERR(.Lvec)
	.else
	pushq	$0
	.endif
	pushq	$.Lvec
	jmp	qtest_trap_common
	.set .Lvec, .Lvec + 1
	.endr
	.balign 16

	.globl qtest_trap_common
	.type qtest_trap_common, @function
qtest_trap_common:
	cld
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	/* 22 qwords pushed below the 16-byte aligned exception frame start */
	call	qtest_trap
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp		/* vector, error code */
	iretq
	.size qtest_trap_common, . - qtest_trap_common

/* ---- u64 qtest_tramp(fn, a0, a1, a2, a3, struct trec *rec) ----
 * Calls fn(a0, a1, a2, a3) with canaries in every callee-saved register and
 * records rsp, the callee-saved registers and rflags before and after.
 * Survives a target that corrupts rsp (the caller's rsp is kept per CPU).
 */
	.globl qtest_tramp
	.type qtest_tramp, @function
qtest_tramp:
	pushq	%rbp
	movq	%rsp, %rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	subq	$8, %rsp		/* 16-byte aligned at the call */
	movq	%r9, %gs:qtest_percpu+PCPU_TREC(%rip)
	movq	%rsp, %gs:qtest_percpu+PCPU_TRSP(%rip)
	pushfq
	popq	%rax
	movq	%rax, TREC_RFLAGS_BEFORE(%r9)
	movq	%rsp, TREC_RSP_BEFORE(%r9)
	movq	%rdi, %r11
	movq	%rsi, %rdi
	movq	%rdx, %rsi
	movq	%rcx, %rdx
	movq	%r8, %rcx
	movabsq	$CANARY_RBX, %rbx
	movabsq	$CANARY_RBP, %rbp
	movabsq	$CANARY_R12, %r12
	movabsq	$CANARY_R13, %r13
	movabsq	$CANARY_R14, %r14
	movabsq	$CANARY_R15, %r15
	call	*%r11
	movq	%gs:qtest_percpu+PCPU_TREC(%rip), %r11
	movq	%rsp, TREC_RSP_AFTER(%r11)
	movq	%rax, TREC_RAX(%r11)
	movq	%rdx, TREC_RDX(%r11)
	movq	%rbx, TREC_RBX(%r11)
	movq	%rbp, TREC_RBP(%r11)
	movq	%r12, TREC_R12(%r11)
	movq	%r13, TREC_R13(%r11)
	movq	%r14, TREC_R14(%r11)
	movq	%r15, TREC_R15(%r11)
	movq	%gs:qtest_percpu+PCPU_TRSP(%rip), %rsp
	pushfq
	popq	%rcx
	movq	%rcx, TREC_RFLAGS_AFTER(%r11)
	addq	$8, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
	.size qtest_tramp, . - qtest_tramp

/* ---- AP start ----
 * qtest_ap_tramp_begin..end is copied to QTEST_AP_TRAMP_PHYS (page aligned,
 * below 1 MiB) and entered by SIPI in real mode at CS = phys >> 4, IP = 0.
 * It uses the kernel GDT through its physical address, the kernel page
 * tables (whose PML4[0] identity entry is present while an AP starts),
 * and jumps to qtest_ap_start64 at its high address.
 */
#define TR(x) (QTEST_AP_TRAMP_PHYS + ((x) - qtest_ap_tramp_begin))

	.section .rodata.ap_tramp, "a"
	.balign 16
	.globl qtest_ap_tramp_begin, qtest_ap_tramp_end
	.code16
qtest_ap_tramp_begin:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	qtest_ap_tramp_gdtp - qtest_ap_tramp_begin
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$SEL_CODE32, $TR(ap_pm32)

	.code32
ap_pm32:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$(qtest_pml4 - QTEST_KERNEL_BASE), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80010001, %eax	/* PG | WP | PE */
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $TR(ap_lm64)

	.code64
ap_lm64:
	movabsq	$qtest_ap_start64, %rax
	jmp	*%rax

	.balign 8
qtest_ap_tramp_gdtp:
	.word 8 * GDT_ENTRIES - 1
	.long qtest_gdt - QTEST_KERNEL_BASE
qtest_ap_tramp_end:

	.text
	.globl qtest_ap_start64
	.type qtest_ap_start64, @function
qtest_ap_start64:
	lgdt	qtest_gdt_ptr(%rip)
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	movq	qtest_ap_stack_top(%rip), %rsp
	pushq	$SEL_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	xorl	%ebp, %ebp
	movl	qtest_ap_cpu(%rip), %edi
	call	qtest_ap_main
2:	cli
	hlt
	jmp	2b
	.size qtest_ap_start64, . - qtest_ap_start64
